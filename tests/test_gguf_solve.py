"""Methods solved on llama.cpp's grids: GPTQ below RTN on each type, bytes gguf reads back exactly,
llama.cpp's per-tensor type rule, compress/export to .gguf and what they refuse."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmpress.errors import InputError  # noqa: E402
from lmpress.quant import ggml, gguf_mix  # noqa: E402
from lmpress.quant.gptq import gptq_solve_ggml, inverse_hessian  # noqa: E402
from tests.test_gguf_writer import gguf_ready, tiny_llama  # noqa: E402


def _layer(seed=0, rows=32, cols=512, n=1024):
    """A weight and the Hessian of correlated inputs with uneven channel energy (as in real layers)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) * torch.rand(cols, generator=g) * 3
    X = X + torch.randn(n, 1, generator=g) * torch.randn(cols, generator=g)
    W = torch.randn(rows, cols, generator=g) * 0.05
    W[3, 7] = 0.6  # an outlier
    W[4, :32] = 0  # an all-zero block
    return W, X.T @ X / n


def _herr(W, Wq, H):
    D = Wq - W
    return (((D @ H) * D).sum() / ((W @ H) * W).sum()).item()


@pytest.mark.parametrize("gtype", list(ggml.TYPES))
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_the_same_grid(gtype, act_order):
    W, H = _layer()
    bq = gptq_solve_ggml(W, inverse_hessian(H, 0.01, act_order), gtype, torch.diag(H))
    rtn = _herr(W, ggml.dequantize(ggml.quantize(W, gtype)), H)
    searched = _herr(W, ggml.dequantize(ggml.fit(W, gtype, torch.diag(H))), H)
    assert _herr(W, ggml.dequantize(bq), H) < min(rtn, searched)


@pytest.mark.parametrize("gtype", list(ggml.TYPES))
def test_scale_refit_keeps_codes_and_lowers_the_output_error(gtype):
    """refit_scales: the same codes, stored-precision parameters that gguf reads back exactly, and a
    layer error no larger in any row (smaller over the layer) than the sweep's own scales gave."""
    W, H = _layer(2)
    bq = gptq_solve_ggml(W, inverse_hessian(H, 0.01, True), gtype, torch.diag(H))
    r = ggml.refit_scales(bq, W, H)
    assert r.q.equal(bq.q) and (r.sc is None or r.sc.equal(bq.sc)) and (r.mn is None or r.mn.equal(bq.mn))
    assert r.d.equal(r.d.half().float()) and (r.m is None or r.m.equal(r.m.half().float()))
    got = gguf.quants.dequantize(ggml.encode(r), gguf.GGMLQuantizationType[gtype])
    assert np.array_equal(got, ggml.dequantize(r).numpy())
    before, after = ggml.dequantize(bq) - W, ggml.dequantize(r) - W
    per_row = lambda D: ((D @ H) * D).sum(1)  # noqa: E731
    assert (per_row(after) <= per_row(before) * (1 + 1e-5) + 1e-9).all()
    assert _herr(W, ggml.dequantize(r), H) < _herr(W, ggml.dequantize(bq), H)


@pytest.mark.parametrize("gtype", list(ggml.TYPES))
def test_solved_bytes_read_back_bit_for_bit(gtype):
    """gguf's own dequantizer reads the solver's values exactly, and the parameters are stored values."""
    W, H = _layer(1)
    bq = gptq_solve_ggml(W, inverse_hessian(H, 0.01, True), gtype, torch.diag(H))
    got = gguf.quants.dequantize(ggml.encode(bq), gguf.GGMLQuantizationType[gtype])
    assert np.array_equal(got, ggml.dequantize(bq).numpy())
    assert bq.d.equal(bq.d.half().float()) and (bq.m is None or bq.m.equal(bq.m.half().float()))
    if bq.type.k_type:
        top = 2 ** bq.type.scale_bits
        assert int(bq.sc.min()) >= (-top // 2 if bq.type.kind == "sym" else 0) and int(bq.sc.max()) < top


@pytest.mark.parametrize("gtype", list(ggml.TYPES))
def test_weighted_search_beats_rtn_where_it_weighs(gtype):
    W, _ = _layer(2)
    imp = torch.rand(W.shape[1], generator=torch.Generator().manual_seed(0)) ** 4
    err = lambda bq: (((ggml.dequantize(bq) - W) ** 2) * imp).sum()  # noqa: E731
    assert err(ggml.fit(W, gtype, imp)) < err(ggml.quantize(W, gtype))


MORE_BITS_30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}  # llama.cpp's use_more_bits for 30 layers


