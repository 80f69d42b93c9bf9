"""A GGUF lmpress wrote, run in llama.cpp itself (llama-cpp-python): its logits are lmpress's.

llama.cpp's CPU matmuls round the activations to 8 bits (Q8_0 / Q8_K) and keep the KV cache in fp16,
which on this tiny model (init 0.02) costs a KL of about 1e-5 per token: the bound is 1e-4. A byte laid
out wrongly costs about 1e-1; the 4-bit weight grids themselves cost about 1e-3, so for them the test
also shows llama.cpp runs lmpress's grid and not the float weights.
"""

import importlib
import json
import math
import os

import pytest
import torch

pytestmark = pytest.mark.llamacpp
try:
    import llama_cpp
except ImportError:
    if os.environ.get("CI") == "true":  # CI installs the llamacpp extra: there a missing package is a failure
        raise
    pytest.skip("llama-cpp-python is not installed (pip install 'lmpress[llamacpp]')", allow_module_level=True)

evaluate = importlib.import_module("lmpress.evaluate")  # the module (lmpress.evaluate is the API function)
from lmpress.formats.gguf import write_gguf  # noqa: E402
from lmpress.llamacpp import evaluate_gguf, speed  # noqa: E402
from lmpress.quant import ggml  # noqa: E402
from tests.test_gguf_writer import SPM_TEXTS, bpe_tokenizer, grid_model, spm_tokenizer, tiny_llama  # noqa: E402


@pytest.mark.parametrize("gtype,arch", [*[(t, "llama") for t in ggml.TYPES], ("Q4_K", "qwen2"), ("Q8_0", "qwen2"),
                                        ("Q4_K", "qwen3"), ("IQ4_NL", "qwen3"), ("Q4_K", "gemma3"), ("Q6_K", "gemma3")])
def test_llama_cpp_logits_match_lmpress(tmp_path, gtype, arch):
    model, tok = tiny_llama(hidden=256, inter=512, arch=arch, tied=arch in ("llama", "gemma3"), init=0.02), bpe_tokenizer()
    path = tmp_path / f"m.{gtype}.gguf"
    write_gguf(model, tok, path, gtype, {}, pre="default")
    ids = tok.encode("the quick brown fox jumps over the lazy dog")
    llm = llama_cpp.Llama(str(path), logits_all=True, n_threads=1, n_ctx=64, verbose=False)
    assert llm.tokenize(b"the quick brown fox jumps over the lazy dog", add_bos=False, special=False) == ids
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)  # (T, V)
    llm.close()
    with torch.no_grad():
        ref = grid_model(model, gtype)(torch.tensor([ids])).logits[0]
        float_logits = model(torch.tensor([ids])).logits[0]
    kl = _kl(ref, got)
    # Gemma 3 scales the embedding by sqrt(hidden) (16 here): larger activations, so llama.cpp's 8-bit
    # activation rounding costs more (Q8_0 too: about 5e-5); a wrong layout still costs 1e-1
    assert kl.max() < (2e-4 if arch == "gemma3" else 1e-4), kl
    if ggml.TYPES[gtype].bits <= 4:  # llama.cpp is far closer to lmpress's grid than the float model is
        assert _kl(ref, float_logits).max() > 10 * kl.max()


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_llama_cpp_tokenizes_sentencepiece_as_hf(tmp_path, arch):
    """A SentencePiece vocabulary (Gemma's flavour; Llama 2's, with its space prefix) tokenizes in llama.cpp to
    the Hugging Face ids: spaces, newlines, tabs, digits, accents, a byte-fallback emoji, control tokens, BOS.
    One exception, Llama 2's: text that starts with a space, which transformers' Metaspace leaves without its
    prefix space and llama.cpp prefixes as SentencePiece itself does."""
    tok, sp = spm_tokenizer(prefix=arch == "llama")
    write_gguf(tiny_llama(hidden=64, inter=128, arch=arch, vocab=416), tok, tmp_path / "m.gguf", "Q8_0", {})
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    for t in SPM_TEXTS:
        got = llm.tokenize(t.encode(), add_bos=True, special=True)
        want = [tok.bos_token_id, *sp.encode(t)] if arch == "llama" and t[0] == " " else tok.encode(t)
        assert got == want, t
    llm.close()


def _kl(p_logits, q_logits):
    """KL(p || q) per token (T,) of two (T, V) logit tensors."""
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def _tiny_file(tmp_path, gtype="Q4_0"):
    model, tok = tiny_llama(hidden=256, inter=512, init=0.02), bpe_tokenizer()
    path = tmp_path / f"m.{gtype}.gguf"
    write_gguf(model, tok, path, gtype, {}, pre="default")
    return model, tok, path


