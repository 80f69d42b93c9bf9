"""The plan's ``kl`` sensitivity estimator, stacked (``lmpress.planner.sensitivity.kl_scores``) against the
straightforward one it replaced (each candidate written into the weights, the blocks re-run once per
candidate; kept in tests/test_plan_sensitivity.py as the tests' reference), on the default model.

    python bench/plan_kl_speed.py --groups model.layers.20.o,lm_head

Both run in one process on the plan's default kl slice (1 x 128 held-out tokens, the default grid), in
turns (old first for the 1st, 3rd, ... group, new first for the others), so a busy machine slows both
alike. Prints seconds per group and estimator, their ratio, and the largest relative score difference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
from common import environment  # noqa: E402
from test_plan_sensitivity import straightforward_kl_scores  # noqa: E402


def timed(f, *args) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    out = f(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    import lmpress
    from lmpress.data import DataConfig
    from lmpress.planner.candidates import grid_candidates, layer_groups
    from lmpress.planner.config import PlanConfig
    from lmpress.planner.run import holdout_ids
    from lmpress.planner.sensitivity import kl_scores, reference

    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", default="model.layers.5.q_k_v,model.layers.15.gate_up,model.layers.25.down,lm_head")
    args = ap.parse_args()
    model, tok = lmpress.load_model()
    cfg = PlanConfig()
    groups = layer_groups(model, grid_candidates(cfg.bits, cfg.group_sizes), cfg.head_bits)
    ref = reference(model, holdout_ids(tok, DataConfig(), cfg)[: cfg.kl_rows, : cfg.kl_len])
    wanted = args.groups.split(",")
    total = {"old": 0.0, "new": 0.0}
    print(environment())
    for k, g in enumerate(g for g in groups if g.name in wanted):
        runs = [("old", straightforward_kl_scores), ("new", kl_scores)]
        got, sec = {}, {}
        for name, f in runs if k % 2 == 0 else runs[::-1]:
            sec[name], got[name] = timed(f, model, g, ref, cfg.sym)
            total[name] += sec[name]
        rel = max(abs(a - b) / b for a, b in zip(got["new"], got["old"]) if b)
        print(f"{g.name:26s} old {sec['old']:6.1f} s  new {sec['new']:6.1f} s  {sec['old'] / sec['new']:.2f}x  "
              f"max rel diff {rel:.1e}", flush=True)
    print(f"total: old {total['old']:.1f} s, new {total['new']:.1f} s, {total['old'] / total['new']:.2f}x")


if __name__ == "__main__":
    main()
