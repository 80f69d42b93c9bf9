"""Streamed evaluation (lmpress.stream.StreamedModel): perplexity and KL of a model folder computed
block by block from its weight files equal the in-memory figures; what cannot stream says so."""

import pytest
import torch
from test_cli import _tok
from test_stream import RECIPES, _corpus, _data, _model, _run, big_folders

from lmpress.api import evaluate, open_model
from lmpress.errors import InputError
from lmpress.io import load_model, save_model


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream_eval")
    folder = save_model(_model(), tmp / "src", tokenizer=_tok(tmp))
    return folder, _corpus(tmp)


def _figures(model, tok, corpus, **kw):
    return evaluate(model, tok, data=_data(corpus), context=64, measure_speed=False, progress=False, **kw)


def _bf16_shards(tmp_path):
    """A bf16 checkpoint in several shards with an untied head and biases."""
    model = _model(layers=2, tied=False, bias=True, seed=3).to(torch.bfloat16)
    folder = tmp_path / "bf16"
    model.save_pretrained(folder, max_shard_size="60KB")
    _tok(tmp_path).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["tied", "bf16-shards"])
def test_streamed_perplexity_equals_in_memory(src, tmp_path, kind):
    folder, corpus = src
    if kind == "bf16-shards":
        folder = _bf16_shards(tmp_path)
    streamed, tok = open_model(folder, stream=True)
    assert streamed.streamed
    a = _figures(load_model(folder)[0], tok, corpus)
    b = _figures(streamed, tok, corpus)
    assert b["streamed"] and b["eval_tokens"] == a["eval_tokens"] > 200
    assert abs(b["perplexity"] - a["perplexity"]) <= 1e-5 * a["perplexity"], (a["perplexity"], b["perplexity"])
    assert b["params"] == a["params"] and b["linear_bits_per_weight"] == a["linear_bits_per_weight"]


def test_streamed_kl_equals_in_memory(src, tmp_path):
    """KL of a compressed model (in memory) to a streamed reference, and of a streamed model to itself."""
    folder, corpus = src
    _run(folder, RECIPES["rtn"](), corpus, tmp_path / "rtn", stream=False)
    compressed, tok = load_model(tmp_path / "rtn")
    streamed, _ = open_model(folder, stream=True)
    a = _figures(compressed, tok, corpus, reference=load_model(folder)[0])
    b = _figures(compressed, tok, corpus, reference=streamed)
    assert a["kl"] > 1e-4 and abs(b["kl"] - a["kl"]) <= 1e-5 * a["kl"] and b["top1"] == a["top1"]
    same = _figures(streamed, tok, corpus, reference=streamed)
    assert same["kl"] == 0 and same["top1"] == 1


def test_a_budget_below_the_model_chooses_streamed_evaluation(src):
    folder, corpus = src
    assert getattr(open_model(folder, data=_data(corpus), max_memory=1 << 20)[0], "streamed", False)
    assert not getattr(open_model(folder, data=_data(corpus), max_memory=1 << 40)[0], "streamed", False)


@pytest.mark.parametrize("recipe", ["gptq", "gptq-3bit-sym"])
def test_streamed_compressed_tensors_equal_in_memory(src, tmp_path, recipe):
    """A compressed-tensors output (here a streamed compression's shards, with an untied 8-bit head for
    gptq) evaluated block by block: its packed layers built as the in-memory load builds them, the same
    perplexity, KL, parameter counts and bits per weight."""
    folder, corpus = src
    out = tmp_path / "q"
    _run(folder, RECIPES[recipe](), corpus, out, stream=True)
    original = load_model(folder)[0]
    streamed, tok = open_model(out, stream=True)
    a = _figures(load_model(out)[0], tok, corpus, reference=original)
    b = _figures(streamed, tok, corpus, reference=original)
    assert b["streamed"] and a["kl"] > 1e-4
    assert abs(b["perplexity"] - a["perplexity"]) <= 1e-5 * a["perplexity"], (a["perplexity"], b["perplexity"])
    assert abs(b["kl"] - a["kl"]) <= 1e-5 * a["kl"] and b["top1"] == a["top1"]
    for key in ("params", "params_linear", "linear_bits_per_weight"):
        assert b[key] == a[key], key
    assert a["linear_bits_per_weight"] <= 5  # packed (4-bit g32: 5.0; 3-bit per channel: about 3), not float


def test_streamed_compressed_tensors_layer_kept_float_as_in_memory(src, tmp_path):
    """A packed layer that QuantLinear cannot hold exactly (float32 scales fp16 cannot represent) is a float
    layer with its exact dequantized weight, streamed as in memory."""
    from safetensors.torch import load_file, save_file

    folder, corpus = src
    out = tmp_path / "q"
    _run(folder, RECIPES["gptq"](), corpus, out, stream=True)
    key = "model.layers.1.mlp.down_proj.weight_scale"
    file = next(f for f in sorted(out.glob("*.safetensors")) if key in load_file(str(f)))
    state = load_file(str(file))
    state[key] = state[key].float() * (1 + 2**-20)  # no longer fp16-exact
    save_file(state, str(file), metadata={"format": "pt"})
    loaded = load_model(out)[0]
    assert "dequantized" in loaded.lmpress_load_note and type(loaded.get_submodule(key[:-13])).__name__ == "Linear"
    streamed, tok = open_model(out, stream=True)
    assert type(streamed.skeleton.get_submodule(key[:-13])).__name__ == "Linear"
    a = _figures(loaded, tok, corpus)
    b = _figures(streamed, tok, corpus)
    assert abs(b["perplexity"] - a["perplexity"]) <= 1e-5 * a["perplexity"]
    assert b["linear_bits_per_weight"] == a["linear_bits_per_weight"]


def test_packed_layers_count_as_stored_in_the_memory_estimate(src, tmp_path):
    from lmpress import stream as st
    from lmpress.api import _streamable
    from lmpress.data import DataConfig

    folder, corpus = src
    _run(folder, RECIPES["gptq"](), corpus, tmp_path / "q", stream=True)
    plans = [st.decide(_streamable(f, None, False, False, "evaluate")[1], DataConfig(), None, evaluation=True)[1]
             for f in (folder, tmp_path / "q")]
    assert plans[1]["in_memory"] < plans[0]["in_memory"]


def test_lmpress_layout_folder_is_not_streamed_and_says_so(src, tmp_path):
    """lmpress's own layout (low-rank factors here) is not read block by block; compress never streams
    from a compressed folder."""
    folder, corpus = src
    _run(folder, RECIPES["svd"](), corpus, tmp_path / "f", stream=True)
    with pytest.raises(InputError, match="not read block by block"):
        open_model(tmp_path / "f", stream=True)
    _run(folder, RECIPES["gptq"](), corpus, tmp_path / "q", stream=True)
    with pytest.raises(InputError, match="float weights"):
        _run(tmp_path / "q", RECIPES["rtn"](), corpus, tmp_path / "again", stream=True)