def test_engine_scores_lmpress_windows(tmp_path):
    """evaluate_gguf: llama.cpp's perplexity and KL on lmpress's windows are lmpress's figures of the grid
    model (to llama.cpp's 8-bit activations), and its KL to the float model is lmpress's too."""
    model, _, path = _tiny_file(tmp_path)
    grid = grid_model(model, "Q4_0")
    stream = torch.randint(3, 320, (200,), generator=torch.Generator().manual_seed(0))
    kw = dict(context=32, bos=1, measure_speed=False, n_threads=1)
    to_grid = evaluate_gguf(path, stream, reference=grid, **kw)
    ppl = evaluate.perplexity(grid, stream, context=32, bos=1)
    assert to_grid["eval_tokens"] == ppl.tokens == 6 * 31  # the same windows: 6 of 31 text tokens after BOS
    assert abs(to_grid["nll"] - ppl.nll) < 1e-3
    assert to_grid["kl"] < 1e-4 and to_grid["top1"] > 0.95
    to_float = evaluate_gguf(path, stream, reference=model, **kw)
    lmpress_kl = evaluate.compare(grid, model, stream, context=32, bos=1).kl
    assert to_float["kl"] > 10 * to_grid["kl"]  # llama.cpp runs the grid, not the float weights
    assert abs(to_float["kl"] - lmpress_kl) < 0.05 * lmpress_kl


def test_engine_speed_is_llama_cpps_own_timing(tmp_path):
    _, _, path = _tiny_file(tmp_path)
    s = speed(path, prompt_tokens=16, new_tokens=4, repeats=2, n_threads=1)
    assert (s.prompt_tokens, s.new_tokens) == (16, 4)
    assert math.isfinite(s.prefill_tps) and s.prefill_tps > 0 and math.isfinite(s.decode_tps) and s.decode_tps > 0


def test_cli_eval_engine_llama_cpp(tmp_path, capsys):
    """lmpress eval FILE.gguf --engine llama.cpp: both engines' figures, on the same tokens, side by side."""
    from lmpress.cli import main
    from lmpress.io import save_model

    model, tok, path = _tiny_file(tmp_path, "Q8_0")
    ref = save_model(model, tmp_path / "float", tokenizer=tok, format="hf")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(200)))
    out = tmp_path / "res.json"
    rc = main(["eval", str(path), "--engine", "llama.cpp", "--reference", str(ref), "--data", str(corpus),
               "--eval-tokens", "128", "--context", "32", "--no-speed", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    ours, theirs = res, res["llama.cpp"]
    assert theirs["engine"] == "llama.cpp" and theirs["eval_tokens"] == ours["eval_tokens"]
    assert abs(theirs["nll"] - ours["nll"]) < 1e-2 and abs(theirs["kl"] - ours["kl"]) < 1e-3
    printed = capsys.readouterr().out
    assert "llama.cpp" in printed and "lmpress (dequantized, PyTorch)" in printed


MIX = ({"pattern": r"layers\.0\.mlp\.down_proj", "gguf": "Q8_0"}, {"pattern": r"self_attn\.(q|k)_proj", "gguf": "IQ4_NL"},
       {"pattern": r"layers\.1\.mlp", "gguf": "Q5_K"})


@pytest.mark.parametrize("method,gtype,overrides", [("gptq", "Q4_0", ()), ("gptq", "IQ4_NL", ()), ("gptq", "Q4_K_M", ()),
                                                    ("gptq", "Q3_K_S", ()), ("gptq", "Q2_K", ()), ("gptq", "Q6_K", ()),
                                                    ("awq", "Q5_0", ()), ("gptq", "Q4_0", MIX)])
def test_llama_cpp_runs_the_solved_model(tmp_path, method, gtype, overrides):
    """A model solved on llama.cpp's grids (GPTQ's codes, searched scales; a mix by overrides too) runs in
    llama.cpp as lmpress computes it."""
    from lmpress.api import apply_
    from lmpress.recipe import make_config

    model, tok = tiny_llama(hidden=256, inter=512, init=0.02), bpe_tokenizer()
    text = "the quick brown fox jumps over the lazy dog. a model compressed is a model measured. " * 40
    ids = torch.tensor(tok.encode(text)[:256]).reshape(4, 64)
    apply_(model, make_config(method, gguf=gtype, overrides=overrides), ids, progress=False)
    path = tmp_path / f"m.{gtype}.gguf"
    write_gguf(model, tok, path, gtype, {}, pre="default", types={})
    if overrides:
        import gguf

        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
        assert (types["blk.0.ffn_down.weight"], types["blk.1.attn_q.weight"], types["blk.1.ffn_gate.weight"],
                types["blk.0.ffn_up.weight"]) == ("Q8_0", "IQ4_NL", "Q5_K", "Q4_0")
    ids = tok.encode("the quick brown fox jumps over")
    llm = llama_cpp.Llama(str(path), logits_all=True, n_threads=1, n_ctx=64, verbose=False)
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)
    llm.close()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    assert _kl(ref, got).max() < 1e-4
