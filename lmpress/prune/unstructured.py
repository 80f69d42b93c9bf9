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
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import arch, stats
from ..calib import CALIB_DTYPES
from ..errors import InputError
from . import masks
from .config import CalibratedPruneConfig, PruneConfig


@dataclass(frozen=True)
class MagnitudeConfig(PruneConfig):
    """Zero the smallest-magnitude weights of every block linear (options: :class:`PruneConfig`)."""

    method: ClassVar[str] = "magnitude"
    scope: str = "layer"  # compare within each "row" or the whole "layer"


@dataclass(frozen=True)
class WandaConfig(CalibratedPruneConfig):
    """Wanda: prune by |W| * ||x|| per output row (arXiv 2306.11695); options: :class:`CalibratedPruneConfig`."""

    method: ClassVar[str] = "wanda"
    scope: str = "row"  # compare within each "row" (the paper) or the whole "layer"


def make_mask(scores: Tensor, sparsity: float, pattern: str | None, scope: str) -> Tensor:
    """Keep-mask from scores: N:M when a pattern is given, else the top (1 - sparsity) by scope."""
    nm = masks.parse_pattern(pattern)
    return masks.nm_mask(scores, *nm) if nm else masks.topk_mask(scores, sparsity, scope)


def require_calib(ctx, method: str) -> Tensor:
    if ctx.calib is None:
        raise InputError(f"{method} needs calibration data: pass calibration token ids (RunContext.calib)")
    return ctx.calib


# ---- plumbing shared with SparseGPT -------------------------------------------------------


def input_norms(bctx, names: list[str]) -> dict[str, Tensor]:
    """``{name: Σ x²}`` (in,) over the calibration rows of each named linear's input (Wanda's ``||X_j||²``)."""
    return {n: st.sq_sum for n, st in stats.collect(bctx, names, lambda: stats.InputStats("sq")).items()}


def groups_of(bctx, sequential: bool) -> list[list[str]]:
    """Groups of linears pruned together: the true-sequential groups, or the whole block."""
    return bctx.groups if sequential else [[n for g in bctx.groups for n in g]]


def block_sparsities(model, cfg, calib: Tensor, progress) -> list[float]:
    """One sparsity per block: uniform, or allocated from one pass over the dense model (OWL's
    Wanda-score outlier ratios, or each block's output error when pruned alone)."""
    n_blocks = len(arch.blocks(model))
    allocation = cfg.allocation
    if allocation == "uniform":
        return [cfg.sparsity] * n_blocks
    from ..calib import walk_blocks

    measure = _outlier_ratio if allocation == "owl" else _pruned_output_error
    scores = torch.zeros(n_blocks)

    def fn(bctx):
        scores[bctx.index] = measure(bctx, input_norms(bctx, list(bctx.linears)), cfg)

    walk_blocks(model, calib, fn, batch_size=cfg.batch_size, progress=progress and f"{allocation} allocation",
                dtype=CALIB_DTYPES[cfg.calib_dtype])
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
            norms = input_norms(bctx, group)
            for name in group:
                lin = bctx.linears[name]
                W = arch.linear_weight(lin).detach()
                keep = make_mask(masks.wanda_scores(W.float(), norms[name].sqrt()), targets[bctx.index], cfg.pattern, cfg.scope)
                arch.set_linear_weight(lin, W * keep)
                measured[f"{bctx.name}.{name}"] = zeros_and_numel(arch.linear_weight(lin))

    walk_blocks(model, calib, fn, batch_size=cfg.batch_size, progress=ctx.progress and "wanda",
                dtype=CALIB_DTYPES[cfg.calib_dtype])
    return summary(measured, targets if cfg.allocation != "uniform" else None)
