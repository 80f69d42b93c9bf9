"""Parameter counts and storage: embeddings / linear layers / other, bits per weight.

Bytes are counted as the tensors are stored: a float checkpoint loaded into float32 (a bf16 or fp16
safetensors folder) carries the dtypes it was stored in (``model.lmpress_stored_dtypes``, set by
:func:`lmpress.io.load_model`), and its weights count at those; once lmpress changes the model
(:func:`forget_stored_dtypes`, called for every method), its tensors count as held in memory, which is
how lmpress saves them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import arch


@dataclass
class ParamCounts:
    embedding: int  # token (and position) embeddings; a tied output head is counted here once
    linear: int  # linear layers inside decoder blocks (what compression methods touch)
    head: int  # an untied output head
    other: int  # norms, biases outside linears, anything else
    linear_bytes: int  # bytes the block linears occupy as stored (packed weights, scales, zeros...)

    @property
    def total(self) -> int:
        return self.embedding + self.linear + self.head + self.other

    @property
    def linear_bits_per_weight(self) -> float:
        """Stored bits per logical weight of the block linears, scales and zeros included."""
        return 8 * self.linear_bytes / max(1, self.linear)


def _logical_numel(m: nn.Module) -> int:
    if hasattr(m, "logical_numel"):
        return m.logical_numel()
    return sum(p.numel() for p in m.parameters(recurse=False))


def _stored_bytes(m: nn.Module, name: str, stored: dict) -> int:
    tensors = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
    return sum(t.numel() * stored.get(f"{name}.{k}", t.dtype).itemsize for k, t in tensors)


def stored_dtypes(model: nn.Module) -> dict:
    """``{tensor name: dtype}`` of the tensors whose checkpoint dtype differs from the one held in memory."""
    return getattr(model, "lmpress_stored_dtypes", None) or {}


def forget_stored_dtypes(model: nn.Module) -> None:
    """The model no longer is the checkpoint it was loaded from: count its tensors as held (and saved)."""
    model.__dict__.pop("lmpress_stored_dtypes", None)


def param_counts(model: nn.Module) -> ParamCounts:
    linears = arch.compressible_linears(model)
    lin_ids = {id(m) for m in linears.values()}
    emb_ids = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            emb_ids.update(id(p) for p in m.parameters(recurse=False))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_params = {id(p) for p in head.parameters(recurse=False)} if head is not None else set()
    linear = sum(_logical_numel(m) for m in linears.values())
    stored = stored_dtypes(model)
    lbytes = sum(_stored_bytes(m, n, stored) for n, m in linears.items())
    counted_in_linears = {id(p) for m in linears.values() for p in m.parameters(recurse=False)}
    emb = hd = other = 0
    seen = set()
    for name, mod in model.named_modules():
        if id(mod) in lin_ids:
            continue
        for p in mod.parameters(recurse=False):
            if id(p) in seen or id(p) in counted_in_linears:
                continue
            seen.add(id(p))
            if id(p) in emb_ids:
                emb += p.numel()
            elif id(p) in head_params:
                hd += _logical_numel(head) if p is getattr(head, "weight", None) else p.numel()
            else:
                other += p.numel()
    return ParamCounts(emb, linear, hd, other, lbytes)
