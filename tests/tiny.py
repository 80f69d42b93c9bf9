"""Tiny random decoder models of each supported layout, built in-process (no downloads)."""

from __future__ import annotations

import torch


def tiny_config(kind: str):
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=256, max_position_embeddings=256)
    if kind == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, **common)
    if kind == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, **common)
    if kind == "gemma3":
        return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, sliding_window=8,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"], **common)
    if kind == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=256)
    if kind == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=64, **common)
    raise ValueError(kind)


KINDS = ["llama", "qwen2", "gemma3", "gpt2", "opt"]


def tiny_model(kind: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation="sdpa")
    return model.eval()
