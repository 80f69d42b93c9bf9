"""lmpress's own layout: safetensors of the compressed layers' tensors plus metadata in ``config.json``.

For what no shared format expresses (low-rank factors, DSFormer, compact sparse storage, ternary and
3-bit grids). ``config.json`` holds the model's config with its ``model_type`` replaced by
:data:`REFUSAL`, so that plain ``transformers`` (and every tool built on it) refuses the folder with a
message naming lmpress instead of loading random weights, and::

    "lmpress": {"version": 2, "format": "lmpress", "model_type": "llama",
                "recipe": [{"method": "gptq", "bits": 4, ...}, ...],   # the configs applied, in order
                "data": {"corpus": null, "calib_samples": 128, ...},   # the calibration data used
                "layers": {"model.layers.0.self_attn.q_proj": {"kind": "quant", ...meta}, ...}}

Reading builds the architecture from the config with empty weights, swaps in the recorded layers,
then loads the tensors, so the loaded model gives the same logits as the saved one. Folders of
format version 1 (the real ``model_type`` in place) are read too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .. import arch
from ..errors import InputError
from . import layer_class, layer_metadata

FORMAT_VERSION = 2
REFUSAL = "lmpress (a folder in lmpress's own layout: load it with lmpress.load_model, or convert it with `lmpress export`)"


def unsupported(model: nn.Module) -> str | None:
    return None  # holds every model lmpress makes


def _unique_state(model: nn.Module, skip: str | None = None) -> dict[str, torch.Tensor]:
    """State dict with each tensor once (tied weights saved under their first name), plus the
    non-persistent buffers, so loading needs no initialisation code; the names under ``skip`` left out."""
    seen: set = set()
    out = {}
    items = dict(model.state_dict())
    items.update({k: v for k, v in model.named_buffers() if k not in items})
    for k, v in items.items():
        if skip and k.startswith(skip):
            continue
        key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else id(v)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous()
    return out


def write(model: nn.Module, folder: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    write_config(model.config, folder, metadata, layer_metadata(model))
    save_file(_unique_state(model), str(folder / "model.safetensors"), metadata={"format": "pt"})  # one key: safetensors orders several differently run to run


def write_config(config, folder: Path, metadata: dict, layers: dict[str, dict]) -> None:
    """``config.json``: the model's config under the refusing ``model_type``, with lmpress's metadata
    and ``layers`` (:func:`lmpress.formats.layer_metadata`; a streamed save gathers it block by block)."""
    cfg = config.to_dict()
    info = {**metadata, "version": FORMAT_VERSION, "format": "lmpress", "model_type": cfg["model_type"], "layers": layers}
    cfg.update(model_type=REFUSAL, lmpress=info)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def checkpoint_state(module: nn.Module, prefix: str = "", skip: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors :func:`write` saves for ``module`` (named ``prefix`` in its model), without the names under ``skip``."""
    return {prefix + k: v for k, v in _unique_state(module, skip).items()}


def config_of(raw: dict, where: Path):
    """The transformers config of a folder in this layout (``raw``: its parsed ``config.json``)."""
    from transformers import CONFIG_MAPPING

    info = raw["lmpress"]
    if info.get("version", 0) > FORMAT_VERSION:
        raise InputError(f"{where} was written by a newer lmpress (format {info['version']}); upgrade lmpress")
    d = {k: v for k, v in raw.items() if k not in ("lmpress", "quantization_config")}
    d["model_type"] = info.get("model_type", raw.get("model_type"))
    if d["model_type"] not in CONFIG_MAPPING:
        raise InputError(f"{where}/config.json: model type {d['model_type']!r} is not one transformers knows")
    return CONFIG_MAPPING[d["model_type"]].from_dict(d)


def read(path: Path, raw: dict) -> nn.Module:
    """Rebuild a model saved by :func:`write`."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = config_of(raw, path)
    info = raw["lmpress"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}  # a streamed save's shards too
    try:
        for name, meta in info.get("layers", {}).items():
            meta = dict(meta)
            arch.set_module(model, name, layer_class(meta.pop("kind")).empty(meta))
        _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        if isinstance(e, InputError):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: the layer metadata in config.json does not match the tensors ({first}); "
                         "the folder was edited or damaged: compress the model again") from None
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
