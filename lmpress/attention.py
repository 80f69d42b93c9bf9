"""Grouped-query attention for one decoded token without copying the KV cache, also under torch.compile.

transformers' SDPA attention repeats every key/value head ``num_key_value_groups`` times
(``repeat_kv``) before calling ``scaled_dot_product_attention``, except for a single query token in
eager mode, where it packs the query heads of a group as rows instead (``pack_gqa``). Under
``torch.compile`` it always repeats: with a static cache that is a copy of the whole cache per
layer and token (SmolLM2, 9 query / 3 key-value heads, prompt 256: 2 x 9 x 288 x 64 floats = 1.3 MB
written and read again per layer, 40 MB per token, half the bytes of the 4-bit weights).

:func:`grouped_sdpa` packs the query heads for one query token in both modes (``query`` (B, H, 1, D)
-> (B, H_kv, H / H_kv, D): each key/value head attends for its group of query heads at once) and
leaves every other case to transformers' ``sdpa_attention_forward``. The math is the same attention,
row by row. :func:`use_grouped_sdpa_` switches a model to it (a registered attention implementation,
``"lmpress_sdpa"``, with transformers' SDPA masks).
"""

from __future__ import annotations

import torch

NAME = "lmpress_sdpa"


def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function interface: ``(attn_output (B, T, H, D), None)``."""
    from transformers.integrations.sdpa_attention import pack_gqa, sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    plain = query.shape[2] != 1 or groups == 1 or dropout or any(kwargs.get(k) is not None for k in ("softcap", "position_bias"))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, h, _, d = query.shape
    q = query.reshape(b, h // groups, groups, d)  # (B, H_kv, groups, D): the group's query heads as rows
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=pack_gqa(attention_mask, groups),
                                                           scale=scaling)  # (B, H_kv, groups, D)
    return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None  # (B, 1, H, D)


def use_grouped_sdpa_(model) -> bool:
    """Switch ``model`` (SDPA attention) to :func:`grouped_sdpa`; False (unchanged) for another attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    current = getattr(model.config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa":
        return False
    AttentionInterface.register(NAME, grouped_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
