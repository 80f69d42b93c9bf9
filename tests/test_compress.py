"""End to end: compress a saved tiny model with the API and the CLI, reload, same logits."""

import json
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
    compressed, res = compress(model, [make_config("gptq", bits=4, group_size=32)], tok, data=data, out=tmp_path / "q",
                               measure_speed=False, context=64, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert res["after"]["kl"] > 0 and res["after"]["linear_bits_per_weight"] < 6
    again, _ = load_model(tmp_path / "q")
    ids = torch.randint(3, 200, (1, 12))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, compressed(ids).logits)
    meta = json.loads((tmp_path / "q" / "config.json").read_text())["lmpress"]
    assert meta["recipe"][0]["method"] == "gptq" and meta["recipe"][0]["bits"] == 4


def test_cli_compress_then_eval(setup, tmp_path, capsys):
    from lmpress.cli import main

    src, corpus = setup
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- method: rtn\n  bits: 8\n  group_size: -1\n- method: gptq\n  bits: 4\n  group_size: 32\n  overrides:\n    - {pattern: 'down_proj', skip: true}\n")
    assert [c.method for c in load_recipe(recipe)] == ["rtn", "gptq"]
    out = tmp_path / "o"
    common = ["--data", str(corpus), "--eval-tokens", "256", "--context", "64", "--no-speed"]
    assert main(["compress", str(src), "--method", "gptq", "--bits", "3", "--group-size", "32", "--calib-samples", "4",
                 "--calib-len", "32", "-o", str(out)] + common) == 0
    printed = capsys.readouterr().out
    assert "KL to original" in printed and "saved to" in printed
    assert main(["eval", str(out), "--json", str(tmp_path / "f.json")] + common) == 0
    figs = json.loads((tmp_path / "f.json").read_text())
    assert 3 < figs["linear_bits_per_weight"] < 5


@pytest.mark.compile
def test_cli_eval_compiled_decode(setup, tmp_path):
    from lmpress.cli import main

    src, corpus = setup
    assert main(["eval", str(src), "--data", str(corpus), "--eval-tokens", "128", "--context", "64", "--compiled-decode",
                 "--json", str(tmp_path / "f.json")]) == 0
    figs = json.loads((tmp_path / "f.json").read_text())
    assert figs["decode_path"] == "compiled" and figs["decode_tps"] > 0


@pytest.mark.parametrize("argv, msg", [
    (["--method", "gptq", "--sparsity", "0.5"], "has no option"),
    (["--method", "gptq", "--bits", "5"], "bits must be one of"),
    (["--method", "gptq", "--group-size", "48"], "does not divide"),
    ([], "exactly one of --method"),
])
def test_cli_bad_options_are_one_line_errors(setup, tmp_path, argv, msg, capsys):
    from lmpress.cli import main

    src, corpus = setup
    code = main(["compress", str(src), "--data", str(corpus), "--calib-samples", "2", "--calib-len", "16", "--no-eval",
                 "-o", str(tmp_path / "x")] + argv)
    err = capsys.readouterr().err
    assert code == 2 and msg in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_cli_prune_saves_compact_sparse_layers_and_reports_sparsity(setup, tmp_path, capsys, pattern):
    from lmpress.cli import main
    from lmpress.io import folder_bytes
    from lmpress.prune.sparse import SparseLinear

    src, corpus = setup
    out = tmp_path / "p"
    extra = ["--pattern", pattern] if pattern else ["--sparsity", "0.6"]
    assert main(["compress", str(src), "--method", "wanda", "--calib-samples", "4", "--calib-len", "32", "-o", str(out),
                 "--format", "lmpress", "--data", str(corpus), "--eval-tokens", "256", "--context", "64", "--no-speed"] + extra) == 0
    printed = capsys.readouterr().out
    assert "stored sparse: " in printed and "q_proj" in printed
    again, _ = load_model(out)
    layers = [m for m in again.modules() if isinstance(m, SparseLinear)]
    assert layers and all(l.layout == ("nm" if pattern else "bitmask") for l in layers)
    for l in layers:  # the measured sparsity is what was asked for
        zeros = (l.weight == 0).float().mean().item()
        assert zeros == pytest.approx(0.5 if pattern else 0.6, abs=0.02)
    assert folder_bytes(out) < folder_bytes(src)


def test_cli_prune_then_quantize_reports_the_zeros_left(setup, tmp_path, capsys):
    from lmpress.cli import main

    src, corpus = setup
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- {method: wanda, sparsity: 0.5}\n- {method: rtn, bits: 4, group_size: 32}\n")
    assert main(["compress", str(src), "--recipe", str(recipe), "--calib-samples", "4", "--calib-len", "32",
                 "-o", str(tmp_path / "o"), "--no-eval", "--data", str(corpus)]) == 0
    printed = capsys.readouterr().out
    assert "zeros after all steps (wanda 0.5 asked" in printed


def test_info_needs_no_tokenizer(tmp_path, capsys):
    from tiny import tiny_model

    from lmpress.cli import main

    save_model(tiny_model("llama"), tmp_path / "m")  # no tokenizer saved
    assert main(["info", str(tmp_path / "m")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
