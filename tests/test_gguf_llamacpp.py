"""A GGUF lmpress wrote, run in llama.cpp itself (llama-cpp-python): its logits are lmpress's."""

import pytest
import torch

pytestmark = pytest.mark.llamacpp
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

from lmpress.formats.gguf import write_gguf  # noqa: E402
from tests.test_gguf_writer import bpe_tokenizer, grid_model, tiny_llama  # noqa: E402


@pytest.mark.parametrize("gtype,arch", [("Q8_0", "llama"), ("Q4_0", "llama"), ("Q4_K", "llama"), ("Q6_K", "llama"),
                                        ("Q4_K", "qwen2")])
def test_llama_cpp_logits_match_lmpress(tmp_path, gtype, arch):
    model, tok = tiny_llama(hidden=256, inter=512, arch=arch, tied=arch == "llama"), bpe_tokenizer()
    path = tmp_path / f"m.{gtype}.gguf"
    write_gguf(model, tok, path, gtype, {}, pre="default")
    ids = tok.encode("the quick brown fox jumps over")
    llm = llama_cpp.Llama(str(path), logits_all=True, n_threads=1, n_ctx=64, verbose=False)
    assert llm.tokenize(b"the quick brown fox jumps over", add_bos=False, special=False) == ids
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)  # (T, V)
    with torch.no_grad():
        ref = grid_model(model, gtype)(torch.tensor([ids])).logits[0]
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)  # KL(lmpress || llama.cpp) per token
    assert kl.max() < 1e-4, kl
