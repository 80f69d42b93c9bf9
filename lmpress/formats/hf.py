"""A plain Hugging Face folder: what ``transformers`` (and vLLM, lm-evaluation-harness) load as it is.

Holds float models, structurally pruned ones (smaller shapes written into the config), and
unstructured or N:M sparsity as dense weights with exact zeros. lmpress's recipe and data go into
``config.json`` under ``"lmpress"`` with ``"format": "hf"``; transformers ignores that key.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .. import arch
from . import layer_metadata


def unsupported(model: nn.Module) -> str | None:
    layers = layer_metadata(model)
    other = sorted({m["kind"] for m in layers.values()} - {"sparse"})
    if other:
        return f"it holds {', '.join(other)} layers, which a plain folder has no place for"
    if layers:
        skel = arch.skeleton(model)
        for name, meta in layers.items():
            w = arch.linear_weight(skel.get_submodule(name))
            if tuple(w.shape) != (meta["out_features"], meta["in_features"]):
                return f"{name} has shape {meta['out_features']}x{meta['in_features']}, its config says {tuple(w.shape)}"
    return None


def dense_state(model: nn.Module, *, ref: dict[str, nn.Module] | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict a plain load expects: each sparse layer's dense weight (exact zeros) in the
    original layer's layout (GPT-2's ``Conv1D`` stores it transposed). ``model`` may be one block of
    a streamed model, named from ``prefix``, with ``ref`` the modules of the whole model's skeleton."""
    sparse = {n: m for n, m in model.named_modules() if getattr(m, "kind", None) == "sparse"}
    if sparse and ref is None:
        ref = dict(arch.skeleton(model).named_modules())
    state = {prefix + k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in sparse}
    for name, m in sparse.items():
        w = m.dense_weight().detach()
        state[f"{prefix}{name}.weight"] = w.t().contiguous() if arch.is_conv1d(ref[prefix + name]) else w
        if m.bias is not None:
            state[f"{prefix}{name}.bias"] = m.bias.detach()
    return state


def write(model: nn.Module, folder: Path, metadata: dict) -> None:
    model.save_pretrained(folder, state_dict=dense_state(model))
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["lmpress"] = {**metadata, "format": "hf"}
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
