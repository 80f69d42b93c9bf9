"""Streaming compression (lmpress.stream): block by block from the weight files, the same bytes as
the in-memory path, resumable after an interrupt, and a peak memory below the model's weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import _tok

from lmpress.api import compress
from lmpress.data import DataConfig
from lmpress.errors import InputError
from lmpress.io import save_model
from lmpress.recipe import make_config

RECIPES = {
    "rtn": lambda: make_config("rtn", bits=4, group_size=32, head_bits=8),
    "gptq": lambda: make_config("gptq", bits=4, group_size=32, head_bits=8),
    "gptq-3bit-sym": lambda: make_config("gptq", bits=3, group_size=-1, sym=True, act_order=False),
    "wanda": lambda: make_config("wanda", sparsity=0.5),
    "sparsegpt": lambda: make_config("sparsegpt", sparsity=0.5),
    "awq": lambda: make_config("awq", bits=4, group_size=32),
    "svd": lambda: make_config("svd", ratio=0.7, allocation="uniform"),
    "asvd": lambda: make_config("asvd", ratio=0.7, allocation="uniform"),
    "svd-llm": lambda: make_config("svd-llm", ratio=0.7, allocation="uniform"),
    "svd-llm-rank": lambda: make_config("svd-llm", rank=8, allocation="uniform"),
    "dsformer": lambda: make_config("dsformer", ratio=0.7, allocation="uniform", iters=2),
    "dsformer-k": lambda: make_config("dsformer", k=16, s=6, iters=2),  # k: no allocation pass, whatever allocation says
}


def _corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    paras = [" ".join(f"w{int(i)}" for i in torch.randint(0, 200, (60,), generator=g)) for _ in range(200)]
    corpus.write_text("\n\n".join(paras))
    return corpus


def _model(layers=3, hidden=64, inter=128, tied=True, seed=0, bias=False):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, vocab_size=256,
                      max_position_embeddings=256, attention_bias=bias)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    tok = _tok(tmp)
    folder = save_model(_model(), tmp / "src", tokenizer=tok)
    return folder, _corpus(tmp)


def _data(corpus, n=6):
    return DataConfig(corpus=str(corpus), calib_samples=n, calib_len=32, eval_tokens=256)


def _run(folder, recipe, corpus, out, stream, **kw):
    return compress(str(folder), [recipe], data=_data(corpus), out=out, measure=False, progress=False, stream=stream, **kw)


def _tensors(folder: Path) -> dict[str, bytes]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                out[k] = (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def _merged_bytes(folder: Path) -> bytes:
    """The shards' tensors saved as one file, as the in-memory path writes it."""
    from safetensors.torch import load_file, save_file

    state = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        state.update(load_file(str(f)))
    tmp = folder.parent / f"{folder.name}-merged.safetensors"
    save_file(dict(sorted(state.items())), str(tmp), metadata={"format": "pt"})
    return tmp.read_bytes()


