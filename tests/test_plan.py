"""lmpress plan on a tiny model: exact bytes, budgets met after confirmation, the recipe replays to the
same model, cached re-plans, clear errors for bad budgets."""

import json

import pytest
import torch
from test_cli import _tok
from tiny import tiny_model

pytest.importorskip("scipy")

from lmpress.api import compress
from lmpress.data import DataConfig
from lmpress.errors import InputError
from lmpress.evaluate import tensor_bytes
from lmpress.io import load_model, save_model
from lmpress.planner.candidates import Candidate, grid_candidates, layer_groups, quant_bytes
from lmpress.planner.config import PlanConfig, parse_budget, parse_target
from lmpress.planner.confirm import recipe_for
from lmpress.planner.run import plan, spearman
from lmpress.recipe import load_recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    tok = _tok(tmp)
    src = save_model(tiny_model("llama"), tmp / "src", tokenizer=tok)
    corpus = tmp / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    corpus.write_text("\n\n".join(" ".join(f"w{int(i)}" for i in torch.randint(0, 200, (60,), generator=g))
                                  for _ in range(300)))
    data = DataConfig(corpus=str(corpus), calib_samples=4, calib_len=32, eval_tokens=256)
    cfg = PlanConfig(bits=(2, 4, 8), group_sizes=(32, -1), holdout_rows=2, holdout_len=32, fisher_rows=1, kl_rows=1,
                     kl_len=32, recipes=4, cache_dir=str(tmp / "cache"))
    return tmp, src, data, cfg


def _plan(setup, name, **kw):
    tmp, src, data, cfg = setup
    model, tok = load_model(src)
    return plan(model, tokenizer=tok, data=data, config=cfg, out=tmp / name, progress=False, context=32, **kw)


