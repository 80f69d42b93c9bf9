"""Output formats: one writer (and reader) per format, and the compressed-layer registry they share.

A format module has ``unsupported(model) -> str | None`` (why it cannot hold this model, or None),
``write(model, folder, metadata)`` that writes the weights and ``config.json`` into an existing,
empty ``folder`` and nothing else, and ``read(path, raw_config) -> model``. Choosing a format,
atomic renames, tokenizers and checks of the output path belong to :mod:`lmpress.io`.

- ``hf``: a plain Hugging Face folder (float, structurally pruned, or unstructured sparsity stored as
  dense weights with exact zeros) that ``transformers`` loads as it is;
- ``compressed-tensors``: packed quantized weights in the format llm-compressor writes and
  transformers, vLLM and lm-evaluation-harness read;
- ``lmpress``: lmpress's own layout, for what the others cannot express (low-rank factors, DSFormer,
  compact sparse storage, ternary or 3-bit grids). Plain ``transformers`` refuses it, naming lmpress.

A compressed layer is an ``nn.Module`` that replaces a linear layer and follows
:class:`CompressedLinear`: a ``kind`` registered in :data:`KINDS`, a JSON-able ``meta()`` that is
enough to build an empty layer of the right shapes (``empty(meta)``), and its tensors in its state
dict. A plain ``nn.Linear`` whose shape differs from the config's is recorded as kind ``linear``.
"""

from __future__ import annotations

import importlib
from typing import Protocol

from torch import nn

from ..errors import InputError

# format name -> module (imported on use)
FORMATS: dict[str, str] = {
    "hf": "lmpress.formats.hf",
    "compressed-tensors": "lmpress.formats.compressed_tensors",
    "lmpress": "lmpress.formats.native",
}
AUTO_ORDER = ("hf", "compressed-tensors", "lmpress")  # the first that can hold the model wins

# kind -> "module:Class", imported on first use (explicit registration, cheap imports)
KINDS: dict[str, str] = {
    "linear": "lmpress.formats:PlainLinear",
    "quant": "lmpress.quant.qlinear:QuantLinear",
    "ggml": "lmpress.quant.qlinear:GGMLLinear",
    "ggml_embedding": "lmpress.quant.qlinear:GGMLEmbedding",
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


def layer_kinds(model: nn.Module) -> set[str]:
    return {meta["kind"] for meta in layer_metadata(model).values()}


def writer(name: str):
    """The module of format ``name``."""
    if name not in FORMATS:
        raise InputError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)} (or auto)")
    return importlib.import_module(FORMATS[name])


def choose(model: nn.Module, name: str = "auto") -> str:
    """The format ``name`` if it can hold ``model`` (a clear error if not); for ``auto`` the first of
    :data:`AUTO_ORDER` that can."""
    if name != "auto":
        why = writer(name).unsupported(model)
        if why:
            raise InputError(f"format {name!r} cannot hold this model: {why}; use --format lmpress (or auto)")
        return name
    return next(n for n in AUTO_ORDER if writer(n).unsupported(model) is None)


def detect(raw_config: dict) -> str:
    """The format a folder's ``config.json`` (parsed) says it is in."""
    meta = raw_config.get("lmpress")
    qc = raw_config.get("quantization_config") or {}
    if qc.get("quant_method") == "compressed-tensors":
        return "compressed-tensors"
    if isinstance(meta, dict):
        return meta.get("format", "lmpress")
    return "hf"


def load_note(folder, fmt: str) -> str | None:
    """What a user of another tool must know to load ``folder`` (written in ``fmt``), or None."""
    import json
    from pathlib import Path

    if fmt != "compressed-tensors":
        return None
    qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config")
    return writer(fmt).transformers_caveat(qc) if qc else None
