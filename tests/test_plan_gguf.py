"""A GGUF plan (PlanConfig.gguf): every block group chooses among llama.cpp's block types, exact bytes,
GPTQ on the chosen grids, the file holds exactly the chosen types, the recipe replays to the same tensors."""

import pytest

pytest.importorskip("scipy")
pytest.importorskip("gguf")

from tests.test_gguf_writer import gguf_ready, tiny_llama  # noqa: E402

from lmpress.data import DataConfig  # noqa: E402
from lmpress.errors import InputError  # noqa: E402
from lmpress.planner.candidates import gguf_candidates, layer_groups, quant_bytes  # noqa: E402
from lmpress.planner.config import PlanConfig  # noqa: E402
from lmpress.planner.run import plan  # noqa: E402


@pytest.fixture
def setup(tmp_path, monkeypatch):
    tok, text = gguf_ready(tmp_path, monkeypatch)
    data = DataConfig(corpus=str(text), calib_samples=4, calib_len=64, eval_tokens=256)
    cfg = PlanConfig(holdout_rows=2, holdout_len=64, fisher_rows=1, kl_rows=1, kl_len=32, recipes=3, rounds=1,
                     gguf="Q4_K_M", gguf_types=("Q4_0", "IQ4_NL", "Q4_K", "Q5_0", "Q6_K", "Q8_0"), cache_dir=str(tmp_path / "cache"))
    return tiny_llama(hidden=256, inter=512), tok, data, cfg


def _types(path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def test_gguf_candidate_bytes_are_the_files(setup):
    from lmpress import arch
    from lmpress.quant import ggml

    model = setup[0]
    groups = layer_groups(model, gguf_candidates(), head_bits=(), keep_float=False)
    assert groups and all(g.block is not None and g.candidates for g in groups)
    for g in groups:
        for c, b in zip(g.candidates, g.bytes):
            assert c.gguf and c.label == c.gguf
            ws = [arch.linear_weight(model.get_submodule(n)).detach().float() for n in g.layers]
            assert b == sum(ggml.encode(ggml.quantize(w, c.gguf)).nbytes for w in ws), (g.name, c.gguf)
        (o, i), c = g.shapes[0], g.candidates[0]
        assert quant_bytes(o, i, c, bias=True, float_size=4) == quant_bytes(o, i, c, bias=False, float_size=4) + 4 * o  # F32 bias


def test_gguf_plan_writes_the_chosen_types_and_replays(setup, tmp_path):
    from lmpress.api import compress
    from lmpress.formats.gguf import gguf_names
    from lmpress.recipe import load_recipe

    model, tok, data, cfg = setup
    res = plan(model, tokenizer=tok, data=data, config=cfg, target="bits=5.6", out=tmp_path / "p", progress=False,
               context=64)
    last = res["rounds"][-1]
    assert last["bits"] <= 5.6 + 1e-9 and last["kl"] > 0
    assert {r["name"] for r in res["recipes"]} >= {"uniform Q4_0", "uniform Q8_0", "Q4_K_M rule"}
    gguf_file = tmp_path / "p" / "model.gguf"
    types, names = _types(gguf_file), gguf_names(model)
    picked = set()
    for group, label in last["choice"].items():
        for layer in next(g for g in res["groups"] if g["name"] == group)["layers"]:
            assert types[names[f"{layer}.weight"]] == label, (layer, label)
            picked.add(label)
    assert len(picked) >= 2  # a mix, not one type everywhere
    from gguf import GGUFReader

    assert last["bytes"] == sum(int(t.n_bytes) for t in GGUFReader(str(gguf_file)).tensors)  # planned bytes exact
    assert "replay" in res and "--format gguf:Q4_K_M" in res["replay"]
    replay = tmp_path / "replay.gguf"
    compress(model, load_recipe(tmp_path / "p" / "recipe.yaml"), tok, data=data, out=replay, format="gguf:Q4_K_M",
             measure=False, progress=False)
    from gguf import GGUFReader

    a = {t.name: bytes(t.data.tobytes()) for t in GGUFReader(str(gguf_file)).tensors}
    b = {t.name: bytes(t.data.tobytes()) for t in GGUFReader(str(replay)).tensors}
    assert a == b


def test_report_reads_every_label():
    from lmpress.planner.report import heatmap, label_bits

    assert [label_bits(x) for x in ("float", "w4g64", "w8pc", "IQ4_NL", "Q6_K", "Q2_K")] == ["float", 4, 8, 4, 6, 2]
    groups = [{"name": f"b{i}", "kind": "o", "block": i} for i in range(3)]
    svg = heatmap(groups, {"b0": "IQ4_NL", "b1": "Q5_K", "b2": "w4g64"})
    assert ">IQ4_NL<" in svg and ">Q5_K<" in svg and ">4g64<" in svg


def test_gguf_plan_config_is_checked():
    with pytest.raises(InputError, match="ggml block types"):
        PlanConfig(gguf="Q4_K_M", gguf_types=("Q4_0", "Q7_X"))
    with pytest.raises(InputError, match="unknown GGUF type"):
        PlanConfig(gguf="Q9_Z")
    with pytest.raises(InputError, match="needs the file type"):
        plan("x", target="bits=4", format="gguf")
    assert PlanConfig(gguf="Q4_K").gguf == "Q4_K_M"  # llama-quantize's alias
