"""The allocation: a multiple-choice knapsack solved exactly as an integer program.

Each group ``g`` takes exactly one candidate ``c`` (binary ``x[g, c]``, ``sum_c x[g, c] = 1``); the
predicted KL is additive over groups (``sum s[g, c] x[g, c]``) and so are the bytes. The plan solves

    minimize  sum objective[g, c] x[g, c]   subject to   sum cost_k[g, c] x[g, c] <= limit_k  (each k)

with ``objective`` the predicted KL (a size target) or the bytes (a KL budget alone), and the
constraints the byte target and/or the KL budget. Why an integer program (HiGHS through
``scipy.optimize.milp``, gap 0) and not a dynamic program over the budget: the byte costs are
integers in the tens of millions whose common divisor is small, so an exact DP would need tens of
millions of states per group (a DP over rounded units is not exact), while HiGHS proves optimality
of a ~1,500-binary instance in well under a second. The optimum is checked against brute force on
small instances in the tests; the byte sum of the answer is re-checked in exact integers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from ..errors import InputError

Costs = Sequence[Sequence[float]]  # per group, per candidate


def _milp():
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:
        raise InputError("lmpress plan solves its allocation with scipy's integer programming (HiGHS): "
                         "pip install 'lmpress[plan]' (or pip install scipy)")
    return milp, LinearConstraint, Bounds


def solve(objective: Costs, constraints: Sequence[tuple[Costs, float]]) -> tuple[int, ...] | None:
    """The index of the chosen candidate per group minimising ``objective`` under ``constraints``
    (``(costs, limit)`` pairs, each ``sum cost <= limit``); None when no choice meets them."""
    milp, LinearConstraint, Bounds = _milp()
    sizes = [len(o) for o in objective]
    n = sum(sizes)
    starts = np.cumsum([0, *sizes])[:-1]
    one = np.zeros((len(sizes), n))
    for g, (s, k) in enumerate(zip(starts, sizes)):
        one[g, s : s + k] = 1.0
    cons = [LinearConstraint(one, 1.0, 1.0)]
    limits = list(constraints)
    for _ in range(4):  # re-check each limit in exact arithmetic; tighten by what floating point let through
        rows = [LinearConstraint(np.concatenate([np.asarray(c, float) for c in costs])[None], -np.inf, lim)
                for costs, lim in limits]
        res = milp(np.concatenate([np.asarray(o, float) for o in objective]), constraints=cons + rows,
                   integrality=np.ones(n), bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0})
        if res.x is None:
            return None
        x = np.round(res.x).reshape(-1)
        choice = tuple(int(np.argmax(x[s : s + k])) for s, k in zip(starts, sizes))
        over = [total(costs, choice) - lim for costs, lim in constraints]
        if all(o <= 0 for o in over):
            return choice
        limits = [(costs, lim - max(o, 0) - abs(lim) * 1e-9) for (costs, lim), o in zip(limits, over)]
    return None


def total(costs: Costs, choice: Sequence[int]) -> float:
    """``sum_g costs[g][choice[g]]`` (exact for integer costs)."""
    return sum(c[i] for c, i in zip(costs, choice))


def brute_force(objective: Costs, constraints: Sequence[tuple[Costs, float]]) -> tuple[int, ...] | None:
    """Every combination tried: the reference the tests hold :func:`solve` to (small instances only)."""
    best, best_val = None, None
    for choice in itertools.product(*(range(len(o)) for o in objective)):
        if all(total(c, choice) <= lim for c, lim in constraints):
            v = total(objective, choice)
            if best_val is None or v < best_val:
                best, best_val = choice, v
    return best


def front(score: Costs, cost: Costs, points: int = 24) -> list[tuple[float, float, tuple[int, ...]]]:
    """The predicted Pareto front: ``(cost, score, choice)`` of the least-score choice at ``points``
    cost limits spread from the cheapest to the most expensive choice."""
    lo = sum(min(c) for c in cost)
    hi = sum(max(c) for c in cost)
    out = []
    for lim in np.linspace(lo, hi, points):
        ch = solve(score, [(cost, float(lim))])
        if ch is not None:
            out.append((total(cost, ch), total(score, ch), ch))
    return out