def _types_30(name, imatrix=False):
    """Per-tensor types of a SmolLM2-shaped model (30 layers, rows of 576, MLP 1536, 9/3 heads, tied)."""
    s = gguf_mix.Shape(30, 3, True)
    out = {"token_embd": gguf_mix.tensor_type(name, "token_embd.weight", 576, s, imatrix=imatrix)}
    for i in range(30):
        for kind, cols in (("attn_q", 576), ("attn_v", 576), ("attn_output", 576), ("ffn_up", 576), ("ffn_down", 1536)):
            out[f"{i}.{kind}"] = gguf_mix.tensor_type(name, f"blk.{i}.{kind}.weight", cols, s, imatrix=imatrix)
    return out


def test_mix_rule_on_thirty_layers():
    t = _types_30("Q4_K_M")
    assert t["token_embd"] == "Q8_0"  # output rule: Q6_K, rows of 576 -> Q8_0
    assert {i for i in range(30) if t[f"{i}.ffn_down"] == "Q6_K"} == MORE_BITS_30
    assert {t[f"{i}.ffn_down"] for i in set(range(30)) - MORE_BITS_30} == {"Q4_K"}
    assert {i for i in range(30) if t[f"{i}.attn_v"] == "Q8_0"} == MORE_BITS_30  # Q6_K falls back
    assert {t[f"{i}.attn_q"] for i in range(30)} == {t[f"{i}.ffn_up"] for i in range(30)} == {"Q5_0"}
    assert _types_30("Q4_K") == t  # llama-quantize's alias
    t = _types_30("Q3_K_M")
    assert [t[f"{i}.attn_v"] for i in range(3)] == ["Q5_1", "Q5_1", "Q5_0"]  # Q5_K for the first two, Q4_K after
    assert t["0.ffn_down"] == "Q5_K" and {t[f"{i}.ffn_down"] for i in range(1, 30)} == {"Q4_K"}
    assert {t[f"{i}.attn_output"] for i in range(30)} == {"Q5_0"} and t["7.attn_q"] == "Q4_0"
    t = _types_30("Q4_K_S")
    assert [t[f"{i}.attn_v"] for i in range(5)] == ["Q5_1"] * 4 + ["Q5_0"]
    assert [t[f"{i}.ffn_down"] for i in range(4)] == ["Q5_K"] * 3 + ["Q4_K"]
    with_imatrix, without = _types_30("Q4_0", imatrix=True), _types_30("Q4_0")
    assert [with_imatrix[f"{i}.ffn_down"] for i in range(4)] == ["Q4_1"] * 3 + ["Q4_0"]
    assert {without[f"{i}.ffn_down"] for i in range(30)} == {"Q4_0"} and without["token_embd"] == "Q8_0"
    assert [_types_30("IQ4_NL")[f"{i}.ffn_down"] for i in range(4)] == ["Q5_K"] * 3 + ["IQ4_NL"]
    t = _types_30("Q2_K")
    assert t["0.attn_v"] == "Q4_0" and t["0.ffn_down"] == "Q3_K" and t["0.attn_q"] == "Q4_0"
    assert set(_types_30("Q8_0").values()) == {"Q8_0"} and set(_types_30("Q6_K").values()) == {"Q8_0", "Q6_K"}
    with pytest.raises(InputError, match="unknown GGUF type"):
        gguf_mix.ftype("Q4_K_XL")


def test_config_refuses_what_contradicts_the_type():
    from lmpress.recipe import make_config

    assert make_config("gptq", gguf="Q4_K_M").gguf == "Q4_K_M"
    with pytest.raises(InputError, match="bits=3"):
        make_config("gptq", gguf="Q4_0", bits=3)
    with pytest.raises(InputError, match="group_size=128"):
        make_config("rtn", gguf="Q4_K_M", group_size=128)
    with pytest.raises(InputError, match="need gguf"):
        make_config("awq", gguf_embed="Q8_0")
    with pytest.raises(InputError, match="need gguf"):
        make_config("rtn", overrides=[{"pattern": "down_proj", "gguf": "Q8_0"}])
    with pytest.raises(InputError, match="overrides without a gguf type"):
        make_config("gptq", gguf="Q4_0", overrides=[{"pattern": "down_proj", "bits": 8}])
    with pytest.raises(InputError, match="not a ggml block type"):
        make_config("gptq", gguf="Q4_0", overrides=[{"pattern": "down_proj", "gguf": "Q7_0"}])
    assert make_config("gptq", gguf="Q4_0", overrides=[{"pattern": "down_proj", "gguf": "Q8_0"}]).overrides[0]["gguf"] == "Q8_0"


