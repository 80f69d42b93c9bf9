"""Magnitude and Wanda pruning: unstructured (per row or per layer) or N:M, uniform or OWL-allocated.

* Magnitude: drop the smallest ``|W|``; needs no data.
* Wanda (Sun et al., arXiv 2306.11695): drop the smallest ``|W_ij| * ||X_j||_2`` in each output row;
  ``||X_j||`` from the calibration pipeline, block by block, each block seeing the outputs of the
  already-pruned blocks before it (and, with ``sequential=True``, each group of linears within a
  block seeing the pruned groups before it).
* OWL (Yin et al., arXiv 2310.05065, ``allocation="owl"``): one extra pass over the dense model
  measures each block's outlier ratio; blocks with more outliers are pruned less, the mean sparsity
  stays the target.
* Sensitivity (``allocation="sensitivity"``): the same extra pass Wanda-prunes each dense block on
  its own, at the target sparsity, and measures how far its output moves, relative to the block's
  own update ``||f_pruned(x) - f(x)|| / ||f(x) - x||``; more sensitive blocks are pruned less, with
  the same linear spread (``owl_lambda``) and mean as OWL.

Recipe::

    - method: wanda
      sparsity: 0.5        # or pattern: "2:4"

Pruned layers stay ``nn.Linear`` with zeros (so distillation can train them); ``prune.sparse.sparsify_``
turns them into compact ``SparseLinear`` layers before saving.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import arch
from ..errors import InputError
from ..calib import CALIB_DTYPES, check_calib_dtype
from . import masks

ALLOCATIONS = ("uniform", "owl", "sensitivity")


def calib_dtype_of(cfg) -> torch.dtype:
    """The dtype of the calibration passes (block forwards run on a copy of the block in it)."""
    return CALIB_DTYPES[getattr(cfg, "calib_dtype", "float32")]


def check_sparsity_fields(cfg, *, scopes=masks.SCOPES) -> None:
    """Shared validation: fills ``sparsity`` from the pattern (or 0.5), checks the rest."""
    nm = masks.parse_pattern(cfg.pattern)
    if cfg.sparsity is None:
        object.__setattr__(cfg, "sparsity", 1 - nm[0] / nm[1] if nm else 0.5)
    masks.check_sparsity(cfg.sparsity)
    if nm and abs(cfg.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
        raise ValueError(f"sparsity {cfg.sparsity} contradicts pattern {cfg.pattern} (which means {1 - nm[0] / nm[1]:g}); give one of them")
    if getattr(cfg, "scope", "row") not in scopes:
        raise ValueError(f"scope {cfg.scope!r} must be one of {scopes}")
    allocation = getattr(cfg, "allocation", "uniform")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation {allocation!r} must be one of {ALLOCATIONS}")
    if allocation != "uniform":
        if nm:
            raise ValueError(f"{allocation} allocation gives each block its own sparsity, which an N:M pattern cannot; "
                             "drop one of them")
        masks.owl_sparsities(torch.zeros(2), cfg.sparsity, cfg.owl_lambda)  # validates lambda
        if cfg.owl_m <= 1:
            raise ValueError(f"owl_m {cfg.owl_m} must be > 1 (outliers are scores above owl_m x the mean)")


@dataclass(frozen=True)
class MagnitudeConfig:
    """Zero the smallest-magnitude weights of every block linear."""

    method: ClassVar[str] = "magnitude"
    needs_calibration: ClassVar[bool] = False
    sparsity: float | None = None  # fraction of weights zeroed; default 0.5, or 1 - N/M with a pattern
    pattern: str | None = None  # "N:M": keep N of every M consecutive inputs of a row
    scope: str = "layer"  # compare within each "row" or the whole "layer"

    def __post_init__(self):
        check_sparsity_fields(self)


@dataclass(frozen=True)
class WandaConfig:
    """Wanda: prune by |W| * ||x|| per output row (arXiv 2306.11695)."""

    method: ClassVar[str] = "wanda"
    needs_calibration: ClassVar[bool] = True
    sparsity: float | None = None  # fraction of weights zeroed; default 0.5, or 1 - N/M with a pattern
    pattern: str | None = None  # "N:M": keep N of every M consecutive inputs of a row
    scope: str = "row"  # compare within each "row" (the paper) or the whole "layer"
    allocation: str = "uniform"  # "uniform", "owl" (outlier-weighted) or "sensitivity" (per-block output error)
    owl_lambda: float = 0.08  # owl / sensitivity: block sparsities spread over target +- lambda
    owl_m: float = 5.0  # OWL: a score is an outlier above owl_m x the layer mean
    sequential: bool = False  # True: groups of linears in a block see the pruned groups before them (slower)
    batch_size: int = 8  # calibration rows per forward
    calib_dtype: str = "bfloat16"  # dtype of the calibration passes ("float32": full precision)

    def __post_init__(self):
        check_sparsity_fields(self)
        check_calib_dtype(self.calib_dtype)


def make_mask(scores: Tensor, sparsity: float, pattern: str | None, scope: str) -> Tensor:
    """Keep-mask from scores: N:M when a pattern is given, else the top (1 - sparsity) by scope."""
    nm = masks.parse_pattern(pattern)
    return masks.nm_mask(scores, *nm) if nm else masks.topk_mask(scores, sparsity, scope)


def require_calib(ctx, method: str) -> Tensor:
    if ctx.calib is None:
        raise InputError(f"{method} needs calibration data: pass calibration token ids (RunContext.calib)")
    return ctx.calib


# ---- plumbing shared with SparseGPT -------------------------------------------------------


def collect_inputs(bctx, names: list[str], reduce: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """``{name: sum over batches of reduce(x)}`` for each named linear's input x (tokens, in).
    Linears that read the same input (one of ``bctx.groups``) share one accumulator.
    """
    rep = {}  # name -> the first named member of its input group
    for g in bctx.groups:
        members = [n for n in g if n in names]
        rep.update({n: members[0] for n in members})
    sums: dict[str, Tensor] = {}

    def observer(r):
        def f(x):
            v = reduce(x)
            sums[r] = v if r not in sums else sums[r] + v

        return f

    bctx.collect({r: observer(r) for r in sorted(set(rep.values()))})
    return {n: sums[rep[n]] for n in names}


def groups_of(bctx, sequential: bool) -> list[list[str]]:
    """Groups of linears pruned together: the true-sequential groups, or the whole block."""
    return bctx.groups if sequential else [[n for g in bctx.groups for n in g]]


def block_sparsities(model, cfg, calib: Tensor, progress) -> list[float]:
    """One sparsity per block: uniform, or allocated from one pass over the dense model (OWL's
    Wanda-score outlier ratios, or each block's output error when pruned alone)."""
    n_blocks = len(arch.blocks(model))
    allocation = getattr(cfg, "allocation", "uniform")
    if allocation == "uniform":
        return [cfg.sparsity] * n_blocks
    from ..calib import walk_blocks

    measure = _outlier_ratio if allocation == "owl" else _pruned_output_error
    scores = torch.zeros(n_blocks)

    def fn(bctx):
        norms = collect_inputs(bctx, list(bctx.linears), _sum_squares)
        scores[bctx.index] = measure(bctx, norms, cfg)

    walk_blocks(model, calib, fn, batch_size=cfg.batch_size, progress=progress and f"{allocation} allocation",
                dtype=calib_dtype_of(cfg))
    return masks.owl_sparsities(scores, cfg.sparsity, cfg.owl_lambda).tolist()


def _outlier_ratio(bctx, norms: dict[str, Tensor], cfg) -> float:
    scores = [masks.wanda_scores(arch.linear_weight(m).detach().float(), norms[n].sqrt()).flatten()
              for n, m in bctx.linears.items()]
    return masks.outlier_ratio(torch.cat(scores), cfg.owl_m)


def _pruned_output_error(bctx, norms: dict[str, Tensor], cfg) -> float:
    """``||f_pruned(x) - f(x)|| / ||f(x) - x||`` over the calibration inputs, the block's linears
    Wanda-pruned at the target sparsity on a copy (the block itself is left dense)."""
    dense = bctx.runner()
    pruned = copy.deepcopy(dense)
    for name, lin in arch.block_linears(pruned).items():
        W = arch.linear_weight(lin).detach()
        keep = masks.topk_mask(masks.wanda_scores(W.float(), norms[name].sqrt()), cfg.sparsity, "row")
        arch.set_linear_weight(lin, W * keep)
    with torch.no_grad():
        return masks.relative_output_error([(x, bctx.forward(x, dense), bctx.forward(x, pruned)) for x in bctx.inputs])


def _sum_squares(x: Tensor) -> Tensor:
    x = x.float()
    return (x * x).sum(0)  # (in,)


def zeros_and_numel(W: Tensor) -> tuple[int, int]:
    return int((W == 0).sum()), W.numel()


def summary(measured: dict[str, tuple[int, int]], block_targets: list[float] | None = None) -> dict:
    """Report: measured sparsity per layer and over all pruned weights (and OWL's block targets)."""
    zeros = sum(z for z, _ in measured.values())
    total = sum(n for _, n in measured.values())
    out = {"sparsity": zeros / max(1, total), "sparsity_per_layer": {k: z / n for k, (z, n) in measured.items()}}
    if block_targets is not None:
        out["block_sparsity_target"] = block_targets
    return out


# ---- methods --------------------------------------------------------------------------------


def magnitude_(model, cfg: MagnitudeConfig, ctx=None) -> dict:
    """Magnitude pruning of every block linear, in place."""
    measured = {}
    for name, lin in arch.compressible_linears(model).items():
        W = arch.linear_weight(lin).detach()
        keep = make_mask(masks.magnitude_scores(W.float()), cfg.sparsity, cfg.pattern, cfg.scope)
        arch.set_linear_weight(lin, W * keep)
        measured[name] = zeros_and_numel(arch.linear_weight(lin))
    return summary(measured)


def wanda_(model, cfg: WandaConfig, ctx) -> dict:
    """Wanda pruning on the calibration pipeline, in place."""
    from ..calib import walk_blocks

    calib = require_calib(ctx, "wanda")
    targets = block_sparsities(model, cfg, calib, ctx.progress)
    measured = {}

    def fn(bctx):
        for group in groups_of(bctx, cfg.sequential):
            norms = collect_inputs(bctx, group, _sum_squares)
            for name in group:
                lin = bctx.linears[name]
                W = arch.linear_weight(lin).detach()
                keep = make_mask(masks.wanda_scores(W.float(), norms[name].sqrt()), targets[bctx.index], cfg.pattern, cfg.scope)
                arch.set_linear_weight(lin, W * keep)
                measured[f"{bctx.name}.{name}"] = zeros_and_numel(arch.linear_weight(lin))

    walk_blocks(model, calib, fn, batch_size=cfg.batch_size, progress=ctx.progress and "wanda", dtype=calib_dtype_of(cfg))
    return summary(measured, targets if cfg.allocation != "uniform" else None)
