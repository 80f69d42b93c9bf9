"""Saving and loading compressed models as plain safetensors plus metadata in ``config.json``.

A compressed layer is an ``nn.Module`` that replaces a linear layer and follows
:class:`CompressedLinear`: a ``kind`` name registered in :data:`KINDS`, a JSON-able ``meta()`` that
is enough to build an empty layer of the right shapes (``empty(meta)``), and its tensors in its
state dict. Saving writes ``model.safetensors`` (every tensor once; tied tensors once) and adds to
``config.json``::

    "lmpress": {"version": 1,
                "recipe": [{"method": "gptq", "bits": 4, ...}, ...],   # the configs applied, in order
                "layers": {"model.layers.0.self_attn.q_proj": {"kind": "quant", ...meta}, ...}}

Loading builds the architecture from ``config.json`` with empty weights, swaps in the recorded
layers, then loads the tensors, so the loaded model gives the same logits as the saved one.
A plain ``nn.Linear`` whose shape differs from the config's (non-uniform structured pruning) is
recorded as kind ``linear``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .. import arch
from ..errors import InputError

FORMAT_VERSION = 1

# kind -> "module:Class", imported on first use (explicit registration, cheap imports)
KINDS: dict[str, str] = {
    "linear": "lmpress.formats:PlainLinear",
    "quant": "lmpress.quant.qlinear:QuantLinear",
    "sparse": "lmpress.prune.sparse:SparseLinear",
    "lowrank": "lmpress.lowrank.layers:LowRankLinear",
    "dsformer": "lmpress.lowrank.layers:DenseSparseLinear",
}


class CompressedLinear(Protocol):
    kind: str
    in_features: int
    out_features: int

    def meta(self) -> dict: ...

    @classmethod
    def empty(cls, meta: dict) -> nn.Module: ...

    def logical_numel(self) -> int: ...


class PlainLinear(nn.Linear):
    """An ``nn.Linear`` whose shape is recorded because it differs from the config's."""

    kind = "linear"

    def meta(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def empty(cls, meta: dict) -> nn.Module:
        return cls(meta["in_features"], meta["out_features"], bias=meta["bias"], device="meta")


def layer_class(kind: str):
    if kind not in KINDS:
        raise InputError(f"unknown compressed layer kind {kind!r}; this lmpress knows {sorted(KINDS)}; upgrade lmpress")
    mod, _, cls = KINDS[kind].partition(":")
    return getattr(importlib.import_module(mod), cls)


def layer_metadata(model: nn.Module) -> dict[str, dict]:
    """``{name: {"kind": ..., **meta}}`` for every compressed or reshaped layer of ``model``."""
    out = {}
    for name, m in model.named_modules():
        kind = getattr(m, "kind", None)
        if kind in KINDS and hasattr(m, "meta"):
            out[name] = {"kind": kind, **m.meta()}
    return out


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each tensor once (tied weights saved under their first name), plus the
    non-persistent buffers, so loading needs no initialisation code."""
    seen: dict[int, str] = {}
    out = {}
    items = dict(model.state_dict())
    items.update({k: v for k, v in model.named_buffers() if k not in items})
    for k, v in items.items():
        key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else id(v)
        if key in seen:
            continue
        seen[key] = k
        out[k] = v.detach().contiguous()
    return out


def save_compressed(model: nn.Module, out, *, recipe: list[dict], tokenizer=None, overwrite=False) -> Path:
    """Save ``model`` with its compressed layers to the folder ``out`` (atomically)."""
    from safetensors.torch import save_file

    from ..io import save_model

    def write(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["lmpress"] = {"version": FORMAT_VERSION, "recipe": recipe, "layers": layer_metadata(model)}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        save_file(_unique_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt", "lmpress": str(FORMAT_VERSION)})

    return save_model(model, out, tokenizer=tokenizer, overwrite=overwrite, extra=write)


def load_compressed(path: Path, config: Any, info: dict) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed`."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    if info.get("version", 0) > FORMAT_VERSION:
        raise InputError(f"{path} was written by a newer lmpress (format {info['version']}); upgrade lmpress")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, meta in info.get("layers", {}).items():
        meta = dict(meta)
        arch.set_module(model, name, layer_class(meta.pop("kind")).empty(meta))
    state = load_file(str(path / "model.safetensors"))
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    unknown = _restore_buffers(model, {k: state[k] for k in unexpected})
    if unknown:
        raise InputError(f"{path}: unexpected tensors {unknown[:3]}; the folder is not a consistent lmpress model")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still:
        raise InputError(f"{path}: tensors missing from model.safetensors: {still[:3]}; the save is incomplete")
    model.lmpress_recipe = info.get("recipe", [])
    return model.eval()


def _restore_buffers(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Put back the non-persistent buffers (rotary frequencies, embedding scales) saved beside the
    state dict; returns the names of the tensors that matched nothing."""
    unknown = []
    for key, t in state.items():
        owner, _, name = key.rpartition(".")
        try:
            mod = model.get_submodule(owner)
        except AttributeError:
            unknown.append(key)
            continue
        if name in dict(mod.named_buffers(recurse=False)):
            mod.register_buffer(name, t, persistent=False)
        else:
            unknown.append(key)
    return unknown
