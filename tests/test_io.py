import json

import pytest
import torch
from tiny import tiny_model

from lmpress import io
from lmpress.errors import InputError


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("llama")
    out = io.save_model(model, tmp_path / "m")
    return model, out


def _load_weights_only(path):
    # load_model also wants a tokenizer; these tests check the weight paths
    return io._from_pretrained(path, None, False, False)


def test_save_load_roundtrip_same_logits(saved):
    model, out = saved
    io._check_folder(out, allow_pickle=False)
    again = _load_weights_only(out)
    ids = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_save_refuses_existing_and_leaves_nothing_on_failure(saved, tmp_path, monkeypatch):
    model, out = saved
    with pytest.raises(InputError, match="already exists"):
        io.save_model(model, out)

    def boom(writer, model, tmp, metadata, tokenizer):
        (tmp / "partial.safetensors").write_bytes(b"xx")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(io, "_write", boom)
    with pytest.raises(RuntimeError):
        io.save_model(model, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_missing_model_is_clear():
    with pytest.raises(InputError, match="no such model"):
        io.resolve_model_path("/nonexistent/model")


def test_folder_without_config(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        io._check_folder(tmp_path, allow_pickle=False)


def test_truncated_safetensors(saved):
    _, out = saved
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        io._check_folder(out, allow_pickle=False)
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(InputError, match="corrupt"):
        io._check_folder(out, allow_pickle=False)


def test_corrupt_config(saved):
    _, out = saved
    (out / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        io._check_folder(out, allow_pickle=False)


def test_pickle_refused_unless_allowed(saved):
    model, out = saved
    (out / "model.safetensors").unlink()
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    with pytest.raises(InputError, match="pickle"):
        io.load_model(out)
    assert io._check_folder(out, allow_pickle=True)["model_type"] == "llama"


def test_remote_code_refused_by_default(saved):
    _, out = saved
    cfg = json.loads((out / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="trust-remote-code"):
        io.load_model(out)


def test_non_decoder_refused(tmp_path):
    from transformers import BertConfig, BertModel

    m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100))
    m.save_pretrained(tmp_path / "bert")
    with pytest.raises(InputError, match="not a decoder language model"):
        io.load_model(tmp_path / "bert")


def test_model_file_must_be_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(InputError, match=".gguf"):
        io.load_model(f)


@pytest.mark.parametrize("fmt", ["lmpress", "hf", "compressed-tensors"])
def test_saves_are_byte_reproducible(tmp_path, fmt):
    """Two saves of one model give identical files (a multi-key safetensors header came out in a
    different key order from save to save)."""
    import hashlib

    from lmpress.recipe import RunContext, apply, make_config

    model = tiny_model("llama")
    if fmt != "hf":
        apply(model, make_config("rtn", bits=4, group_size=32), RunContext(progress=False))
    digests = set()
    for i in range(8):  # safetensors ordered two header keys at random: 8 saves agree by chance 1 time in 128
        out = io.save_model(model, tmp_path / f"m{i}", format=fmt, recipe=[{"method": "rtn"}])
        digests.add(tuple(hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())))
    assert len(digests) == 1