def test_cli_eval_streams_and_refuses_what_needs_the_whole_model(src, capsys):
    from lmpress.cli import main

    folder, corpus = src
    base = ["eval", str(folder), "--data", str(corpus), "--eval-tokens", "256", "--context", "64", "--no-speed"]
    assert main(base) == 0
    in_memory = capsys.readouterr().out
    assert main(base + ["--max-memory", "1MiB", "--reference", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "block by block" in out and "KL to original" in out
    ppl = [line.split()[1] for text in (in_memory, out) for line in text.splitlines() if line.split()[:1] == ["perplexity"] and len(line.split()) == 2]
    assert len(ppl) == 2 and ppl[0] == ppl[1]
    assert main(base + ["--stream", "--task", "wiki_cloze"]) == 2
    assert "--task, --lm-eval and --engine need the whole model" in capsys.readouterr().err


PEAK_SCRIPT = r"""
import json, sys
import torch
torch.set_num_threads(1)
from lmpress.api import evaluate, open_model
from lmpress.data import DataConfig
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
folder, warm, corpus, stream = sys.argv[1:5]
data = DataConfig(corpus=corpus, eval_tokens=512)
def run(src):
    model, tok = open_model(src, data=data, stream=stream == "1")
    return evaluate(model, tok, data=data, context=128, measure_speed=False, progress=False)
run(warm)  # one-time costs (imports, workspaces) on a tiny model
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
base = status("VmRSS")
res = run(folder)
print(json.dumps({"base": base, "peak": status("VmHWM"), "ppl": res["perplexity"], "streamed": bool(res.get("streamed"))}))
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return big_folders(tmp_path_factory.mktemp("big"))


def _check_peaks(folder, warm, corpus) -> None:
    """Run PEAK_SCRIPT streamed and in memory on ``folder`` (warm-up on ``warm``): the streamed peak above
    the process's resident size stays under half the weights on disk, the in-memory one holds them all,
    and both give the same perplexity."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    weights = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    figures = {}
    for stream in ("1", "0"):
        r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(folder), str(warm), str(corpus), stream],
                           capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        figures[stream] = json.loads(r.stdout.strip().splitlines()[-1])
    streamed = figures["1"]["peak"] - figures["1"]["base"]
    in_memory = figures["0"]["peak"] - figures["0"]["base"]
    print(f"weights {weights:,} B; peak above baseline: streamed {streamed:,} B, in memory {in_memory:,} B")
    assert figures["1"]["streamed"] and not figures["0"]["streamed"]
    assert streamed < weights / 2, (streamed, weights)
    assert in_memory > 0.9 * weights, (in_memory, weights)
    assert abs(figures["1"]["ppl"] - figures["0"]["ppl"]) <= 1e-5 * figures["0"]["ppl"]


@pytest.mark.memory
def test_streamed_evaluation_peak_memory_stays_below_the_weights(big):
    """Measured peak-RSS check, as test_stream.py's for compression: after a warm-up, a streamed
    evaluation's peak above the process's resident size stays under half the weights on disk (one
    block, the embedding and head, the windows' hidden states), while the in-memory one holds them
    all; both give the same perplexity."""
    _check_peaks(*big)


@pytest.mark.memory
def test_streamed_compressed_tensors_peak_memory_stays_below_the_packed_weights(big, tmp_path):
    """The same check for a compressed-tensors folder (8-bit per channel: 8-bit so that the packed weights
    stand well above the ~20 MB a streamed evaluation holds whatever the model)."""
    from lmpress.api import compress
    from lmpress.recipe import make_config

    folder, warm, corpus = big
    for name, src in (("big", folder), ("warm", warm)):
        compress(str(src), [make_config("rtn", bits=8, group_size=-1)], out=tmp_path / name, measure=False, progress=False)
    _check_peaks(tmp_path / "big", tmp_path / "warm", corpus)


def test_a_packed_shape_that_is_not_the_configs_is_refused(src, tmp_path):
    """weight_shape disagreeing with config.json: a clear error, in memory and streamed, not a wrong load."""
    import json

    from safetensors.torch import load_file, save_file

    folder, corpus = src
    out = tmp_path / "q"
    _run(folder, RECIPES["gptq"](), corpus, out, stream=True)
    cfg = json.loads((out / "config.json").read_text())
    key = "model.layers.0.mlp.up_proj.weight_shape"
    file = next(f for f in sorted(out.glob("*.safetensors")) if key in load_file(str(f)))
    state = load_file(str(file))
    state[key] = torch.tensor([state[key][0] // 2, state[key][1]])
    save_file(state, str(file), metadata={"format": "pt"})
    assert json.loads((out / "config.json").read_text()) == cfg
    for stream in (False, True):
        with pytest.raises(InputError, match="weight_shape"):
            model, tok = open_model(out, stream=stream)
            _figures(model, tok, corpus)
