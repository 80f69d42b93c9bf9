"""Write a tiny random Llama GGUF file the way llama.cpp's converter does (no downloads).

``write_tiny_llama_gguf`` returns the weights in Hugging Face naming and layout, so a test can
compare what a loader gives back against what was written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 64, 2, 4, 2, 128, 128
HEAD_DIM = HIDDEN // HEADS
RMS_EPS, ROPE_THETA = 1e-5, 10000.0

# Byte-level BPE merges (GPT-2 alphabet: "Ġ" is a space). Each result is a token, and each part is a
# byte or the result of an earlier merge.
MERGES = [
    "Ġ t", "h e", "Ġt he", "Ġ a", "i n", "e r", "o n", "r e", "Ġ s", "a t", "e n", "Ġ w", "o r", "Ġ o",
    "i s", "Ġ c", "e s", "l l", "Ġa n", "Ġan d", "Ġ f", "Ġ b", "i t", "Ġ p", "a n", "e d", "o u", "Ġ m",
    "in g", "Ġ h", "Ġ l", "Ġo f", "l o", "Ġ d", "he ll", "hell o", "Ġ hello", "Ġw or",
    "Ġwor l", "Ġworl d", "Ġ i", "Ġi s", "a r",
]
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """``(tokens, merges, token_types)``: 256 bytes, one token per merge, then the EOS control token."""
    tokens = [bytes_to_unicode()[b] for b in range(256)]
    for merge in MERGES:
        left, right = merge.split(" ")
        assert left in tokens and right in tokens, merge
        tokens.append(left + right)
    assert len(set(tokens)) == len(tokens)
    tokens.append(EOS)
    types = [1] * (len(tokens) - 1) + [3]  # 1 NORMAL, 3 CONTROL
    return tokens, list(MERGES), types


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): HF's rotate-half rows -> interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: str | Path, *, seed: int = 0, f16: bool = False, tied: bool = False) -> dict:
    """Write the file; return ``{hf_name: float32 ndarray}`` of the weights as the model should hold them.

    ``f16`` stores the matrices as F16 (norms stay F32, as llama.cpp does); the returned values are then
    the F16-rounded ones. ``tied`` omits ``output.weight``, so the head shares the embedding.
    """
    import gguf

    rng = np.random.default_rng(seed)
    tokens, merges, types = tiny_vocab()
    vocab = len(tokens)

    def mat(rows, cols):
        w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        return w.astype(np.float16) if f16 else w

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)

    hf: dict[str, np.ndarray] = {}
    tensors: list[tuple[str, np.ndarray]] = []  # (gguf name, array as written)

    def put(gguf_name, hf_name, w, written=None):
        hf[hf_name] = w.astype(np.float32)
        tensors.append((gguf_name, w if written is None else written))

    put("token_embd.weight", "model.embed_tokens.weight", mat(vocab, HIDDEN))
    for i in range(LAYERS):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", p + "input_layernorm.weight", norm())
        q, k = mat(HEADS * HEAD_DIM, HIDDEN), mat(KV_HEADS * HEAD_DIM, HIDDEN)
        put(b + "attn_q.weight", p + "self_attn.q_proj.weight", q, permute_qk(q, HEADS, HEADS))
        put(b + "attn_k.weight", p + "self_attn.k_proj.weight", k, permute_qk(k, HEADS, KV_HEADS))
        put(b + "attn_v.weight", p + "self_attn.v_proj.weight", mat(KV_HEADS * HEAD_DIM, HIDDEN))
        put(b + "attn_output.weight", p + "self_attn.o_proj.weight", mat(HIDDEN, HEADS * HEAD_DIM))
        put(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", norm())
        put(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", mat(FFN, HIDDEN))
        put(b + "ffn_up.weight", p + "mlp.up_proj.weight", mat(FFN, HIDDEN))
        put(b + "ffn_down.weight", p + "mlp.down_proj.weight", mat(HIDDEN, FFN))
    put("output_norm.weight", "model.norm.weight", norm())
    if tied:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    else:
        put("output.weight", "lm_head.weight", mat(vocab, HIDDEN))

    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("tiny-llama")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)
    w.add_add_bos_token(False)
    for name, arr in tensors:
        w.add_tensor(name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf
