"""DSFormer (Chand et al., arXiv 2312.13211): dense basis times sparse coefficients, per layer.

Each dense block linear ``W`` (out, in) becomes a
:class:`~lmpress.lowrank.layers.DenseSparseLinear` ``W ≈ C B``: a dense basis ``B`` (k, in) shared
by all outputs and coefficients ``C`` (out, k) with ``s`` nonzeros per row, stored as values plus
uint8/int16 column indices. The factors are fitted layer by layer in the output-error metric of
the calibration inputs (:func:`lmpress.lowrank.factor.dense_sparse_factorize`), in execution order
over the calibration pipeline like SVD-LLM. The paper trains the factorization end to end with the
task loss; this is its post-training, layer-wise form (a distillation step can follow).

Budget: ``ratio`` is the fraction of the block linears' stored bytes kept, counting the basis, the
coefficient values and their indices, so ``ratio=0.8`` stores exactly as many bytes as a low-rank
factorization keeping 0.8 of the parameters. The per-layer byte budgets come from the same
allocation as SVD-LLM (``energy``: whitened spectra; ``uniform``), then each layer takes the
largest basis ``k`` with ``s = density · k`` that fits. Alternatively give ``k`` (and ``s`` or
``density``) for the same shapes everywhere::

    - method: dsformer
      ratio: 0.8
      density: 0.5      # s / k
      iters: 6
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import arch
from . import factor, svd
from .layers import DenseSparseLinear, index_dtype

FLOAT_BYTES = 4


@dataclass(frozen=True)
class DSFormerConfig:
    """Dense-basis / sparse-coefficient factorization of the block linears.

    ratio: fraction of the block linears' stored bytes kept, in (0, 1]; default 0.8 unless ``k`` given.
    k: basis size for every layer (instead of ratio); capped at ``min(out, in)`` per layer.
    s: nonzero coefficients per row; default ``density · k``.
    density: ``s / k`` when s is not given.
    iters: alternating iterations (sparse coding, then basis update).
    allocation: per-layer budgets, ``energy`` (whitened spectra, one extra calibration pass) or ``uniform``.
    damp: Cholesky/ridge damping of ``X^T X``, relative to its mean diagonal.
    """

    family: ClassVar[str] = "lowrank"
    method: ClassVar[str] = "dsformer"
    needs_calibration: ClassVar[bool] = True
    ratio: float | None = None
    k: int | None = None
    s: int | None = None
    density: float = 0.5
    iters: int = 6
    allocation: str = "energy"
    damp: float = 1e-4

    def __post_init__(self):
        if self.ratio is not None and self.k is not None:
            raise ValueError("give ratio, or k (with s or density), not both")
        if self.ratio is None and self.k is None:
            object.__setattr__(self, "ratio", 0.8)
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1):
            raise ValueError(f"ratio must be in (0, 1] (the fraction of the block linears' stored bytes kept), got {self.ratio!r}")
        for name in ("k", "s"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.k is not None and self.s is not None and self.s > self.k:
            raise ValueError(f"s ({self.s}) cannot exceed k ({self.k}): a row has at most k coefficients")
        if not 0 < self.density <= 1:
            raise ValueError(f"density (s / k) must be in (0, 1], got {self.density}")
        if not (isinstance(self.iters, int) and self.iters >= 0):
            raise ValueError(f"iters must be a non-negative integer, got {self.iters!r}")
        if self.allocation not in svd.ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(svd.ALLOCATIONS)}, got {self.allocation!r}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")


def layer_bytes(out_f: int, in_f: int, k: int, s: int) -> int:
    """Stored bytes of a DenseSparseLinear's basis, values and indices (bias excluded)."""
    return FLOAT_BYTES * (k * in_f + out_f * s) + out_f * s * torch.empty(0, dtype=index_dtype(k)).element_size()


def shape_for_budget(out_f: int, in_f: int, budget_bytes: float, density: float, s: int | None = None) -> tuple[int, int] | None:
    """Largest ``(k, s)`` with ``s = density·k`` (or the given s) within ``budget_bytes``; None if none fits."""

    def shape(k):
        return k, (min(k, s) if s is not None else max(1, round(density * k)))

    lo, hi = 0, min(out_f, in_f)  # bytes grow with k: binary search the largest k that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if layer_bytes(out_f, in_f, *shape(mid)) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return shape(lo) if lo >= 1 else None


def _shape(cfg: DSFormerConfig, o: int, i: int, rank: int | None) -> tuple[int, int] | None:
    """(k, s) of one layer, or None to keep it dense."""
    if cfg.k is not None:
        k = min(cfg.k, o, i)
        s = min(cfg.s or max(1, round(cfg.density * k)), k)
    else:
        if rank is None or rank >= factor.dense_rank(o, i):
            return None
        k, s = shape_for_budget(o, i, FLOAT_BYTES * rank * (o + i), cfg.density, cfg.s) or (1, 1)
    return None if layer_bytes(o, i, k, s) >= FLOAT_BYTES * o * i else (k, s)


def dsformer_(model: nn.Module, cfg: DSFormerConfig, ctx) -> dict:
    """Factor every dense block linear as ``C B`` in place; returns per-layer shapes and errors."""
    targets = svd.dense_targets(model, cfg.method)
    names, shapes = list(targets), [svd.shape_of(m) for m in targets.values()]
    ranks: dict[str, int | None] = {n: None for n in names}
    if cfg.k is None:
        lr_cfg = svd.SVDLLMConfig(ratio=cfg.ratio, allocation=cfg.allocation, damp=cfg.damp)
        spectra = svd.layer_spectra(model, lr_cfg, ctx, targets) if cfg.allocation == "energy" else None
        ranks = dict(zip(names, svd.budget_ranks(lr_cfg, shapes, [spectra[n] for n in names] if spectra else None)))
    layers: dict[str, dict] = {}

    def visit(block_name, group, linears, st):
        for n in group:
            full = f"{block_name}.{n}"
            layers[full] = _factor_layer(model, full, linears[n], st.xtx, cfg, ranks[full])

    svd.walk_groups(model, ctx.calib, visit, progress=ctx.progress, label=cfg.method)
    return svd.summary(layers, dict(zip(names, shapes)))


def _factor_layer(model, name: str, m: nn.Module, H: torch.Tensor, cfg: DSFormerConfig, rank: int | None) -> dict:
    W = arch.linear_weight(m).detach()
    o, i = W.shape
    shape = _shape(cfg, o, i, rank)
    if shape is None:
        return {"rank": None, "rel_error": 0.0, "params": o * i}
    k, s = shape
    fit = factor.dense_sparse_factorize(W, k, s, H, iters=cfg.iters, damp=cfg.damp)
    layer = DenseSparseLinear.from_factors(fit.basis, fit.values, fit.indices, svd.bias_of(m))
    arch.set_module(model, name, layer)
    total = factor.output_error(W, torch.zeros_like(W), H)
    return {"rank": k, "k": k, "s": s, "params": k * i + o * s, "bytes": layer_bytes(o, i, k, s),
            "rel_error": fit.errors[-1] / max(total, 1e-30), "rel_error_init": fit.errors[0] / max(total, 1e-30)}
