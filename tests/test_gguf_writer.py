"""GGUF writer: the file reads back, every tensor holds the grid values written, transformers loads it."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmpress.errors import InputError  # noqa: E402
from lmpress.formats.gguf import permute_qk, write_gguf  # noqa: E402
from lmpress.quant import ggml  # noqa: E402


def gguf_ready(tmp_path, monkeypatch):
    """``(tokenizer, calibration text file)``: :func:`bpe_tokenizer`, registered as llama.cpp's 'default'
    pre-tokenizer for this test, and a text to calibrate on."""
    import hashlib

    from lmpress.formats import gguf as fg

    tok = bpe_tokenizer()
    h = hashlib.sha256(str(tok.encode(fg.CHECK_TEXT)).encode()).hexdigest()
    monkeypatch.setitem(fg.PRE_BY_HASH, h, "default")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. a model compressed is a model measured. " * 300)
    return tok, text


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


SPM_TEXTS = ["the quick brown fox jumps over the lazy dog", "  two  spaces,\nnew lines\n\n and\ttabs ",
             "digits 12345 and 3.14", "ünïcödé wörds: façade, naïve", "a llama 🦙 (byte fallback)",
             "doublespaces edog verthe façadelines",  # words run together: merged in the wrong order without scores
             "<start_of_turn>user\nhi<end_of_turn>"]


def spm_tokenizer(prefix=False):
    """A SentencePiece BPE trained in-process as Gemma's is (byte fallback, digits split, no dummy prefix,
    <pad> <eos> <bos> <unk> first, control tokens for turns), wrapped as transformers wraps Gemma's
    tokenizer.model (its merges: every split of a token into two tokens, in token order); ``prefix``:
    Llama 2's flavour instead (a dummy space prefix, <unk> <s> </s>)."""
    import io

    spm = pytest.importorskip("sentencepiece")
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer, LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    text = ["the quick brown fox jumps over the lazy dog", "a model compressed is a model measured",
            "numbers 123 4567 and  double  spaces\nnew lines\n\n", "wörds façade naïve ünïcödé"] * 30
    ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1) if prefix else dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                                                          bos_piece="<bos>", eos_piece="<eos>")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, model_type="bpe", vocab_size=400, byte_fallback=True,
        split_digits=True, add_dummy_prefix=prefix, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2,
        control_symbols=[] if prefix else ["<mask>", "<start_of_turn>", "<end_of_turn>"], **ids)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    if prefix:
        return LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_prefix_space=True, add_bos_token=True), sp
    tok = GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<start_of_turn>", "<end_of_turn>")],
                   special_tokens=True)
    return tok, sp


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


def test_spm_scores_follow_the_merge_order():
    from lmpress.formats.gguf import spm_scores

    merges = [["a", "b"], ["ab", "c"], ["a", "bc"], ["b", "c"]]  # "abc" twice: its first merge counts
    assert spm_scores(["a", "ab", "abc", "bc", "<s>"], merges) == [-4.0, 0.0, -1.0, -3.0, -4.0]


@pytest.mark.parametrize("prefix", [False, True])
def test_sentencepiece_vocab_reads_back(tmp_path, prefix):
    """A SentencePiece tokenizer (Gemma's flavour; Llama 2's with ``prefix``) is written as llama.cpp's converter
    writes it, and lmpress.load_model of the file gives a tokenizer with the same ids (BOS included)."""
    from lmpress.io import load_model

    tok, sp = spm_tokenizer(prefix)
    for t in SPM_TEXTS[:-1]:  # the fixture tokenizes as SentencePiece itself (but for a leading space with the prefix)
        assert tok.encode(t, add_special_tokens=False) == sp.encode(t) or prefix and t[0] == " ", t
    arch = "llama" if prefix else "gemma3"
    model = tiny_llama(hidden=64, inter=128, arch=arch, vocab=416)  # 16 ids the tokenizer does not use
    write_gguf(model, tok, tmp_path / "m.gguf", "Q8_0", {})
    f = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert f["tokenizer.ggml.model"].contents() == "llama" and f["tokenizer.ggml.pre"].contents() == "default"
    assert f["tokenizer.ggml.add_space_prefix"].contents() == prefix and f["tokenizer.ggml.add_bos_token"].contents()
    tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
    scores = f["tokenizer.ggml.scores"].contents()
    assert len(tokens) == len(types) == len(scores) == 416 and tokens[415] == "[PAD415]" and types[415] == 5
    unk, bos = tok.unk_token_id, tok.bos_token_id
    assert types[unk] == 2 and types[bos] == 3 and types[tokens.index("<0x41>")] == 6  # UNKNOWN, CONTROL, BYTE
    merged = tok.convert_ids_to_tokens(tok.encode("the quick", add_special_tokens=False))
    assert all(scores[tokens.index(m)] > scores[bos] for m in merged if len(m) > 1)
    _, loaded = load_model(tmp_path / "m.gguf")
    for t in SPM_TEXTS:
        assert loaded.encode(t) == tok.encode(t), t


def test_refuses_tokenizers_llama_cpp_would_run_differently(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], unk_id=0))
    plain_bpe = Tokenizer(models.BPE({"<unk>": 0, "a": 1, "b": 2, "ab": 3}, [("a", "b")], unk_token="<unk>"))
    split_words, _ = spm_tokenizer()
    split_words.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(split=True)
    cases = [(PreTrainedTokenizerFast(tokenizer_object=unigram), "a Unigram model"),
             (PreTrainedTokenizerFast(tokenizer_object=plain_bpe), "BPE without byte-level pre-tokenizer or byte fallback"),
             (split_words, "before its BPE")]
    for tok, why in cases:
        with pytest.raises(InputError, match=why):
            write_gguf(tiny_llama(vocab=416, arch="gemma3"), tok, tmp_path / "m.gguf", "Q8_0", {})
    assert not list(tmp_path.iterdir())
