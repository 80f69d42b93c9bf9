"""The allocation solver: its optimum equals brute force on small random instances."""

import random

import pytest

pytest.importorskip("scipy")

from lmpress.planner.solve import brute_force, solve, total


def _instance(rng, groups, cands):
    score = [[rng.random() * 10 for _ in range(rng.randint(2, cands))] for _ in range(groups)]
    cost = [[rng.randint(1, 10_000_000) for _ in s] for s in score]
    return score, cost


@pytest.mark.parametrize("seed", range(25))
def test_min_score_under_bytes_matches_brute_force(seed):
    rng = random.Random(seed)
    score, cost = _instance(rng, rng.randint(1, 5), 4)
    lim = rng.uniform(sum(min(c) for c in cost), sum(max(c) for c in cost))
    got, want = solve(score, [(cost, lim)]), brute_force(score, [(cost, lim)])
    assert (got is None) == (want is None)
    assert total(cost, got) <= lim
    assert total(score, got) == pytest.approx(total(score, want), rel=1e-12)


@pytest.mark.parametrize("seed", range(15))
def test_min_bytes_under_score_and_both_limits(seed):
    rng = random.Random(100 + seed)
    score, cost = _instance(rng, rng.randint(1, 5), 4)
    k = rng.uniform(sum(min(s) for s in score), sum(max(s) for s in score))
    got, want = solve(cost, [(score, k)]), brute_force(cost, [(score, k)])
    assert total(cost, got) == total(cost, want) and total(score, got) <= k
    b = rng.uniform(sum(min(c) for c in cost), sum(max(c) for c in cost))
    got, want = solve(score, [(cost, b), (score, k)]), brute_force(score, [(cost, b), (score, k)])
    assert (got is None) == (want is None)
    if got is not None:
        assert total(score, got) == pytest.approx(total(score, want), rel=1e-12)


def test_infeasible_gives_none():
    assert solve([[1.0, 2.0]], [([[10, 20]], 5)]) is None
