"""The batched kl estimator gives the scores of the straightforward one (each candidate switched into the
model's weights, the blocks re-run once per candidate), on every tiny layout, and the plan's choices
made from it do not change."""

import pytest
import torch
from tiny import KINDS, tiny_model

from lmpress.errors import InputError
from lmpress.planner import sensitivity as sn
from lmpress.planner.candidates import grid_candidates, layer_groups

RTOL = 1e-4  # relative: the stacked batch changes only the summation order of the matrix products


def straightforward_kl_scores(model, group, ref, sym=False):
    """The estimator as first written: one candidate at a time, written into the weights."""
    start = len(sn.arch.blocks(model)) if group.block is None else group.block
    out = []
    for ci, c in enumerate(group.candidates):
        if c.bits is None:
            out.append(0.0)
            continue
        with sn.switched(model, sn.group_specs([group], {group.name: ci}, sym)):
            out.append(sn.kl_from(model, ref, start))
    return out


def _setup(kind, rows=1, length=24):
    model = tiny_model(kind)
    groups = layer_groups(model, grid_candidates((2, 4, 8), (32, -1)))
    ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(1))
    return model, groups, sn.reference(model, ids, batch_size=2)


def _assert_close(new, old):
    assert len(new) == len(old)
    for a, b in zip(new, old):
        assert a == pytest.approx(b, rel=RTOL, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_scores_equal_the_straightforward_ones(kind):
    model, groups, ref = _setup(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for g in groups:
        new = sn.kl_scores(model, g, ref)
        assert any(s > 0 for s in new)
        _assert_close(new, straightforward_kl_scores(model, g, ref))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing written into the model


@pytest.mark.parametrize("sym", [False, True])
def test_stacks_split_by_the_logit_limit_and_several_batches_give_the_same_scores(monkeypatch, sym):
    model, groups, ref = _setup("llama", rows=3)  # batches of 2 and 1 rows
    whole = {g.name: sn.kl_scores(model, g, ref, sym) for g in groups}
    monkeypatch.setattr(sn, "MAX_LOGITS", 2 * ref.logp[0].numel() + 1)  # stacks of at most 2 candidates
    for g in groups:
        split = sn.kl_scores(model, g, ref, sym)
        _assert_close(split, whole[g.name])
        _assert_close(split, straightforward_kl_scores(model, g, ref, sym))


def test_kl_each_is_kl_to_per_candidate():
    g = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.randn(2, 5, 11, generator=g), -1)
    logp = torch.log_softmax(torch.randn(3 * 2, 5, 11, generator=g), -1)
    each = sn.kl_each(ref, logp.clone())
    assert each == [sn.kl_to(ref, logp[2 * k : 2 * k + 2]) for k in range(3)]
    assert sn.kl_to(ref, ref) == 0 and all(x > 0 for x in each)


def test_compressed_layers_are_refused_clearly():
    model, groups, ref = _setup("llama")
    name = groups[0].layers[0]
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, torch.nn.Identity())
    other = groups[1].layers[0]
    with pytest.raises(InputError, match=f"plain float linear layers, but {name} is a Identity"):
        with sn.per_candidate(model, {other: [torch.zeros(1, 1)], name: [torch.zeros(1, 1)]}):
            pass
    assert "forward" not in model.get_submodule(other).__dict__  # the other layer is left as it was


def test_a_forward_set_on_the_layer_is_restored():
    model, groups, ref = _setup("llama")
    m = model.get_submodule(groups[0].layers[0])
    m.forward = own = lambda x: x
    with sn.per_candidate(model, {groups[0].layers[0]: [torch.zeros(1, 1)]}):
        assert m.forward is not own
    assert m.forward is own


def test_planner_choices_do_not_change(tmp_path, monkeypatch):
    pytest.importorskip("scipy")
    from lmpress.planner import run
    from lmpress.planner.config import PlanConfig, parse_budget, parse_target

    model, groups, ref = _setup("llama", rows=2, length=32)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    cfg = PlanConfig(bits=(2, 4, 8), group_sizes=(32, -1), holdout_rows=2, holdout_len=32, fisher_rows=1,
                     kl_rows=1, kl_len=32, recipes=6, estimator="kl")
    fixed = run.fixed_bytes(model, groups)

    def choices():
        cache = run.Cache(PlanConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / str(len(picks)))}), "k")
        measured = run.measure(model, groups, ids, cfg, cache, progress=False)
        scale = run.assess(groups, measured)["estimators"]["kl"]["scale"]
        pred = run.predicted_kl(groups, measured, "kl", scale)
        return [run.allocate(groups, pred, parse_target(t) if t else None, fixed,
                             parse_budget(b).kl_guess(1.0) if b else None)
                for t, b in (("bits=3", None), ("bits=4.5", None), ("bits=6", None), (None, "kl=0.002"))]

    picks = []
    picks.append(choices())
    monkeypatch.setattr(run, "kl_scores", straightforward_kl_scores)
    picks.append(choices())
    assert picks[0] == picks[1] and len(set(map(tuple, picks[0]))) == 4


@pytest.mark.parametrize("n, most, size", [(12, 10, 6), (12, 12, 12), (12, 32, 12), (13, 4, 4), (1, 1, 1), (7, 3, 3)])
def test_even_split(n, most, size):
    assert sn.even_split(n, most) == size
