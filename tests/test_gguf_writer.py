"""GGUF writer: the file reads back, every tensor holds the grid values written, transformers loads it."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmpress.errors import InputError  # noqa: E402
from lmpress.formats.gguf import permute_qk, write_gguf  # noqa: E402
from lmpress.quant import ggml  # noqa: E402


def bpe_tokenizer(vocab_size=320):
    """A real byte-level BPE (GPT-2 style) trained in-process on a few sentences, with <s> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "a model compressed is a model measured"] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llama(hidden=64, inter=128, vocab=320, seed=0, tied=True, arch="llama", init=0.08):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    torch.manual_seed(seed)
    extra = {}
    if arch == "gemma3":  # a sliding window shorter than the test prompts, so both layer kinds are exercised
        extra = dict(head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4, sliding_window=4, pad_token_id=0,
                     layer_types=["sliding_attention", "full_attention"])
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "gemma3": Gemma3TextConfig}[arch](
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=tied, initializer_range=init, **extra)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a mix-up of them shows
        for n, p in model.named_parameters():
            if "norm" in n:  # Gemma 3's norms scale by (1 + weight): the same gains
                p.uniform_(0.5, 1.5).sub_(1.0 if arch == "gemma3" else 0.0)
            elif n.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def grid_model(model, gtype, embed_type="Q8_0"):
    """The float model holding exactly the values a GGUF of ``model`` stores (lmpress's own dequantization)."""
    from lmpress.formats.gguf import _tensor_types, architecture
    import copy

    arch = gguf.MODEL_ARCH[architecture(model).upper()]
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in out.named_parameters():
            t = _tensor_types(names.get_name(n, try_suffixes=(".weight", ".bias")), tuple(p.shape), gtype, embed_type)
            if t in ggml.TYPES:
                p.copy_(ggml.dequantize(ggml.quantize(p.float(), t)))
    return out


@pytest.mark.parametrize("gtype", ["Q4_0", "Q4_K"])
def test_file_reads_back_tensor_by_tensor(tmp_path, gtype):
    model, tok = tiny_llama(hidden=256, inter=320), bpe_tokenizer()
    path = tmp_path / f"m.{gtype}.gguf"
    types = write_gguf(model, tok, path, gtype, {"recipe": [{"method": "rtn"}]}, pre="default")
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed
    r = gguf.GGUFReader(path)
    f = r.fields
    assert f["general.architecture"].contents() == "llama" and f["llama.block_count"].contents() == 2
    assert f["tokenizer.ggml.model"].contents() == "gpt2" and f["tokenizer.ggml.bos_token_id"].contents() == 1
    assert len(f["tokenizer.ggml.tokens"].contents()) == 320 and f["tokenizer.ggml.merges"].contents()
    assert json.loads(f["lmpress.metadata"].contents()) == {"recipe": [{"method": "rtn"}]}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["blk.0.attn_q.weight"] == gtype and types["blk.0.ffn_down.weight"] == ggml.fallback_type(gtype, 320)
    sd, cfg = model.state_dict(), model.config
    want = {"blk.1.attn_q.weight": permute_qk(sd["model.layers.1.self_attn.q_proj.weight"], cfg.num_attention_heads),
            "blk.1.attn_k.weight": permute_qk(sd["model.layers.1.self_attn.k_proj.weight"], cfg.num_key_value_heads),
            "blk.1.ffn_down.weight": sd["model.layers.1.mlp.down_proj.weight"],
            "token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    got = {t.name: t for t in r.tensors}
    assert len(got) == len(types)
    for name, w in want.items():
        t = got[name]
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        expect = w.numpy() if types[name] == "F32" else ggml.dequantize(ggml.quantize(w, types[name])).numpy()
        assert np.array_equal(values, expect), name


def test_permute_is_a_row_permutation_per_head():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of head_dim 8
    p = permute_qk(w, 2)
    assert torch.equal(p[0], w[0]) and torch.equal(p[1], w[4]) and torch.equal(p[2], w[1]) and torch.equal(p[8], w[8])
    assert sorted(p[:, 0].tolist()) == w[:, 0].tolist()


@pytest.mark.parametrize("gtype,arch,tied", [("Q8_0", "llama", True), ("Q4_K", "llama", False), ("Q5_1", "qwen2", False)])
def test_transformers_gguf_loader_gives_lmpress_logits(tmp_path, gtype, arch, tied):
    from lmpress.io import load_gguf

    model, tok = tiny_llama(hidden=256, inter=512, arch=arch, tied=tied), bpe_tokenizer()
    path = tmp_path / "m.gguf"
    write_gguf(model, tok, path, gtype, {}, pre="default")
    loaded, loaded_tok = load_gguf(path)
    ids = torch.tensor([tok.encode("the quick brown fox jumps")])
    assert loaded_tok.encode("the quick brown fox jumps") == ids[0].tolist()
    with torch.no_grad():
        ref = grid_model(model, gtype)(ids).logits
        got = loaded(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_refuses_what_it_cannot_write(tmp_path):
    from tests.tiny import tiny_model

    with pytest.raises(InputError, match="GGUF output supports"):
        write_gguf(tiny_model("gpt2"), bpe_tokenizer(), tmp_path / "m.gguf", "Q8_0", {})
    with pytest.raises(InputError, match="pre-tokenizer"):
        write_gguf(tiny_llama(), bpe_tokenizer(), tmp_path / "m.gguf", "Q8_0", {})
    with pytest.raises(InputError, match="does not exist"):
        write_gguf(tiny_llama(), bpe_tokenizer(), tmp_path / "no" / "m.gguf", "Q8_0", {}, pre="default")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_other_architectures_read_back_with_the_same_logits(tmp_path, arch):
    """lmpress.load_model of a Qwen3 / Gemma 3 file: the logits of the values it stores. Gemma 3 needs the
    sliding-window layout and query scale restored, which transformers' GGUF reader drops (a head size of
    64, not the 256 it assumes, and a window shorter than the prompt make either slip show)."""
    from lmpress.io import load_model

    model, tok = tiny_llama(hidden=256, inter=512, arch=arch, tied=arch == "gemma3", init=0.02), bpe_tokenizer()
    write_gguf(model, tok, tmp_path / "m.gguf", "Q8_0", {}, pre="default")
    loaded, _ = load_model(tmp_path / "m.gguf")
    ids = torch.tensor([tok.encode("the quick brown fox jumps over the lazy dog")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, grid_model(model, "Q8_0")(ids).logits, atol=1e-4, rtol=1e-4)
