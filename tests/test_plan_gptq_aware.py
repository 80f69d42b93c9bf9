"""The plan's GPTQ correction: each (group, candidate) score is scaled by GPTQ's output error over
round-to-nearest's under the group's Hessian, measured on sampled rows that give GPTQ's exact rows."""

import pytest
import torch
from tiny import tiny_model

from lmpress import arch
from lmpress.errors import InputError
from lmpress.planner import gptq_aware as ga
from lmpress.planner.candidates import grid_candidates, layer_groups
from lmpress.planner.config import PlanConfig
from lmpress.quant.gptq import GPTQConfig, gptq_solve, inverse_hessian
from lmpress.quant.grid import GridSpec, dequantize


def test_sample_rows_are_even_unique_and_all_when_few():
    assert ga.sample_rows(5, 128).tolist() == [0, 1, 2, 3, 4]
    r = ga.sample_rows(1000, 10)
    assert len(r) == 10 and r[0] == 0 and r[-1] == 999 and bool((r.diff() > 0).all())


def _correlated_hessian(cols, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    return 2.0 * X.T @ X / n


@pytest.mark.parametrize("spec", [GridSpec(4, 32), GridSpec(3, -1), GridSpec(2, 32, True)])
def test_gptq_on_sampled_rows_is_gptq_on_all_rows_restricted(spec):
    """GPTQ solves rows independently (act-order, static groups, clip search per row): the sampled rows'
    result is the whole solve's, so the ratio on a sample is exact for those rows."""
    g = torch.Generator().manual_seed(1)
    W, H = torch.randn(40, 64, generator=g), _correlated_hessian(64)
    hinv = inverse_hessian(H, 0.01, True)
    rows = ga.sample_rows(40, 7)
    whole = dequantize(*gptq_solve(W, hinv, spec, clip_search=True))[rows]
    part = dequantize(*gptq_solve(W[rows], hinv, spec, clip_search=True))
    assert torch.equal(whole, part)


def test_ratios_are_gptq_error_over_rtn_error_and_below_one_at_low_bits():
    model = tiny_model("llama")
    groups = layer_groups(model, grid_candidates((2, 4, 8), (32, -1)))
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(3))
    seen = []
    ratios = ga.gptq_ratios(model, ids, groups, GPTQConfig(), rows=8, on_group=lambda n, r: seen.append(n))
    blocks = [g for g in groups if g.block is not None]
    assert sorted(ratios) == sorted(seen) == sorted(g.name for g in blocks)  # the head keeps RTN: no factor
    for g in blocks:
        r = ratios[g.name]
        assert len(r) == len(g.candidates)
        for c, x in zip(g.candidates, r):
            assert x == 1.0 if c.bits is None else 0 < x
            if c.bits == 2:
                assert x < 1.0, (g.name, c.label, x)  # error feedback lowers the output error at 2 bits
    # by hand for one group: the Hessian of its input on the float model, the same sampled rows
    g = blocks[0]
    Hs = {}

    def grab(name):
        def hook(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            Hs.setdefault(name, []).append(x)
        return hook
    h = model.get_submodule(g.layers[0]).register_forward_pre_hook(grab(g.layers[0]))
    with torch.no_grad():
        for b in range(0, 4, 8):
            model(ids[b : b + 8])
    h.remove()
    X = torch.cat(Hs[g.layers[0]])
    H = 2.0 * X.T @ X / X.shape[0]
    W = torch.cat([arch.linear_weight(model.get_submodule(n)).detach().float()[ga.sample_rows(
        arch.linear_weight(model.get_submodule(n)).shape[0], 8)] for n in g.layers])
    hinv = inverse_hessian(H, 0.01, True)
    for ci, c in enumerate(g.candidates):
        if c.bits is None:
            continue
        q, s, z = gptq_solve(W, hinv, c.spec(), clip_search=True)
        want = ga.output_error(W, dequantize(q, s, z), H) / ga.output_error(W, ga.rtn_weight(W, c.spec()), H)
        assert ratios[g.name][ci] == pytest.approx(want, rel=1e-3)


def test_done_groups_are_skipped():
    model = tiny_model("llama")
    groups = layer_groups(model, grid_candidates((4,), (32,)))
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    first = ga.gptq_ratios(model, ids, groups, rows=4)
    done = {k: v for k, v in first.items() if not k.startswith("model.layers.1.")}
    seen = []
    again = ga.gptq_ratios(model, ids, groups, rows=4, done=done, on_group=lambda n, r: seen.append(n))
    assert again == first and seen and all(n.startswith("model.layers.1.") for n in seen)


def test_quantizer_must_be_known():
    with pytest.raises(InputError, match="quantizer must be gptq or rtn"):
        PlanConfig(quantizer="awq")
    with pytest.raises(InputError, match="ratio_rows"):
        PlanConfig(ratio_rows=0)