# ---- end to end: compress and export to .gguf ----

@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A tiny Llama with a byte-level BPE tokenizer llama.cpp reads as 'default', and calibration text."""
    tok, text = gguf_ready(tmp_path, monkeypatch)
    return tiny_llama(hidden=256, inter=512), tok, str(text)


def _compress(setup, method, fmt, out, **fields):
    from lmpress.api import compress
    from lmpress.data import DataConfig
    from lmpress.recipe import make_config

    model, tok, text = setup
    data = DataConfig(corpus=text, calib_samples=4, calib_len=64, eval_tokens=64)
    return compress(model, [make_config(method, **fields)], tok, data=data, out=out, format=fmt, measure=False,
                    progress=False)[0]


def _logits(model, tok):
    with torch.no_grad():
        return model(torch.tensor([tok.encode("the quick brown fox jumps over the lazy dog")])).logits


@pytest.mark.parametrize("method,gtype", [("gptq", "Q4_0"), ("gptq", "Q4_K_M"), ("awq", "IQ4_NL"), ("rtn", "Q3_K_S")])
def test_compress_to_gguf_reads_back_the_solved_model(setup, tmp_path, method, gtype):
    from lmpress.formats.gguf import solved_layers
    from lmpress.io import load_model

    out = tmp_path / "m.gguf"
    student = _compress(setup, method, f"gguf:{gtype}", out)
    solved = solved_layers(student)
    assert len(solved) == 15 and solved["model.embed_tokens"].gtype == "Q6_K"  # 14 block linears + embedding
    assert [s["gguf"] for s in json.loads(gguf.GGUFReader(out).fields["lmpress.metadata"].contents())["recipe"]] == [gtype]
    loaded, tok = load_model(out)
    torch.testing.assert_close(_logits(loaded, tok), _logits(student, tok), atol=1e-4, rtol=1e-4)
    r = {t.name: t for t in gguf.GGUFReader(out).tensors}
    down = solved["model.layers.1.mlp.down_proj"]
    assert r["blk.1.ffn_down.weight"].tensor_type.name == down.gtype
    assert np.array_equal(np.asarray(r["blk.1.ffn_down.weight"].data).reshape(down.raw.shape), down.raw.numpy())


def test_overrides_give_matrices_other_types_in_the_file(setup, tmp_path):
    """A mix llama.cpp has no name for (llama-quantize's --tensor-type): the first matching override's type,
    solved on that grid, written so, read back to the same logits; exporting the saved output keeps it."""
    from lmpress.io import export, load_model

    rules = [{"pattern": r"layers\.0\.mlp\.down_proj", "gguf": "Q8_0"}, {"pattern": r"self_attn\.(q|k)_proj", "gguf": "Q4_K"}]
    student = _compress(setup, "gptq", "lmpress", tmp_path / "native", gguf="Q4_0", overrides=rules)
    export(tmp_path / "native", tmp_path / "m.gguf", format="gguf:Q4_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    rule = gguf_mix.plan(student, "Q4_0", imatrix=True)
    assert types["blk.0.ffn_down.weight"] == "Q8_0" != rule["model.layers.0.mlp.down_proj.weight"]
    assert types["blk.0.attn_q.weight"] == types["blk.1.attn_k.weight"] == "Q4_K"  # rows of 256 take a K block
    for t, hf in [("blk.1.ffn_down", "model.layers.1.mlp.down_proj"), ("blk.0.attn_v", "model.layers.0.self_attn.v_proj"),
                  ("blk.1.ffn_up", "model.layers.1.mlp.up_proj")]:
        assert types[t + ".weight"] == rule[hf + ".weight"]  # the rest: llama.cpp's rule
    loaded, tok = load_model(tmp_path / "m.gguf")
    torch.testing.assert_close(_logits(loaded, tok), _logits(student, tok), atol=1e-4, rtol=1e-4)


def test_cli_compress_then_export(setup, tmp_path):
    from lmpress.cli import main
    from lmpress.io import load_model, save_model

    model, tok, text = setup
    save_model(model, tmp_path / "float", tokenizer=tok, format="hf")
    common = ["--data", text, "--calib-samples", "4", "--calib-len", "64", "--no-eval"]
    assert main(["compress", str(tmp_path / "float"), "--method", "gptq", "--format", "gguf:Q4_0",
                 "-o", str(tmp_path / "a.gguf"), *common]) == 0
    assert main(["compress", str(tmp_path / "float"), "--method", "gptq", "--format", "lmpress", "--set", "gguf=Q4_0",
                 "-o", str(tmp_path / "native"), *common]) == 0
    native, _ = load_model(tmp_path / "native")
    assert main(["export", str(tmp_path / "native"), "--format", "gguf:Q4_0", "-o", str(tmp_path / "b.gguf")]) == 0
    a, b = gguf.GGUFReader(tmp_path / "a.gguf"), gguf.GGUFReader(tmp_path / "b.gguf")
    for ta, tb in zip(a.tensors, b.tensors):  # the same solve, saved natively then exported: the same bytes
        assert ta.name == tb.name and np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name
    loaded, _ = load_model(tmp_path / "b.gguf")
    torch.testing.assert_close(_logits(loaded, tok), _logits(native, tok), atol=1e-4, rtol=1e-4)
    assert main(["export", str(tmp_path / "float"), "--format", "gguf:Q8_0", "-o", str(tmp_path / "c.gguf")]) == 0
    assert gguf.GGUFReader(tmp_path / "c.gguf").tensors[1].tensor_type.name == "Q8_0"  # float model: RTN


def test_export_refuses_another_grid(setup, tmp_path, capsys):
    from lmpress.cli import main

    model, tok, text = setup
    common = ["--data", text, "--calib-samples", "4", "--calib-len", "64", "--no-eval", "--format", "lmpress"]
    from lmpress.io import save_model

    save_model(model, tmp_path / "float", tokenizer=tok, format="hf")
    assert main(["compress", str(tmp_path / "float"), "--method", "rtn", "--group-size", "32", "-o", str(tmp_path / "int4"), *common]) == 0
    assert main(["export", str(tmp_path / "int4"), "--format", "gguf:Q4_0", "-o", str(tmp_path / "x.gguf")]) == 2
    assert "never re-rounds" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()
    assert main(["compress", str(tmp_path / "float"), "--method", "rtn", "--set", "gguf=Q4_0", "-o", str(tmp_path / "q40"), *common]) == 0
    assert main(["export", str(tmp_path / "q40"), "--format", "gguf:Q8_0", "-o", str(tmp_path / "y.gguf")]) == 2
    assert "solved on llama.cpp's Q4_0" in capsys.readouterr().err and not (tmp_path / "y.gguf").exists()
    assert main(["export", str(tmp_path / "q40"), "--format", "gguf:Q4_0", "-o", str(tmp_path / "y")]) == 2
    assert "ending in .gguf" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "float"), "--method", "gptq", "--bits", "3", "--format", "gguf:Q4_0",
                 "-o", str(tmp_path / "z.gguf"), *common[:-2]]) == 2
    assert "bits=3" in capsys.readouterr().err and not (tmp_path / "z.gguf").exists()


def test_embedding_and_head_types_follow_the_rule_or_the_config():
    from lmpress.quant.gguf_mix import cfg_plan
    from lmpress.recipe import make_config

    tied, untied = tiny_llama(hidden=256, inter=512), tiny_llama(hidden=256, inter=512, tied=False)
    assert cfg_plan(tied, make_config("rtn", gguf="Q4_0"), imatrix=False)["token_embd.weight"] == "Q6_K"
    assert "output.weight" not in cfg_plan(tied, make_config("rtn", gguf="Q4_0"), imatrix=False)
    p = cfg_plan(untied, make_config("rtn", gguf="Q4_0"), imatrix=False)
    assert p["token_embd.weight"] == "Q4_0" and p["output.weight"] == "Q6_K"  # llama.cpp: embedding in the type
    p = cfg_plan(untied, make_config("rtn", gguf="Q4_0", gguf_embed="Q8_0", gguf_output="Q5_0"), imatrix=False)
    assert p["token_embd.weight"] == "Q8_0" and p["output.weight"] == "Q5_0"
    assert cfg_plan(tied, make_config("rtn", gguf="Q4_0", gguf_output="Q4_0"), imatrix=False)["token_embd.weight"] == "Q4_0"