def test_bytes_are_exact_for_every_candidate(llama):
    from lmpress.quant.grid import GridSpec
    from lmpress.quant.qlinear import QuantLinear

    groups = layer_groups(llama, grid_candidates((2, 3, 4, 8), (32, 64, -1)))
    assert [g.kind for g in groups[:4]] == ["q_k_v", "o", "gate_up", "down"] and groups[-1].kind == "head"
    for g in groups[:4]:
        for c, b in zip(g.candidates, g.bytes):
            if c.bits is None:
                assert b == sum(4 * o * i for o, i in g.shapes)
                continue
            mods = [QuantLinear.from_codes(torch.zeros(o, i, dtype=torch.uint8), torch.ones(o, i // (i if c.group_size == -1 else c.group_size)),
                                           torch.zeros(o, i // (i if c.group_size == -1 else c.group_size)), GridSpec(c.bits, c.group_size))
                    for o, i in g.shapes]
            assert b == sum(tensor_bytes(m) for m in mods)
    assert groups[-1].bytes[0] == 0  # tied head kept float: shares the embedding
    assert quant_bytes(10, 64, Candidate(4, 32), bias=True, float_size=4) == 10 * 32 + 2 * 2 * 10 * 2 + 40


def test_target_is_met_exactly_and_recipe_replays_to_identical_model(setup):
    tmp, src, data, cfg = setup
    res = _plan(setup, "bits", target="bits=4.5")
    last = res["rounds"][-1]
    assert res["met"] and last["bits"] <= 4.5 and last["tensor_bytes"] == last["bytes"]  # planned bytes are the model's
    out = tmp / "bits"
    assert {"recipe.yaml", "report.md", "report.html", "plan.json", "front.svg", "allocation.svg"} <= {p.name for p in out.iterdir()}
    assert "<svg" in (out / "report.html").read_text()
    saved, _ = load_model(out)
    model, tok = load_model(src)
    again, _ = compress(model, load_recipe(out / "recipe.yaml"), tok, data=data, measure=False, progress=False)
    a, b = saved.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert tensor_bytes(again) == last["bytes"]


def test_kl_budgets_are_met_after_confirmation_and_replans_use_the_cache(setup):
    first = _plan(setup, "kl1", budget="kl=0.002")
    assert first["met"] and first["rounds"][-1]["kl"] <= 0.002
    for i, b in enumerate(("kl=0.0005", "ppl=+1%")):
        res = _plan(setup, f"kl{i + 2}", budget=b)
        assert res["seconds"]["cached"]  # measured sensitivities reused
        assert res["original"]["cached"] and res["original"]["nll"] == first["original"]["nll"]  # and the original's figures
        last = res["rounds"][-1]
        assert res["met"]
        if b.startswith("kl"):
            assert last["kl"] <= 0.0005
        else:
            assert last["perplexity"] <= res["original"]["perplexity"] * 1.01
    both = _plan(setup, "both", budget="kl=0.002", target="bits=5")
    assert both["met"] and both["rounds"][-1]["bits"] <= 5 and both["rounds"][-1]["kl"] <= 0.002


def test_estimators_are_ranked_against_measured_recipes(setup):
    res = json.loads((setup[0] / "bits" / "plan.json").read_text())
    assert set(res["estimators"]) == {"fisher", "kl"}
    best = max(q["spearman"] for q in res["estimators"].values())
    assert res["estimators"][res["estimator"]]["spearman"] == best  # ties go to kl, the direct measurement
    assert all(q["spearman"] > 0.5 for q in res["estimators"].values())  # both rank tiny-model recipes
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)


def test_a_chosen_estimator_is_used_even_when_the_cache_holds_both(setup):
    from dataclasses import replace

    tmp, src, data, cfg = setup
    model, tok = load_model(src)
    res = plan(model, tokenizer=tok, data=data, config=replace(cfg, estimator="fisher"), target="bits=4.5",
               progress=False, context=32)
    assert res["seconds"]["cached"] and set(res["estimators"]) == {"fisher", "kl"}
    assert res["estimator"] == "fisher" and res["met"]


@pytest.mark.parametrize("text", ["kl=-1", "kl=0", "ppl=5", "kl=abc", "acc=1", "kl=+0.1%"])
def test_bad_budgets_are_input_errors(text):
    with pytest.raises(InputError, match="bad budget"):
        parse_budget(text)


@pytest.mark.parametrize("text", ["bits=1", "bits=40", "size=-3MB", "size=10XB", "speed=3"])
def test_bad_targets_are_input_errors(text):
    with pytest.raises(InputError, match="bad target"):
        parse_target(text)


def test_budget_and_target_parse():
    assert parse_budget("ppl=+5%").limit_ppl(10.0) == pytest.approx(10.5)
    assert parse_target("size=100MB").value == 100e6 and parse_target("bits=4.5").value == 4.5


def test_nothing_meets_says_so_with_the_nearest_points(setup):
    with pytest.raises(InputError, match="nothing meets .*smallest plan"):
        _plan(setup, "none", target="bits=2.0", budget="kl=1e-9")


def test_plan_needs_a_budget_or_target_and_checks_output_first(setup):
    tmp = setup[0]
    with pytest.raises(InputError, match="give a budget"):
        _plan(setup, "x")
    (tmp / "exists").mkdir(exist_ok=True)
    with pytest.raises(InputError, match="already exists"):
        _plan(setup, "exists", target="bits=4")


def test_recipe_for_makes_each_groups_choice(llama):
    groups = layer_groups(llama, grid_candidates((2, 4, 8), (32, -1)))
    choice = [(i * 7) % len(g.candidates) for i, g in enumerate(groups)]
    cfg = recipe_for(groups, choice)[0]
    for g, ci in zip(groups, choice):
        c = g.candidates[ci]
        if g.block is None:
            assert cfg.head_bits == c.bits and (c.bits is None or cfg.group_size == c.group_size)
            continue
        for n in g.layers:
            spec = cfg.layer_grid(n)
            assert (spec is None) if c.bits is None else (spec.bits, spec.group_size) == (c.bits, c.group_size)


def test_cli_plan(setup, capsys):
    from lmpress.cli import main

    tmp, src, data, cfg = setup
    argv = ["plan", str(src), "--target", "bits=4", "--data", data.corpus, "--eval-tokens", "256", "--context", "32",
            "--calib-samples", "4", "--calib-len", "32", "-o", str(tmp / "cli"),
            "--set", "bits=[2,4,8]", "--set", "group_sizes=[32,-1]", "--set", "holdout_rows=2", "--set", "fisher_rows=1", "--set", "kl_rows=1", "--set", "holdout_len=32",
            "--set", "kl_len=32", "--set", "recipes=4", "--set", f"cache_dir={tmp / 'cache'}"]
    assert main(argv) == 0
    assert "met: bits=4" in capsys.readouterr().out
    assert main(["plan", str(src), "--budget", "kl=-2", "-o", str(tmp / "bad")]) == 2
    assert "bad budget" in capsys.readouterr().err


def test_interrupted_measurement_resumes_where_it_stopped(setup):
    from lmpress.planner.run import Cache, cache_key, holdout_ids, measure

    tmp, src, data, cfg = setup
    _plan(setup, "first", target="bits=4")  # fills the cache (or finds it filled)
    model, tok = load_model(src)
    groups = layer_groups(model, grid_candidates(cfg.bits, cfg.group_sizes), cfg.head_bits)
    cache = Cache(cfg, cache_key(model, holdout_ids(tok, data, cfg), groups, cfg))
    full = json.loads(json.dumps(cache.data))
    gone = list(cache.data["kl"])[-3:]
    for g in gone:  # as if killed three groups before the end of the kl estimator and before the recipes
        del cache.data["kl"][g]
    del cache.data["recipes"][2:]
    measure(model, groups, holdout_ids(tok, data, cfg), cfg, cache, progress=False)
    assert cache.data["kl"] == full["kl"] and [r["kl"] for r in cache.data["recipes"]] == [r["kl"] for r in full["recipes"]]
