"""SparseGPT (Frantar & Alistarh, arXiv 2301.00774): prune and reconstruct each linear layer in one shot.

For a layer ``W`` (out, in) with inputs ``X`` and Hessian ``H = 2 X^T X``, columns are processed left to
right in lazy blocks of ``block_size``. At the start of each block the mask is chosen adaptively:
the weights with the smallest ``w^2 / [H^-1]_jj^2`` in the block (or, for N:M, in each group of M
columns of a row) are pruned. Each column ``j`` then has its pruned weights zeroed and the error is
spread over the not-yet-processed columns with the OBS update
``W[:, j:] -= (w_j - q_j) / [H^-1]_jj * H^-1[j, j:]``, using the upper Cholesky factor of
``H^-1`` (the same machinery as GPTQ).

Recipe::

    - method: sparsegpt
      sparsity: 0.5        # or pattern: "2:4"

Joint sparsification + quantization in one pass (the paper's Sec. 3.5), ``bits: 4``: each kept
weight is also rounded to a group-wise grid (scales and zeros fixed up front from the dense layer)
as its column is swept, so the OBS update compensates pruning and rounding errors together. The
result is stored as a packed :class:`lmpress.quant.qlinear.QuantLinear` whose pruned weights are
the grid's exact zero::

    - method: sparsegpt
      sparsity: 0.5
      bits: 4
      group_size: 64

The column sweep is :mod:`lmpress.sweep` (C++ when built), shared with GPTQ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import arch, stats
from ..calib import CALIB_DTYPES
from ..errors import InputError
from ..sweep import NONE, sweep_columns
from . import masks
from .config import CalibratedPruneConfig
from .unstructured import block_sparsities, groups_of, require_calib, summary, zeros_and_numel


@dataclass(frozen=True)
class SparseGPTConfig(CalibratedPruneConfig):
    """SparseGPT: mask selection and OBS weight reconstruction per layer (arXiv 2301.00774).

    Options of :class:`CalibratedPruneConfig`, with ``sequential`` None by default: off when only
    pruning (on the default model 0.2-0.5 perplexity worse at 50% on three calibration draws, and 20%
    slower), on in joint mode (50% + W4 g64: 38.5 vs 40.3 perplexity, rounding errors compound like
    GPTQ's); resolved when the config is made, so that the saved recipe says what ran. Plus:

    block_size: columns per lazy block (and per adaptive mask selection).
    damp: added to diag(H), as a fraction of its mean; grows x10 while the Cholesky factorization
        fails (the report lists the layers where it did).
    bits, group_size, sym: joint mode: also quantize the kept weights to this many bits, with
        ``group_size`` columns per scale / zero (-1: per output channel), on a symmetric grid or not.
    """

    method: ClassVar[str] = "sparsegpt"
    sequential: bool | None = None
    block_size: int = 128
    damp: float = 0.01
    bits: int | None = None
    group_size: int = 64
    sym: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.sequential is None:  # resolved here, so that the saved recipe says what ran
            object.__setattr__(self, "sequential", self.bits is not None)
        if self.bits is not None:
            from ..quant.grid import GridSpec

            GridSpec(self.bits, self.group_size, self.sym)  # validates bits and group size
        nm = masks.parse_pattern(self.pattern)
        if self.block_size < 1:
            raise ValueError(f"block_size {self.block_size} must be positive")
        if nm and self.block_size % nm[1]:
            raise ValueError(f"pattern {self.pattern}: SparseGPT solves columns in blocks of block_size={self.block_size}, "
                             f"which must be a multiple of M={nm[1]}; use a pattern whose M divides {self.block_size} "
                             f"(e.g. 2:4) or set block_size to a multiple of {nm[1]}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp {self.damp} must lie in (0, 1), e.g. 0.01")


def hessian_factor(H: Tensor, damp: float) -> tuple[Tensor, Tensor, float]:
    """``(U, dead, used)``: upper Cholesky factor of ``(H + damp I)^-1`` (float32, computed in float64),
    the inputs never active, and the dampening used (raised tenfold while H is not positive definite).
    H: (in, in) -> U: (in, in), dead: bool (in,)
    """
    H, dead = stats.without_dead(H.double())
    U, used = stats.damped_cholesky(H, damp, inverse=True, method="SparseGPT")
    return U.float(), dead, used


def _block_mask(W1: Tensor, d: Tensor, k: int) -> Tensor:
    """Adaptive mask of one lazy block: prune the ``k`` smallest w^2 / d^2. (out, b) -> bool keep"""
    tmp = (W1 * W1 / (d * d)[None, :]).flatten()
    keep = torch.ones_like(tmp, dtype=torch.bool)
    if k:
        keep[torch.topk(tmp, k, largest=False).indices] = False
    return keep.view_as(W1)


def sparsegpt_prune(
    W: Tensor,
    U: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    grid: tuple | None = None,
    kernel: bool = True,
) -> tuple[Tensor, Tensor]:
    """Prune ``W`` (out, in) with the upper Cholesky factor ``U`` of ``H^-1`` (in, in).
    Returns ``(W_pruned (out, in), loss (out,))``; exactly ``prune_count(out * in, sparsity)``
    weights are pruned (unstructured) or N of every M kept (N:M). ``grid = (spec, s, z)`` with
    ``s``, ``z`` (out, G): joint mode, each kept weight is also rounded to that grid (the returned
    weights lie on it; pruned ones are its exact zero). ``kernel``: use the C++ sweep when built.
    """
    W = W.clone().float()
    rows, cols = W.shape
    if nm is not None and cols % nm[1]:
        raise InputError(f"N:M sparsity with M={nm[1]} needs in_features divisible by {nm[1]}; this layer has {cols}")
    maxq = 0.0
    if grid is not None:
        spec, s_all, z_all = grid
        col_group = torch.arange(cols) // spec.groups(cols)
        maxq = float(spec.maxq)
    losses = torch.zeros(rows)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2].contiguous()  # (out, b), (b, b)
        d = torch.diag(U1)  # (b,)
        if nm is None:
            k = masks.prune_count(rows * i2, sparsity) - masks.prune_count(rows * i1, sparsity)
            K1 = _block_mask(W1, d, k).float()
        else:
            K1 = torch.ones_like(W1)
        S1, Z1 = NONE, NONE
        if grid is not None:
            S1, Z1 = s_all[:, col_group[i1:i2]].contiguous(), z_all[:, col_group[i1:i2]].contiguous()
        Q1, E1 = torch.zeros_like(W1), torch.zeros_like(W1)
        step = nm[1] if nm is not None else i2 - i1
        for c0 in range(0, i2 - i1, step):
            c1 = min(c0 + step, i2 - i1)
            if nm is not None:  # N:M: choose within the next M columns, as updated so far
                K1[:, c0:c1] = masks.nm_mask(W1[:, c0:c1] ** 2 / d[None, c0:c1] ** 2, *nm).float()
            sweep_columns(W1, U1, K1, S1, Z1, Q1, E1, c0, c1, maxq, kernel)
        W[:, i1:i2] = (Q1 - Z1) * S1 if grid is not None else Q1
        losses += (E1 * E1).sum(1) / 2
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W, losses


def relative_error(W: Tensor, W_new: Tensor, H: Tensor) -> float:
    """tr(dW H dW^T) / tr(W H W^T): the layer's output error on the calibration inputs, relative."""
    dW = (W_new - W).float()
    return (((dW @ H) * dW).sum() / ((W.float() @ H) * W.float()).sum().clamp_min(1e-30)).item()


def sparsegpt_(model, cfg: SparseGPTConfig, ctx) -> dict:
    """SparseGPT on the calibration pipeline, in place."""
    from ..calib import walk_blocks

    calib = require_calib(ctx, "sparsegpt")
    targets = block_sparsities(model, cfg, calib, ctx.progress)
    nm = masks.parse_pattern(cfg.pattern)
    measured, errors, raised = {}, {}, {}

    def fn(bctx):
        for group in groups_of(bctx, cfg.sequential):
            # float32 products, also under bf16 forwards: SparseGPT's masks follow the inverse Hessian
            # closely, and X^T X rounded to bf16 is often not positive definite
            st = stats.collect(bctx, group, lambda: stats.InputStats("xtx"))
            factors = {}
            for name in group:
                H = st[name].xtx
                if id(H) not in factors:
                    factors[id(H)] = hessian_factor(H, cfg.damp)
                U, dead, used = factors[id(H)]
                lin = bctx.linears[name]
                W = arch.linear_weight(lin).detach().float().clone()
                W[:, dead] = 0
                grid = _joint_grid(W, cfg)
                W_new, _ = sparsegpt_prune(W, U, targets[bctx.index], nm, cfg.block_size, grid)
                full = f"{bctx.name}.{name}"
                if used > cfg.damp:
                    raised[full] = used
                errors[full] = relative_error(W, W_new, H)
                arch.set_linear_weight(lin, W_new.to(lin.weight.dtype))
                measured[full] = zeros_and_numel(arch.linear_weight(lin))
                if grid is not None:
                    bctx.defer(lambda full=full, W_new=W_new, grid=grid: _store_quantized(model, full, W_new, grid))

    walk_blocks(model, calib, fn, batch_size=cfg.batch_size, progress=ctx.progress and "sparsegpt",
                dtype=CALIB_DTYPES[cfg.calib_dtype])
    out = {**summary(measured, targets if cfg.allocation != "uniform" else None), "relative_error_per_layer": errors}
    if raised:  # the Hessian was not positive definite at the configured dampening: say so
        out["dampening_raised"] = raised
    return out


def _joint_grid(W: Tensor, cfg: SparseGPTConfig):
    """Joint mode's fixed grid ``(spec, s, z)`` for the dense layer ``W``, or None."""
    if cfg.bits is None:
        return None
    from ..quant.grid import GridSpec, grid_params

    spec = GridSpec(cfg.bits, cfg.group_size, cfg.sym)
    return (spec, *grid_params(W, spec))


def _store_quantized(model, name: str, W: Tensor, grid) -> None:
    """Swap layer ``name`` for a packed QuantLinear holding ``W``, which lies on ``grid``."""
    from ..quant.grid import quantize_codes
    from ..quant.qlinear import replace_linear

    spec, s, z = grid
    replace_linear(model, name, quantize_codes(W, s, z, spec), s, z, spec)
