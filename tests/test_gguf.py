"""GGUF loading: a tiny Llama written with ``gguf.GGUFWriter`` the way llama.cpp's converter writes it
(Q/K rows permuted for its rope layout, byte-level BPE tokenizer in the metadata) must come back
through ``lmpress.io`` with every weight exact, a working tokenizer and forward pass; damaged files
must fail with an ``InputError`` that names the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gguf_writer import (
    EOS, FFN, HEADS, HIDDEN, KV_HEADS, LAYERS, RMS_EPS, ROPE_THETA, permute_qk, tiny_vocab, write_tiny_llama_gguf,
)
from lmpress.errors import InputError
from lmpress.io import load_gguf, load_model, save_model

VARIANTS = {"f32": dict(f16=False, tied=False), "f16-tied": dict(f16=True, tied=True)}
TEXT = " the hello world"


@pytest.fixture(scope="module", params=list(VARIANTS))
def written(request, tmp_path_factory):
    """``(path, {hf_name: float32 ndarray}, variant options)`` for one variant of the file."""
    path = tmp_path_factory.mktemp(request.param) / "tiny-llama.gguf"
    options = VARIANTS[request.param]
    return path, write_tiny_llama_gguf(path, seed=len(request.param), **options), options


@pytest.fixture(scope="module")
def loaded(written):
    return load_gguf(written[0])


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("f32-only") / "tiny-llama.gguf"
    write_tiny_llama_gguf(path, seed=7)
    return path


def _ids(tok, text=TEXT):
    return torch.tensor([tok.encode(text, add_special_tokens=False)])


def test_writer_permutes_q_and_k():
    """The helper writes what llama.cpp writes: the permutation is a real reordering, not the identity."""
    w = np.arange(HEADS * (HIDDEN // HEADS) * 3, dtype=np.float32).reshape(-1, 3)
    assert not np.array_equal(permute_qk(w, HEADS, HEADS), w)
    k = w[: KV_HEADS * (HIDDEN // HEADS)]
    assert not np.array_equal(permute_qk(k, HEADS, KV_HEADS), k)
    assert sorted(permute_qk(w, HEADS, HEADS)[:, 0].tolist()) == w[:, 0].tolist()  # rows reordered, nothing lost


def test_every_weight_round_trips(written, loaded):
    _, expected, options = written
    model, _ = loaded
    state = model.state_dict()
    assert set(state) == set(expected)
    for name, value in expected.items():
        got = state[name]
        assert got.dtype == torch.float32, name
        assert torch.equal(got, torch.from_numpy(value)), f"{name} differs from what was written"
    if options["tied"]:
        assert model.config.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert not model.config.tie_word_embeddings
    assert not model.training


def test_config_from_metadata(loaded):
    cfg = loaded[0].config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (HIDDEN, LAYERS, FFN)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (HEADS, KV_HEADS, HIDDEN // HEADS)
    assert cfg.vocab_size == len(tiny_vocab()[0])
    assert cfg.rms_norm_eps == pytest.approx(RMS_EPS)
    assert cfg.rope_parameters["rope_theta"] == pytest.approx(ROPE_THETA)
    assert getattr(cfg, "quantization_config", None) is None  # dropped, so the model saves as a plain one


def test_forward_matches_reference_llama(written, loaded):
    """Logits equal those of a Llama built directly from the original (unpermuted) weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, expected, _ = written
    model, tok = loaded
    ref_cfg = LlamaConfig(
        vocab_size=len(tiny_vocab()[0]), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=RMS_EPS, rope_theta=ROPE_THETA,
        max_position_embeddings=128, tie_word_embeddings=model.config.tie_word_embeddings,
    )
    ref = LlamaForCausalLM(ref_cfg).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()})
    ids = _ids(tok, TEXT + " and the world")
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert got.shape == (1, ids.shape[1], ref_cfg.vocab_size)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_tokenizer_round_trips(loaded):
    _, tok = loaded
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["Ġthe", "Ġhello", "Ġworld"]  # the file's merges were applied
    for text in [TEXT, "Hello, world! 123", "héllo wörld ✓ and\nthe end"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.eos_token == EOS and tok.eos_token_id == len(tiny_vocab()[0]) - 1
    assert tok.encode(EOS, add_special_tokens=False) == [tok.eos_token_id]  # control token stays whole


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_file_is_an_input_error(f32_file, tmp_path, damage):
    data = f32_file.read_bytes()
    bad = tmp_path / f"{damage}.gguf"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, len(data) // 4, dtype=np.uint8).tobytes())
    for loader in (load_gguf, load_model):
        with pytest.raises(InputError) as err:
            loader(bad)
        msg = str(err.value)
        assert str(bad) in msg
        assert "truncated" in msg or "corrupt" in msg


def test_load_model_then_save_and_reload(f32_file, tmp_path):
    model, tok = load_model(f32_file)
    ref, _ = load_gguf(f32_file)
    assert not model.training
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name

    out = save_model(model, tmp_path / "out", tokenizer=tok)
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    model2, tok2 = load_model(out)
    ids = _ids(tok)
    assert tok2.encode(TEXT, add_special_tokens=False) == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model2(ids).logits)

    with pytest.raises(InputError, match="already exists"):
        save_model(model, out, tokenizer=tok)