@pytest.mark.parametrize("name", list(RECIPES))
def test_streamed_output_has_the_in_memory_bytes(src, tmp_path, name):
    folder, corpus = src
    recipe = RECIPES[name]()
    _, mem = _run(folder, recipe, corpus, tmp_path / "mem", stream=False)
    _, st = _run(folder, recipe, corpus, tmp_path / "st", stream=True)
    assert mem["memory"]["mode"] == "in-memory" and st["memory"]["mode"] == "streaming"
    a, b = tmp_path / "mem", tmp_path / "st"
    assert _tensors(a) == _tensors(b)
    assert _merged_bytes(b) == (a / "model.safetensors").read_bytes()  # byte for byte, once merged
    index = json.loads((b / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_tensors(b)) and len(set(index["weight_map"].values())) == 4  # 3 blocks + rest
    for f in sorted(p.name for p in a.iterdir() if p.suffix == ".json" or p.name.startswith("tokenizer")):
        if f != "model.safetensors.index.json":
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert not list(tmp_path.glob(".st.partial*"))


@pytest.mark.parametrize("name", ["gptq", "wanda"])
def test_lmpress_layout_streams_any_method_with_the_in_memory_bytes(src, tmp_path, name):
    folder, corpus = src
    _run(folder, RECIPES[name](), corpus, tmp_path / "mem", stream=False, format="lmpress")
    _run(folder, RECIPES[name](), corpus, tmp_path / "st", stream=True, format="lmpress")
    assert json.loads((tmp_path / "st" / "config.json").read_text())["lmpress"]["format"] == "lmpress"
    assert _merged_bytes(tmp_path / "st") == (tmp_path / "mem" / "model.safetensors").read_bytes()
    assert (tmp_path / "st" / "config.json").read_bytes() == (tmp_path / "mem" / "config.json").read_bytes()


@pytest.mark.parametrize("name, kind", [("gptq", "QuantLinear"), ("svd-llm", "LowRankLinear"), ("dsformer", "DenseSparseLinear")])
def test_streamed_output_loads_and_gives_the_same_logits(src, tmp_path, name, kind):
    """Also lmpress's own layout (low-rank factors) read back from a streamed save's shards."""
    from lmpress.io import load_model

    folder, corpus = src
    recipe = RECIPES[name]()
    _run(folder, recipe, corpus, tmp_path / "mem", stream=False)
    _run(folder, recipe, corpus, tmp_path / "st", stream=True)
    ids = torch.randint(3, 200, (1, 16))
    streamed = load_model(tmp_path / "st")[0]
    assert kind in {type(m).__name__ for m in streamed.modules()}
    with torch.no_grad():
        la = load_model(tmp_path / "mem")[0](ids).logits
        lb = streamed(ids).logits
    assert torch.equal(la, lb)


def test_bf16_shards_of_an_untied_model_stream_like_a_float32_load(tmp_path, monkeypatch):
    """bf16 checkpoint split into shards with an index, untied head, biases: read as float32 like load_model
    (converted 16 rows at a time here, to exercise the sliced conversion)."""
    from lmpress import stream

    monkeypatch.setattr(stream, "ROWS", 16)
    tok = _tok(tmp_path)
    model = _model(layers=2, tied=False, bias=True).to(torch.bfloat16)
    folder = tmp_path / "src"
    model.save_pretrained(folder, max_shard_size="60KB")
    tok.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").exists()
    corpus = _corpus(tmp_path)
    recipe = RECIPES["gptq"]()
    _run(folder, recipe, corpus, tmp_path / "mem", stream=False)
    _run(folder, recipe, corpus, tmp_path / "st", stream=True)
    assert _tensors(tmp_path / "mem") == _tensors(tmp_path / "st")


def test_capture_reads_only_the_embedding_rows_of_the_calibration_tokens(tmp_path, monkeypatch):
    """The embedding is read for block 0's capture as the rows of the tokens given (runs of adjacent rows
    split at ROWS), converted as a whole read converts them; the other rows are zeros no one reads.
    Without ids (a method with no calibration pass) it is not read at all."""
    from lmpress import stream

    monkeypatch.setattr(stream, "ROWS", 2)
    model = _model(layers=1).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    ids = torch.tensor([[5, 6, 7, 8, 9, 200], [5, 0, 255, 254, 17, 17]])
    full = model.get_input_embeddings().weight.detach().float()
    for given in (ids, None):
        skel = stream.skeleton(tmp_path / "src")
        source = stream.BlockStream(skel, stream.Shards(tmp_path / "src"), None)
        assert source.resume(given) == (0, None)
        w = skel.get_input_embeddings().weight
        if given is None:
            assert w.is_meta
            continue
        used = torch.zeros(full.shape[0], dtype=torch.bool)
        used[ids.unique()] = True
        assert torch.equal(w[used], full[used]) and not w[~used].any()


@pytest.mark.parametrize("name", ["gptq", "rtn"])  # rtn: no calibration pass, no checkpointed hidden states
def test_resume_after_interrupt_gives_identical_bytes(src, tmp_path, monkeypatch, name):
    from lmpress import stream

    folder, corpus = src
    recipe = RECIPES[name]()
    _run(folder, recipe, corpus, tmp_path / "ref", stream=True)
    real = stream.OutputShards.write_block
    loaded = []

    def crash_after_block_1(self, i, *a, **kw):
        real(self, i, *a, **kw)
        if i == 1:
            raise KeyboardInterrupt  # as a Ctrl-C between blocks

    monkeypatch.setattr(stream.OutputShards, "write_block", crash_after_block_1)
    with pytest.raises(KeyboardInterrupt):
        _run(folder, recipe, corpus, tmp_path / "out", stream=True)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial").is_dir()
    monkeypatch.setattr(stream.OutputShards, "write_block", real)
    real_load = stream.BlockStream.load
    monkeypatch.setattr(stream.BlockStream, "load", lambda self, i: (loaded.append(i), real_load(self, i)))
    _, rep = _run(folder, recipe, corpus, tmp_path / "out", stream=True)
    assert loaded == [2]  # the finished blocks 0 and 1 are not redone
    assert rep["methods"][0]["info"]["streamed"]["resumed_at_block"] == 2
    for f in sorted(p.name for p in (tmp_path / "ref").iterdir()):
        assert (tmp_path / "ref" / f).read_bytes() == (tmp_path / "out" / f).read_bytes(), f


def test_a_partial_output_of_other_options_is_not_resumed(src, tmp_path, monkeypatch):
    from lmpress import stream

    folder, corpus = src
    real = stream.OutputShards.write_block

    def crash(self, i, *a, **kw):
        real(self, i, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(stream.OutputShards, "write_block", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(folder, make_config("gptq", bits=8, group_size=32), corpus, tmp_path / "out", stream=True)
    monkeypatch.setattr(stream.OutputShards, "write_block", real)
    _, rep = _run(folder, RECIPES["gptq"](), corpus, tmp_path / "out", stream=True)
    assert rep["methods"][0]["info"]["streamed"]["resumed_at_block"] == 0
    _run(folder, RECIPES["gptq"](), corpus, tmp_path / "ref", stream=True)
    assert _tensors(tmp_path / "out") == _tensors(tmp_path / "ref")


@pytest.mark.parametrize("method, fields, msg", [
    ("prune-width", {"target_params": 0.75}, "needs the whole model in memory"),
    ("magnitude", {"sparsity": 0.5}, "not streamed block by block yet"),
    ("wanda", {"sparsity": 0.5, "allocation": "owl"}, "allocation: uniform"),
    ("svd-llm", {"ratio": 0.8}, "allocation=energy measures every block"),  # the default allocation: global ranks
    ("dsformer", {"ratio": 0.8}, "allocation=energy measures every block"),
])
def test_methods_that_need_the_whole_model_say_so(src, tmp_path, method, fields, msg):
    folder, corpus = src
    with pytest.raises(InputError, match=msg):
        _run(folder, make_config(method, **fields), corpus, tmp_path / "o", stream=True)
    assert not (tmp_path / "o").exists()


def test_a_budget_below_the_model_chooses_streaming(src, tmp_path):
    folder, corpus = src
    _, rep = _run(folder, RECIPES["wanda"](), corpus, tmp_path / "o", stream=None, max_memory=1 << 20)
    assert rep["memory"]["mode"] == "streaming" and rep["memory"]["budget_bytes"] == 1 << 20
    _, rep = _run(folder, RECIPES["wanda"](), corpus, tmp_path / "p", stream=None, max_memory=1 << 40)
    assert rep["memory"]["mode"] == "in-memory"


@pytest.mark.parametrize("text, n", [("8GiB", 8 << 30), ("512MiB", 512 << 20), ("3GB", 3 * 10**9), ("1.5G", int(1.5 * 10**9)),
                                     ("1000", 1000)])
def test_parse_size(text, n):
    from lmpress.stream import parse_size

    assert parse_size(text) == n


def test_parse_size_refuses_nonsense():
    from lmpress.stream import parse_size

    with pytest.raises(InputError, match="8GiB"):
        parse_size("lots")


PEAK_SCRIPT = r"""
import json, sys
import torch
torch.set_num_threads(1)
from lmpress.api import compress
from lmpress.data import DataConfig
from lmpress.recipe import make_config
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
folder, warm, corpus, out, method, stream = sys.argv[1:7]
cfg = make_config("gptq", bits=4, group_size=64) if method == "gptq" else make_config("wanda", sparsity=0.5)
data = DataConfig(corpus=corpus, calib_samples=4, calib_len=32, eval_tokens=256)
run = lambda src, dst: compress(src, [cfg], data=data, out=dst, measure=False, progress=False, stream=stream == "1")
run(warm, out + "-warm")  # one-time costs (imports, kernels, oneDNN and LAPACK workspaces) on a tiny model
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
base = status("VmRSS")
_, rep = run(folder, out)
print(json.dumps({"base": base, "peak": status("VmHWM"), "mode": rep["memory"]["mode"]}))
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return big_folders(tmp_path_factory.mktemp("big"))


def big_folders(tmp: Path):
    """A model whose weights on disk (210 MB float32, 32 blocks) are far above what streaming may hold,
    a small one of the same width for the warm-up, and a corpus."""
    folder = save_model(_model(layers=32, hidden=384, inter=1024, seed=1), tmp / "src", tokenizer=_tok(tmp))
    warm = save_model(_model(layers=2, hidden=384, inter=1024, seed=2), tmp / "warm", tokenizer=_tok(tmp))
    return folder, warm, _corpus(tmp)


@pytest.mark.memory
@pytest.mark.parametrize("method", ["gptq", "wanda"])
def test_streamed_peak_memory_stays_below_the_weights(big, tmp_path, method):
    """Measured peak-RSS check (no cgroup can be made here, and RLIMIT_AS counts the memory maps of
    the weight files): after a warm-up run, the streamed run's peak above the process's resident
    size stays under half the weights on disk, which the in-memory path holds twice (the original
    and the compressed copy); both write the same tensors."""
    folder, warm, corpus = big
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    figures = {}
    for stream in ("1", "0"):
        r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(folder), str(warm), str(corpus),
                            str(tmp_path / f"o{stream}"), method, stream], capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        figures[stream] = json.loads(r.stdout.strip().splitlines()[-1])
    streamed = figures["1"]["peak"] - figures["1"]["base"]
    in_memory = figures["0"]["peak"] - figures["0"]["base"]
    assert figures["1"]["mode"] == "streaming" and figures["0"]["mode"] == "in-memory"
    print(f"weights {weights:,} B; peak above baseline: streamed {streamed:,} B, in memory {in_memory:,} B")
    assert streamed < weights / 2, (streamed, weights)
    assert in_memory > weights, (in_memory, weights)
    assert _tensors(tmp_path / "o1") == _tensors(tmp_path / "o0")


def test_cli_max_memory_streams_and_reports_the_peak(src, tmp_path, capsys):
    from lmpress.cli import main

    folder, corpus = src
    code = main(["compress", str(folder), "--data", str(corpus), "--method", "wanda", "--sparsity", "0.5",
                 "--calib-samples", "6", "--calib-len", "32", "--max-memory", "1MiB", "-o", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 0 and "peak memory (RSS)" in out and "streamed block by block" in out and "lmpress eval" in out
    assert (tmp_path / "o" / "model.safetensors.index.json").exists()
    code = main(["compress", str(folder), "--data", str(corpus), "--method", "wanda", "--sparsity", "0.5",
                 "--max-memory", "lots", "-o", str(tmp_path / "p")])
    assert code == 2 and "--max-memory 'lots'" in capsys.readouterr().err and not (tmp_path / "p").exists()
