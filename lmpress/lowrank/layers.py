"""Factorized linear layers that replace ``nn.Linear`` and save/load through :mod:`lmpress.formats`.

* :class:`LowRankLinear` (kind ``lowrank``): ``y = x V^T U^T + b`` with two thin matrices ``U``
  (out, r) and ``V`` (r, in), held as two plain ``nn.Linear`` children ``V`` (in -> r) and ``U``
  (r -> out, with the bias). Being plain linears, the factors are found by
  :func:`lmpress.arch.block_linears` like any other layer, so a later recipe step (quantization,
  distillation) acts on the factors: "factorize, then quantize the factors" needs no special case.
  ``r (in + out)`` weights instead of ``in * out``: fewer bytes and fewer multiply-adds.
* :class:`DenseSparseLinear` (kind ``dsformer``, arXiv 2312.13211): ``y = (x B^T) C^T + b`` with a
  dense basis ``B`` (k, in) and coefficients ``C`` (out, k) holding ``s`` nonzeros per row, stored as
  ``values`` (out, s) and column ``indices`` (out, s) in uint8 (k <= 256) or int16. It is a leaf
  layer marked ``lmpress_linear`` so parameter counts see it.

  Forward: ``x B^T`` then a dense multiply by ``C``, densified once and cached outside the state
  dict (rebuilt when ``values`` or ``indices`` change; rebuilt every call while training, so
  gradients reach ``values``). Measured on this project's 2-core CPU for a 1536x576 layer with
  k=409, s=204 at batch 1: gathering the ``s`` entries per output (advanced indexing 732 us,
  ``index_select`` 301 us), a CSR sparse product (264 us) or densifying on every call (266 us) were
  all slower than the cached dense ``C`` (57 us; the dense layer: 69 us). So the bytes on disk
  shrink, but in memory the cache holds ``out * k`` floats per layer and decode speed stays about
  that of two dense products; a fused sparse kernel would be needed to gain speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

def _numel(m: nn.Module) -> int:
    if hasattr(m, "logical_numel"):
        return m.logical_numel()
    return sum(p.numel() for p in m.parameters())


class LowRankLinear(nn.Module):
    """``x (..., in) -> x V^T U^T + b (..., out)``; ``U.weight`` is (out, r), ``V.weight`` is (r, in)."""

    kind = "lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.V = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.U = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, U: Tensor, V: Tensor, bias: Tensor | None = None) -> "LowRankLinear":
        """From ``U`` (out, r), ``V`` (r, in) and an optional bias (out,)."""
        (out_f, r), in_f = U.shape, V.shape[1]
        if V.shape[0] != r or (bias is not None and bias.shape != (out_f,)):
            raise ValueError(f"factor shapes do not match: U {tuple(U.shape)}, V {tuple(V.shape)}, bias {None if bias is None else tuple(bias.shape)}")
        layer = cls(in_f, out_f, r, bias=bias is not None, device="meta")
        layer.U.weight = nn.Parameter(U.detach().clone())
        layer.V.weight = nn.Parameter(V.detach().clone())
        if bias is not None:
            layer.U.bias = nn.Parameter(bias.detach().clone())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.U(self.V(x))  # (..., in) -> (..., r) -> (..., out)

    def meta(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.U.bias is not None}

    @classmethod
    def empty(cls, meta: dict) -> nn.Module:
        return cls(meta["in_features"], meta["out_features"], meta["rank"], bias=meta["bias"], device="meta")

    def logical_numel(self) -> int:
        """Parameters of the two factors (and bias): ``r (in + out) (+ out)``."""
        return _numel(self.V) + _numel(self.U)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def index_dtype(k: int) -> torch.dtype:
    """Smallest integer dtype that holds the column indices 0..k-1."""
    if k <= 256:
        return torch.uint8
    if k <= 32768:
        return torch.int16
    raise ValueError(f"basis size {k} too large (at most 32768)")


class DenseSparseLinear(nn.Module):
    """``x (..., in) -> (x B^T) C^T + b``; ``B`` = ``basis`` (k, in), ``C`` (out, k) with ``s``
    nonzeros per row at ``indices`` (out, s) with ``values`` (out, s).
    """

    kind = "dsformer"
    lmpress_linear = True

    def __init__(self, in_features: int, out_features: int, k: int, s: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if not 1 <= s <= k:
            raise ValueError(f"need 1 <= s ({s}) <= k ({k})")
        self.in_features, self.out_features, self.k, self.s = in_features, out_features, k, s
        self.basis = nn.Parameter(torch.empty(k, in_features, device=device, dtype=dtype))
        self.values = nn.Parameter(torch.empty(out_features, s, device=device, dtype=dtype))
        self.register_buffer("indices", torch.zeros(out_features, s, dtype=index_dtype(k), device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(cls, basis: Tensor, values: Tensor, indices: Tensor, bias: Tensor | None = None) -> "DenseSparseLinear":
        (k, in_f), (out_f, s) = basis.shape, values.shape
        if indices.shape != values.shape or int(indices.min()) < 0 or int(indices.max()) >= k:
            raise ValueError(f"indices {tuple(indices.shape)} must match values {tuple(values.shape)} and lie in 0..{k - 1}")
        layer = cls(in_f, out_f, k, s, bias=bias is not None, device="meta")
        layer.basis = nn.Parameter(basis.detach().clone())
        layer.values = nn.Parameter(values.detach().clone())
        layer.indices = indices.to(index_dtype(k))
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
        return layer

    def coefficients(self) -> Tensor:
        """The dense coefficient matrix ``C`` (out, k)."""
        C = torch.zeros(self.out_features, self.k, dtype=self.values.dtype, device=self.values.device)
        return C.scatter(1, self.indices.long(), self.values)

    def forward(self, x: Tensor) -> Tensor:
        z = F.linear(x, self.basis)  # (..., k)
        training = torch.is_grad_enabled() and self.values.requires_grad
        return F.linear(z, self.coefficients() if training else self._cached_coefficients(), self.bias)  # (..., out)

    def _cached_coefficients(self) -> Tensor:
        key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in (self.values, self.indices))
        cache = self.__dict__.get("_dense_c")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, self.coefficients())
            self.__dict__["_dense_c"] = cache
        return cache[1]

    def meta(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "k": self.k, "s": self.s,
                "bias": self.bias is not None}

    @classmethod
    def empty(cls, meta: dict) -> nn.Module:
        return cls(meta["in_features"], meta["out_features"], meta["k"], meta["s"], bias=meta["bias"], device="meta")

    def logical_numel(self) -> int:
        """Stored parameters: basis ``k in`` + coefficient values ``out s`` (+ bias); indices not counted."""
        return self.basis.numel() + self.values.numel() + (self.bias.numel() if self.bias is not None else 0)

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.basis, self.values, self.indices, self.bias) if t is not None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, s={self.s}"
