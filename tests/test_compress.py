"""End to end: compress a saved tiny model with the API and the CLI, reload, same logits."""

import json
import subprocess
import sys

import pytest
import torch
from test_cli import _tok
from tiny import tiny_model

from lmpress.api import compress
from lmpress.data import DataConfig
from lmpress.io import load_model, save_model
from lmpress.recipe import load_recipe, make_config


@pytest.fixture
def setup(tmp_path):
    tok = _tok(tmp_path)
    src = save_model(tiny_model("llama"), tmp_path / "src", tokenizer=tok)
    corpus = tmp_path / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    paras = [" ".join(f"w{int(i)}" for i in torch.randint(0, 200, (60,), generator=g)) for _ in range(200)]
    corpus.write_text("\n\n".join(paras))
    return src, corpus


def test_api_compress_saves_reloadable_model_and_keeps_input(setup, tmp_path):
    src, corpus = setup
    model, tok = load_model(src)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = DataConfig(corpus=str(corpus), calib_samples=4, calib_len=32, eval_tokens=256)
    res = compress([make_config("gptq", bits=4, group_size=32)], model, tok, data=data, out=tmp_path / "q",
                   measure_speed=False, context=64, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert res["after"]["kl"] > 0 and res["after"]["linear_bits_per_weight"] < 6
    again, _ = load_model(tmp_path / "q")
    ids = torch.randint(3, 200, (1, 12))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, res["model"](ids).logits)
    meta = json.loads((tmp_path / "q" / "config.json").read_text())["lmpress"]
    assert meta["recipe"][0]["method"] == "gptq" and meta["recipe"][0]["bits"] == 4


def test_cli_compress_then_eval(setup, tmp_path):
    src, corpus = setup
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- method: rtn\n  bits: 8\n  group_size: -1\n- method: gptq\n  bits: 4\n  group_size: 32\n  overrides:\n    - {pattern: 'down_proj', skip: true}\n")
    assert [c.method for c in load_recipe(recipe)] == ["rtn", "gptq"]
    base = [sys.executable, "-m", "lmpress.cli"]
    out = tmp_path / "o"
    res = subprocess.run(base + ["compress", str(src), "--method", "gptq", "--bits", "3", "--group-size", "32", "--data", str(corpus),
                                 "--calib-samples", "4", "--calib-len", "32", "--eval-tokens", "256", "--context", "64",
                                 "--no-speed", "-o", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "KL to original" in res.stdout and "saved to" in res.stdout
    res = subprocess.run(base + ["eval", str(out), "--data", str(corpus), "--eval-tokens", "256", "--context", "64", "--no-speed",
                                 "--json", "-"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    figs = json.loads(res.stdout[: res.stdout.rindex("}") + 1])
    assert 3 < figs["linear_bits_per_weight"] < 5


@pytest.mark.parametrize("argv, msg", [
    (["--method", "gptq", "--sparsity", "0.5"], "has no option"),
    (["--method", "gptq", "--bits", "5"], "bits must be one of"),
    (["--method", "gptq", "--group-size", "48"], "does not divide"),
    ([], "exactly one of --method"),
])
def test_cli_bad_options_are_one_line_errors(setup, tmp_path, argv, msg):
    src, corpus = setup
    res = subprocess.run([sys.executable, "-m", "lmpress.cli", "compress", str(src), "--data", str(corpus), "--calib-samples", "2",
                          "--calib-len", "16", "--no-eval", "-o", str(tmp_path / "x")] + argv, capture_output=True, text=True)
    assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "x").exists()
