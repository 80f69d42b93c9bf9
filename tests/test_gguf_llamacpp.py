"""A GGUF lmpress wrote, run in llama.cpp itself (llama-cpp-python): its logits are lmpress's.

llama.cpp's CPU matmuls round the activations to 8 bits (Q8_0 / Q8_K) and keep the KV cache in fp16,
which on this tiny model (init 0.02) costs a KL of about 1e-5 per token: the bound is 1e-4. A byte laid
out wrongly costs about 1e-1; the 4-bit weight grids themselves cost about 1e-3, so for them the test
also shows llama.cpp runs lmpress's grid and not the float weights.
"""

import pytest
import torch

pytestmark = pytest.mark.llamacpp
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

from lmpress.formats.gguf import write_gguf  # noqa: E402
from lmpress.quant import ggml  # noqa: E402
from tests.test_gguf_writer import bpe_tokenizer, grid_model, tiny_llama  # noqa: E402


@pytest.mark.parametrize("gtype,arch", [*[(t, "llama") for t in ggml.TYPES], ("Q4_K", "qwen2"), ("Q8_0", "qwen2")])
def test_llama_cpp_logits_match_lmpress(tmp_path, gtype, arch):
    model, tok = tiny_llama(hidden=256, inter=512, arch=arch, tied=arch == "llama", init=0.02), bpe_tokenizer()
    path = tmp_path / f"m.{gtype}.gguf"
    write_gguf(model, tok, path, gtype, {}, pre="default")
    ids = tok.encode("the quick brown fox jumps over")
    llm = llama_cpp.Llama(str(path), logits_all=True, n_threads=1, n_ctx=64, verbose=False)
    assert llm.tokenize(b"the quick brown fox jumps over", add_bos=False, special=False) == ids
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)  # (T, V)
    llm.close()
    with torch.no_grad():
        ref = grid_model(model, gtype)(torch.tensor([ids])).logits[0]
        float_logits = model(torch.tensor([ids])).logits[0]
    kl = _kl(ref, got)
    assert kl.max() < 1e-4, kl
    if ggml.TYPES[gtype].bits <= 4:  # llama.cpp is far closer to lmpress's grid than the float model is
        assert _kl(ref, float_logits).max() > 10 * kl.max()


def _kl(p_logits, q_logits):
    """KL(p || q) per token (T,) of two (T, V) logit tensors."""
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


@pytest.mark.parametrize("method,gtype", [("gptq", "Q4_0"), ("gptq", "IQ4_NL"), ("gptq", "Q4_K_M"), ("gptq", "Q3_K_S"),
                                          ("gptq", "Q2_K"), ("gptq", "Q6_K"), ("awq", "Q5_0")])
def test_llama_cpp_runs_the_solved_model(tmp_path, method, gtype):
    """A model solved on llama.cpp's grids (GPTQ's codes, searched scales) runs in llama.cpp as lmpress computes it."""
    from lmpress.api import apply_
    from lmpress.recipe import make_config

    model, tok = tiny_llama(hidden=256, inter=512, init=0.02), bpe_tokenizer()
    text = "the quick brown fox jumps over the lazy dog. a model compressed is a model measured. " * 40
    ids = torch.tensor(tok.encode(text)[:256]).reshape(4, 64)
    apply_(model, make_config(method, gguf=gtype), ids, progress=False)
    path = tmp_path / f"m.{gtype}.gguf"
    write_gguf(model, tok, path, gtype, {}, pre="default", types={})
    ids = tok.encode("the quick brown fox jumps over")
    llm = llama_cpp.Llama(str(path), logits_all=True, n_threads=1, n_ctx=64, verbose=False)
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)
    llm.close()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    assert _kl(ref, got).max() < 1e-4
