"""Compact storage of sparse linear layers: :class:`SparseLinear` (kind ``"sparse"``).

Two layouts, both lossless for the weights they hold (values keep the weight's dtype unless a
smaller ``dtype`` is asked for):

* ``bitmask`` (unstructured): ``mask`` uint8 (out, ceil(in / 8)), bit ``b`` of byte ``j`` of a row is
  input ``8j + b`` (little-endian), 1 = nonzero; ``values`` (nnz,) are the nonzero weights in
  row-major order. Bits per weight: 1 + density * value bits.
* ``nm`` (N:M): ``values`` (out, in / M * N) are the N kept weights of each group of M inputs, in
  column order; ``indices`` uint8 (out, ceil(in / M * N * w / 8)) their positions inside the group
  (0..M-1), packed ``w`` bits each (w = 2 for M = 4), little-endian within a byte.

The forward pass densifies the weight on first use and caches it (correctness first: the
compact form is for storage; decode speed is that of the dense layer).

Example::

    sparsify_(model)                          # swap pruned nn.Linear layers for SparseLinear
    lmpress.save_model(model, "out", format="lmpress", recipe=[...], tokenizer=tok)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import arch
from ..errors import InputError
from . import masks

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pack_bits(codes: Tensor, width: int) -> Tensor:
    """Pack each row of small integer codes (rows, k) into uint8, ``width`` bits each (1, 2, 4, 8),
    the earlier code in the lower bits. -> (rows, ceil(k * width / 8))
    """
    per = 8 // width
    rows, k = codes.shape
    padded = torch.zeros(rows, math.ceil(k / per) * per, dtype=torch.int32)
    padded[:, :k] = codes.to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * width  # (per,)
    return (padded.view(rows, -1, per) << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: Tensor, width: int, k: int) -> Tensor:
    """Inverse of :func:`pack_bits`. (rows, bytes) -> int64 (rows, k)"""
    per = 8 // width
    shifts = torch.arange(per, dtype=torch.int32) * width
    codes = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << width) - 1)  # (rows, bytes, per)
    return codes.reshape(packed.shape[0], -1)[:, :k].long()


def index_width(m: int) -> int:
    """Bits per N:M position index: the smallest of 1, 2, 4, 8 that holds 0..m-1."""
    need = max(1, math.ceil(math.log2(m)))
    return next(w for w in (1, 2, 4, 8) if w >= need)


class SparseLinear(nn.Module):
    """A linear layer stored as a bitmask + nonzero values, or as N:M values + position indices."""

    kind = "sparse"
    lmpress_linear = True

    def __init__(self, in_features: int, out_features: int, *, layout: str = "bitmask", nnz: int = 0,
                 n: int = 0, m: int = 0, bias: bool = False, dtype: str = "float32", device=None):
        super().__init__()
        if layout not in ("bitmask", "nm"):
            raise InputError(f"unknown sparse layout {layout!r}; known: bitmask, nm")
        self.in_features, self.out_features = in_features, out_features
        self.layout, self.nnz, self.n, self.m, self.value_dtype = layout, nnz, n, m, dtype
        vd = _DTYPES[dtype]
        if layout == "bitmask":
            self.register_buffer("values", torch.empty(nnz, dtype=vd, device=device))
            self.register_buffer("mask", torch.empty(out_features, math.ceil(in_features / 8), dtype=torch.uint8, device=device))
        else:
            k = in_features // m * n
            self.register_buffer("values", torch.empty(out_features, k, dtype=vd, device=device))
            nbytes = math.ceil(k * index_width(m) / 8)
            self.register_buffer("indices", torch.empty(out_features, nbytes, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self._dense: tuple | None = None

    # ---- formats.py protocol --------------------------------------------------------------
    def meta(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "layout": self.layout,
                "nnz": self.nnz, "n": self.n, "m": self.m, "bias": self.bias is not None, "dtype": self.value_dtype}

    @classmethod
    def empty(cls, meta: dict) -> SparseLinear:
        meta = dict(meta)
        return cls(meta.pop("in_features"), meta.pop("out_features"), device="meta", **meta)

    def logical_numel(self) -> int:
        """Weights the layer stands for (out * in, zeros included) plus the bias."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    # ---- building and densifying ----------------------------------------------------------
    @classmethod
    def from_weight(cls, W: Tensor, bias: Tensor | None = None, pattern: str | None = None, dtype=None) -> SparseLinear:
        """Compact form of ``W`` (out, in). With ``pattern`` "N:M", ``W`` must satisfy it."""
        out, inp = W.shape
        vd = dtype or W.dtype
        name = next(k for k, v in _DTYPES.items() if v == vd)
        nm = masks.parse_pattern(pattern)
        if nm:
            if not masks.satisfies_nm(W, *nm):
                raise InputError(f"weight ({out}x{inp}) does not satisfy the {pattern} pattern; store it as a bitmask (pattern=None)")
            layer = cls(inp, out, layout="nm", n=nm[0], m=nm[1], bias=bias is not None, dtype=name)
            groups = W.reshape(out, inp // nm[1], nm[1])  # (out, in/M, M)
            pos = torch.argsort((groups == 0).to(torch.int8), dim=-1, stable=True)[..., : nm[0]].sort(-1).values
            layer.values = groups.gather(-1, pos).reshape(out, -1).to(vd)
            layer.indices = pack_bits(pos.reshape(out, -1), index_width(nm[1]))
        else:
            keep = W != 0
            layer = cls(inp, out, layout="bitmask", nnz=int(keep.sum()), bias=bias is not None, dtype=name)
            layer.values = W[keep].to(vd)
            layer.mask = pack_bits(keep, 1)
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    def dense_weight(self) -> Tensor:
        """The (out, in) weight, rebuilt from the compact form. float32 unless values are wider."""
        out, inp = self.out_features, self.in_features
        vals = self.values.float()
        if self.layout == "bitmask":
            keep = unpack_bits(self.mask, 1, inp).bool()  # (out, in)
            W = torch.zeros(out, inp, dtype=vals.dtype)
            W[keep] = vals
            return W
        k = inp // self.m * self.n
        pos = unpack_bits(self.indices, index_width(self.m), k).view(out, inp // self.m, self.n)
        W = torch.zeros(out, inp // self.m, self.m, dtype=vals.dtype)
        W.scatter_(-1, pos, vals.view(out, inp // self.m, self.n))
        return W.reshape(out, inp)

    @property
    def weight(self) -> Tensor:
        """The dense weight, rebuilt once per set of stored tensors and cached (not saved)."""
        key = (self.values.data_ptr(), tuple(self.values.shape), self.values.device.type)
        if self._dense is None or self._dense[0] != key:
            with torch.inference_mode(False):  # a cache built during inference must stay usable outside it
                self._dense = (key, self.dense_weight())
        return self._dense[1]

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        what = f"{self.n}:{self.m}" if self.layout == "nm" else f"nnz={self.nnz}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.layout} {what}, values {self.value_dtype}"


def sparsify_(model: nn.Module, *, pattern: str | None = None, dtype=None, min_sparsity: float = 0.25) -> dict[str, float]:
    """Replace each block linear with at least ``min_sparsity`` zeros by a :class:`SparseLinear`
    (N:M layout when ``pattern`` is given: every such layer must then satisfy it). Returns
    ``{name: sparsity}`` of the replaced layers. ``dtype``: value dtype (default: the weight's).
    """
    masks.check_sparsity(min_sparsity)
    swapped = {}
    for name, lin in arch.compressible_linears(model).items():
        if not arch.is_dense_linear(lin) or lin.weight.is_meta:
            continue  # already compressed (sparse, quantized, factorized), or a streamed block not loaded
        W = arch.linear_weight(lin).detach()
        sparsity = (W == 0).float().mean().item()
        if sparsity < min_sparsity or sparsity == 0:
            continue
        try:
            new = SparseLinear.from_weight(W, getattr(lin, "bias", None), pattern, dtype)
        except InputError as e:
            raise InputError(f"{name}: {e}") from None
        arch.set_module(model, name, new)
        swapped[name] = sparsity
    return swapped


def store_sparse_(model: nn.Module, cfg) -> dict:
    """Finishing step of magnitude, Wanda and SparseGPT (their registry entry): the still-sparse
    float linears become compact :class:`SparseLinear` layers (bitmask, or N:M indices plus values
    for ``cfg.pattern``), so the model in memory and the saved one are the same whichever API made
    them. Returns ``{"sparse_layers": {name: measured sparsity}}``."""
    swapped = sparsify_(model, pattern=getattr(cfg, "pattern", None))
    return {"sparse_layers": swapped} if swapped else {}


def densify_(model: nn.Module) -> int:
    """Turn :class:`SparseLinear` layers back into the plain layers they replaced (``nn.Linear``, or
    GPT-2's ``Conv1D``), holding the same weights: a later method then works on dense matrices as
    it would without the compact storage. Returns the number of layers turned back."""
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    if not sparse:
        return 0
    skel = arch.skeleton(model)
    for name, m in sparse.items():
        W = m.dense_weight().detach()  # (out, in)
        if arch.is_conv1d(skel.get_submodule(name)):
            from transformers.pytorch_utils import Conv1D

            new = Conv1D(W.shape[0], W.shape[1])
            new.weight.data = W.t().contiguous()
        else:
            new = nn.Linear(W.shape[1], W.shape[0], bias=m.bias is not None)
            new.weight.data = W.clone()
        if m.bias is not None:
            new.bias.data = m.bias.detach().clone()
        arch.set_module(model, name, new)
    return len(sparse)
