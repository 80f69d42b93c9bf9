"""Low-rank factorization of the block linears: plain SVD, ASVD and SVD-LLM.

Every dense linear layer inside the decoder blocks is replaced by a
:class:`~lmpress.lowrank.layers.LowRankLinear` (``W ≈ U V``) whose rank comes from a global
parameter budget (``ratio`` of the block linears' parameters, or the cost of one ``rank`` in every
layer), split over the layers by ``allocation``:

* ``energy`` (default): greedy on each layer's spectrum, buying the singular values with the largest
  share of their layer's energy per parameter (:func:`lmpress.lowrank.factor.allocate_ranks`). For
  SVD that is the weight spectrum; for ASVD the spectrum of ``W diag(s)``; for SVD-LLM the whitened
  spectrum, whose squares are the output errors on the calibration inputs, so the budget goes where
  the estimated relative output error drops most. Activation-aware methods measure these spectra in
  one extra pass of the calibration pipeline over the uncompressed model.
* ``uniform``: every layer keeps the same fraction of its parameters.

A layer whose rank would hold as many parameters as the dense matrix stays dense.

Methods (names as in the recipe registry)::

    - method: svd        # Eckart-Young truncation of W, no calibration
      ratio: 0.8
    - method: asvd       # ASVD (arXiv 2312.05821): SVD of W diag(mean|x|^alpha)
      ratio: 0.8
    - method: svd-llm    # SVD-LLM (arXiv 2403.07378): SVD of W S, S S^T = X^T X (Cholesky)
      ratio: 0.8

The activation-aware methods walk the blocks with :func:`lmpress.calib.walk_blocks`, factor each
group of linears that share an input in execution order from statistics of the inputs produced by
the already-factored layers (true-sequential), so later layers correct for earlier truncations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .. import arch, stats
from ..errors import InputError
from . import factor
from .layers import DenseSparseLinear, LowRankLinear

ALLOCATIONS = ("energy", "uniform")


def _check_budget(cfg, default_ratio: float = 0.8) -> None:
    if cfg.ratio is not None and cfg.rank is not None:
        raise ValueError("give ratio or rank, not both")
    if cfg.ratio is None and cfg.rank is None:
        object.__setattr__(cfg, "ratio", default_ratio)
    if cfg.ratio is not None and not (isinstance(cfg.ratio, (int, float)) and 0 < cfg.ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1] (the fraction of the block linears' parameters kept, e.g. 0.8), got {cfg.ratio!r}")
    if cfg.rank is not None and not (isinstance(cfg.rank, int) and cfg.rank >= 1):
        raise ValueError(f"rank must be a positive integer, got {cfg.rank!r}")
    if cfg.allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {cfg.allocation!r}")
    if not (isinstance(cfg.rank_multiple, int) and cfg.rank_multiple >= 1):
        raise ValueError(f"rank_multiple must be a positive integer, got {cfg.rank_multiple!r}")
    if cfg.rank is not None and cfg.rank % cfg.rank_multiple:
        raise ValueError(f"rank {cfg.rank} is not a multiple of rank_multiple {cfg.rank_multiple}")


@dataclass(frozen=True)
class SVDConfig:
    """Plain truncated SVD of each block linear (no calibration data).

    ratio: fraction of the block linears' parameters kept, in (0, 1]; default 0.8 when neither
        ratio nor rank is given.
    rank: instead of ratio, the budget of giving every layer this rank (dense where it would not save).
    allocation: ``energy`` (per-layer ranks from the spectra) or ``uniform`` (same fraction everywhere).
    rank_multiple: every rank is a multiple of this; set it to the group size of a quantization step
        that follows (its groups split the factor ``U``'s r input columns).
    """

    family: ClassVar[str] = "lowrank"
    method: ClassVar[str] = "svd"
    needs_calibration: ClassVar[bool] = False
    ratio: float | None = None
    rank: int | None = None
    allocation: str = "energy"
    rank_multiple: int = 1

    def __post_init__(self):
        _check_budget(self)


@dataclass(frozen=True)
class ASVDConfig(SVDConfig):
    """ASVD (arXiv 2312.05821): truncate the SVD of ``W diag(s)``, ``s_j = mean|x_j|^alpha``.

    alpha: exponent of the activation scaling (the paper's 0.5).
    """

    method: ClassVar[str] = "asvd"
    needs_calibration: ClassVar[bool] = True
    alpha: float = 0.5

    def __post_init__(self):
        _check_budget(self)
        if not 0 < self.alpha <= 2:
            raise ValueError(f"alpha must be in (0, 2], got {self.alpha}")


@dataclass(frozen=True)
class SVDLLMConfig(SVDConfig):
    """SVD-LLM (arXiv 2403.07378): truncation-aware whitening by the Cholesky factor of ``X^T X``.

    damp: ``λ = damp · mean(diag X^T X)`` added to the diagonal before the Cholesky factorization.
    """

    method: ClassVar[str] = "svd-llm"
    needs_calibration: ClassVar[bool] = True
    damp: float = 1e-4

    def __post_init__(self):
        _check_budget(self)
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")


# ---- plumbing shared with dsformer.py --------------------------------------------------------


def dense_targets(model: nn.Module, method: str) -> dict[str, nn.Module]:
    """The block linears to factor: dense ``nn.Linear``/``Conv1D`` layers, not factors of earlier steps."""
    out = {}
    for name, m in arch.compressible_linears(model).items():
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(parent, (LowRankLinear, DenseSparseLinear)):
            continue  # a factor of an earlier low-rank step
        if not arch.is_dense_linear(m):
            raise InputError(f"{method}: layer {name} is already compressed (kind {getattr(m, 'kind', type(m).__name__)!r}); "
                             "put the low-rank step before quantization or pruning in the recipe")
        out[name] = m
    if not out:
        raise InputError(f"{method}: the model has no dense linear layers left to factor")
    return out


def shape_of(m: nn.Module) -> tuple[int, int]:
    return tuple(arch.linear_weight(m).shape)  # (out, in)


def bias_of(m: nn.Module) -> Tensor | None:
    return None if getattr(m, "bias", None) is None else m.bias.detach()


def budget_ranks(cfg, shapes: list[tuple[int, int]], spectra: list[Tensor] | None) -> list[int]:
    """Per-layer ranks for ``cfg.ratio`` or ``cfg.rank`` under ``cfg.allocation``."""
    m, dense = getattr(cfg, "rank_multiple", 1), sum(o * i for o, i in shapes)
    if cfg.rank is not None:
        per_layer = [min(cfg.rank, factor.dense_rank(o, i)) for o, i in shapes]
        if cfg.allocation == "uniform":
            return per_layer
        budget = factor.factored_params(per_layer, shapes)
    else:
        budget = int(cfg.ratio * dense)
    floor = factor.factored_params([m] * len(shapes), shapes)
    if budget < floor:
        raise InputError(f"ratio {cfg.ratio} is too small: rank {m} in every layer already keeps "
                         f"{floor / dense:.4f} of the parameters; use a larger ratio")
    return factor.allocate_ranks(spectra or [], shapes, budget, cfg.allocation, m)


def _second_moment() -> stats.InputStats:
    """``Σ x^T x`` and ``Σ|x|`` of a group's inputs, summed in float64 (SVD-LLM whitens with it)."""
    return stats.InputStats("xtx", "abs", dtype=torch.float64)


def walk_groups(model, calib, visit: Callable[[str, list[str], dict, stats.InputStats], None], *, progress=True,
                label="blocks"):
    """Walk the blocks; per group of target linears sharing an input (execution order), collect the
    group's input statistics (``xtx``, ``abs``) with the current (possibly already changed) block and
    call ``visit(block_name, names, linears, st)``. ``visit`` may replace the group's layers.
    """
    from ..calib import walk_blocks

    if calib is None:
        raise InputError("this method needs calibration data (RunContext.calib); run it through lmpress.api.compress or pass calib ids")

    def fn(ctx):
        for group in ctx.groups:
            linears = ctx.linears
            names = [n for n in group if n in linears and _is_dense(ctx.block, n, linears[n])]
            if not names:
                continue
            visit(ctx.name, names, linears, stats.collect(ctx, names, _second_moment)[names[0]])

    walk_blocks(model, calib, fn, progress=label if progress else False)


def _is_dense(block: nn.Module, name: str, m: nn.Module) -> bool:
    parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
    return arch.is_dense_linear(m) and not isinstance(parent, (LowRankLinear, DenseSparseLinear))


# ---- the methods -------------------------------------------------------------------------------


def _scaling(cfg, st: stats.InputStats | None) -> tuple[Tensor | None, float | None]:
    """The right scaling S of each method: None (SVD), a vector (ASVD), a Cholesky factor (SVD-LLM),
    and the dampening used (SVD-LLM: raised above ``cfg.damp`` where X^T X is not positive definite)."""
    if cfg.method == "svd":
        return None, None
    if cfg.method == "asvd":
        return factor.asvd_scaling(st.mean_abs, cfg.alpha), None
    return stats.damped_cholesky(st.xtx, cfg.damp, method="SVD-LLM")


def _replace(model, name: str, m: nn.Module, S: Tensor | None, r: int) -> dict:
    W = arch.linear_weight(m).detach()
    o, i = W.shape
    if r >= factor.dense_rank(o, i):
        return {"rank": None, "rel_error": 0.0}
    U, V, sigma = factor.truncate_with_spectrum(W, S, r)
    e = sigma.double() ** 2
    arch.set_module(model, name, LowRankLinear.from_factors(U, V, bias_of(m)))
    return {"rank": r, "rel_error": float(e[r:].sum() / e.sum().clamp_min(1e-30))}


def svd_(model: nn.Module, cfg: SVDConfig, ctx) -> dict:
    """Factor every block linear in place (SVD, ASVD or SVD-LLM, by ``cfg``); returns per-layer ranks
    and relative errors (weight error for SVD, output error on the calibration inputs otherwise).
    """
    from ..calib import each_block

    targets = dense_targets(model, cfg.method)
    names, shapes = list(targets), [shape_of(m) for m in targets.values()]
    spectra = None
    if cfg.allocation == "energy":
        spectra = layer_spectra(model, cfg, ctx, targets)
    ranks = dict(zip(names, budget_ranks(cfg, shapes, [spectra[n] for n in names] if spectra else None)))
    layers: dict[str, dict] = {}
    raised: dict[str, float] = {}
    if cfg.method == "svd":  # block by block (a streamed model's blocks are read in turn)
        def per_block(prefix, block):
            for n, m in arch.block_linears(block).items():
                if f"{prefix}.{n}" in ranks:
                    layers[f"{prefix}.{n}"] = _replace(model, f"{prefix}.{n}", m, None, ranks[f"{prefix}.{n}"])

        each_block(model, per_block, progress=cfg.method if ctx.progress else False)
    else:
        def visit(block_name, group, linears, st):
            S, used = _scaling(cfg, st)  # one per group: its linears share the input
            for n in group:
                full = f"{block_name}.{n}"
                layers[full] = _replace(model, full, linears[n], S, ranks[full])
                if used is not None and used > cfg.damp:
                    raised[full] = used

        walk_groups(model, ctx.calib, visit, progress=ctx.progress, label=cfg.method)
    out = summary(layers, dict(zip(names, shapes)))
    if raised:  # X^T X was not positive definite at the configured dampening: say so
        out["dampening_raised"] = raised
    return out


def asvd_(model: nn.Module, cfg: ASVDConfig, ctx) -> dict:
    return svd_(model, cfg, ctx)


def svd_llm_(model: nn.Module, cfg: SVDLLMConfig, ctx) -> dict:
    return svd_(model, cfg, ctx)


def layer_spectra(model, cfg, ctx, targets: dict[str, nn.Module]) -> dict[str, Tensor]:
    """Singular values of ``W S`` per target layer, S from the inputs of the model as it is now (one
    calibration pass that changes nothing), or of ``W`` for plain SVD.

    Within one run (one ``RunContext``) they are kept in ``ctx.extra["lowrank.spectra"]`` by method
    and scaling option, so several ratios of the same method (or DSFormer after SVD-LLM) on copies of
    the same model measure them once; layers not found there are measured again.
    """
    if cfg.method == "svd":
        return {n: factor.spectrum(arch.linear_weight(m).detach()) for n, m in targets.items()}
    cache = ctx.extra.setdefault("lowrank.spectra", {})
    key = (cfg.method, getattr(cfg, "alpha", None), getattr(cfg, "damp", None))
    known = cache.get(key, {})
    if all(n in known and known[n].shape[0] == min(shape_of(m)) for n, m in targets.items()):
        return known
    out = {}

    def visit(block_name, group, linears, st):
        S, _ = _scaling(cfg, st)
        for n in group:
            out[f"{block_name}.{n}"] = factor.spectrum(arch.linear_weight(linears[n]).detach(), S)

    walk_groups(model, ctx.calib, visit, progress=ctx.progress, label=f"{cfg.method} spectra")
    cache[key] = out
    return out


def summary(layers: dict[str, dict], shapes: dict[str, tuple[int, int]]) -> dict:
    """Figures for the report: parameters before/after, kept fraction, per-layer rank and error."""
    dense = sum(o * i for o, i in shapes.values())
    kept = sum(v.get("params", o * i if v["rank"] is None else v["rank"] * (o + i)) for v, (o, i) in
               ((layers[n], shapes[n]) for n in layers))
    errs = [v["rel_error"] for v in layers.values()]
    return {"params_dense": dense, "params_kept": kept, "kept_fraction": kept / dense,
            "layers_factored": sum(v["rank"] is not None for v in layers.values()), "layers": len(layers),
            "mean_rel_error": sum(errs) / len(errs), "per_layer": layers}
