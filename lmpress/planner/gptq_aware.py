"""Sensitivities of GPTQ's solution, not of round-to-nearest: one correction factor per (group, candidate).

The estimators of :mod:`.sensitivity` switch a group to its candidate by round-to-nearest (RTN), but
the plan is confirmed (and shipped) with GPTQ, and GPTQ's error feedback helps some settings far more
than others: on the default model uniform GPTQ has 0.49x the KL of RTN at 4 bits in groups of 64,
0.38x at 3 bits, 0.19x at 2 bits, but 0.60x at 4 bits per channel (BENCHMARKS.md, quantization). An
allocation made on RTN scores overrates the settings GPTQ helps least.

A layer's contribution to the output error is, to second order, the quadratic form of its weight error
in its inputs' Hessian, ``E(W') = tr((W' - W) H (W' - W)^T)`` with ``H = 2/n X^T X`` (GPTQ's own
objective). For each (group, candidate) the factor is

    r = E(GPTQ's W') / E(round-to-nearest W')

over the group's layers, with ``H`` from the float model's inputs on the GPTQ calibration rows, GPTQ
as the confirmation runs it (act-order, clip search, damp 0.01), on an evenly spaced sample of each
layer's output rows (GPTQ solves rows independently: a sampled row's result is exact). The plan then
predicts ``score x r``: the estimator's KL of the RTN switch, scaled by how much less output error
GPTQ leaves with that setting on that group. The output head is quantized by round-to-nearest in the
confirmation too (its factor is 1).
"""

from __future__ import annotations

import torch

from .. import arch, stats
from ..quant.gptq import GPTQConfig, gptq_solve, inverse_hessian
from ..quant.grid import dequantize
from .candidates import Group
from .sensitivity import rtn_weight


def output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((Wq - W) H (Wq - W)^T)``: the summed squared output error over the inputs whose Hessian is H."""
    D = Wq - W
    return float(((D @ H) * D).sum())


def sample_rows(n: int, most: int) -> torch.Tensor:
    """At most ``most`` evenly spaced row indices of ``n`` (all of them when ``n <= most``)."""
    if n <= most:
        return torch.arange(n)
    return torch.linspace(0, n - 1, most).round().long().unique()


def gptq_ratios(model, calib: torch.Tensor, groups: list[Group], cfg: GPTQConfig | None = None, *,
                rows: int = 128, sym: bool = False, dtype=None, progress: bool = False,
                done: dict | None = None, on_group=None) -> dict[str, list[float]]:
    """Group name -> :func:`group_ratios` of every block group, in one calibration pass over ``calib``
    (n, L) on the float model (each block's Hessians live only while its block is visited). ``done``:
    groups already measured (skipped; an interrupted run resumes); ``on_group(name, ratios)`` is
    called after each group."""
    from ..calib import walk_blocks
    from ..quant.gptq import _sweep_threads

    cfg = cfg or GPTQConfig()
    out = dict(done or {})
    by_block: dict[int, list[Group]] = {}
    for g in groups:
        if g.block is not None and g.name not in out:
            by_block.setdefault(g.block, []).append(g)

    def per_block(bctx):
        mine = by_block[bctx.index]
        first = {g.name: g.layers[0].split(f"{bctx.name}.", 1)[1] for g in mine}
        st = stats.collect(bctx, list(first.values()), lambda: stats.InputStats("xtx", upcast=False))
        for g in mine:
            H = st[first[g.name]].hessian.float()
            with _sweep_threads(True) as kernel:
                out[g.name] = group_ratios(model, g, H, cfg, rows, sym, kernel)
            if on_group is not None:
                on_group(g.name, out[g.name])

    if by_block:
        walk_blocks(model, calib, per_block, progress="gptq ratios" if progress else False,
                    blocks_to_visit=sorted(by_block), dtype=dtype)
    return out


def group_ratios(model, group: Group, H: torch.Tensor, cfg: GPTQConfig, rows: int = 128,
                 sym: bool = False, kernel: bool = True) -> list[float]:
    """``r`` of every candidate of ``group`` (1 for float): GPTQ's output error over round-to-nearest's,
    on at most ``rows`` sampled rows of each layer."""
    Ws = []
    for name in group.layers:
        w = arch.linear_weight(model.get_submodule(name)).detach().float()
        Ws.append(w[sample_rows(w.shape[0], rows)])
    W = torch.cat(Ws)
    hinv = inverse_hessian(H, cfg.damp, cfg.act_order)
    out = []
    for c in group.candidates:
        if c.bits is None:
            out.append(1.0)
            continue
        spec = c.spec(sym)
        q, s, z = gptq_solve(W, hinv, spec, block_size=cfg.block_size, clip_search=cfg.clip_search, kernel=kernel)
        e_rtn = output_error(W, rtn_weight(W, spec), H)
        out.append(output_error(W, dequantize(q, s, z), H) / e_rtn if e_rtn > 0 else 1.0)
    return out
