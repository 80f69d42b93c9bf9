"""Which ggml type each tensor of a GGUF file gets: llama.cpp's rule for its named file types.

``llama-quantize model.gguf Q4_K_M`` does not store every tensor as Q4_K: ``llama_tensor_get_type``
(src/llama-quant.cpp, llama.cpp 0c1e57098 as vendored by llama-cpp-python 0.3.36) gives some
tensors more bits (attn_v and ffn_down of every third layer and of the first and last eighth, the
output head), then ``tensor_type_fallback`` demotes a tensor whose rows the type's block does not
divide (:func:`lmpress.quant.ggml.fallback_type`). :func:`tensor_type` is that rule, for the dense
decoders lmpress writes (no experts, no Falcon, no fused qkv), so that an lmpress file of type T
holds the same per-tensor types, and so the same bytes per weight, as llama.cpp's own file of T.

    >>> tensor_type("Q4_K_M", "blk.0.attn_v.weight", 576, Shape(n_layer=30, n_gqa=3, tied=True))
    'Q8_0'            # Q6_K by the rule; rows of 576 do not fit a 256-block: Q8_0
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError
from . import ggml

# llama-quantize's file types (tools/quantize/quantize.cpp) -> their default tensor type
FTYPES = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0", "IQ4_NL": "IQ4_NL",
          "Q2_K": "Q2_K", "Q2_K_S": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
          "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # llama-quantize's own aliases


@dataclass(frozen=True)
class Shape:
    """What the rule reads of a model: blocks, query heads per key-value head, tied embeddings."""

    n_layer: int
    n_gqa: int = 1
    tied: bool = True


def ftype(name: str) -> str:
    """The llama.cpp file type ``name`` stands for (an alias resolved), or a clear error."""
    name = ALIASES.get(name, name)
    if name not in FTYPES:
        raise InputError(f"unknown GGUF type {name!r}; lmpress writes {', '.join([*FTYPES, *ALIASES])}")
    return name


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _output_type(ft: str, cols: int) -> str:
    base = FTYPES[ft]
    if cols % ggml.TYPES[base].block:
        return "Q8_0"
    return base if base == "Q8_0" else "Q6_K"


def _attn_v(ft: str, i: int, s: Shape) -> str | None:
    return {"Q2_K": "Q4_K" if s.n_gqa >= 4 else "Q3_K",
            "Q2_K_S": "Q4_K" if s.n_gqa >= 4 else None,
            "Q3_K_M": "Q5_K" if i < 2 else "Q4_K",
            "Q3_K_L": "Q5_K",
            "IQ4_NL": "Q5_K" if s.n_gqa >= 4 else None,
            "Q4_K_M": "Q6_K" if _more_bits(i, s.n_layer) else None,
            "Q5_K_M": "Q6_K" if _more_bits(i, s.n_layer) else None,
            "Q4_K_S": "Q5_K" if i < 4 else None}.get(ft)


def _ffn_down(ft: str, i: int, n: int, imatrix: bool) -> str | None:
    if ft == "Q2_K":
        return "Q3_K"
    if ft == "Q2_K_S":
        return "Q4_K" if i < n // 8 else None
    if ft == "Q3_K_M":
        return "Q5_K" if i < n // 16 else "Q4_K"
    if ft == "Q3_K_L":
        return "Q5_K"
    if ft == "Q4_K_M":
        return "Q6_K" if _more_bits(i, n) else None
    if ft == "IQ4_NL" and i < n // 8 and not imatrix:
        return "Q5_K"
    if ft == "Q5_K_M":
        return "Q6_K" if _more_bits(i, n) else None
    if ft == "Q4_K_S":
        return "Q5_K" if i < n // 8 else None
    if ft in ("Q4_0", "Q5_0") and imatrix and i < n // 8:  # llama.cpp's guard for early ffn_down
        return "Q4_1" if ft == "Q4_0" else "Q5_1"
    return None


def _attn_output(ft: str) -> str | None:
    return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ft)


def rule_type(ft: str, name: str, cols: int, s: Shape, *, imatrix: bool) -> str:
    """llama_tensor_get_type_impl for the GGUF tensor ``name`` (rows of ``cols``), before the fallback."""
    if name == "output.weight" or (s.tied and name == "token_embd.weight"):
        return _output_type(ft, cols)
    if name == "token_embd.weight":
        return FTYPES[ft]
    m = re.match(r"blk\.(\d+)\.(\w+)\.weight$", name)
    kind, i = (m.group(2), int(m.group(1))) if m else ("", -1)
    new = None
    if kind == "attn_v":
        new = _attn_v(ft, i, s)
    elif kind == "ffn_down":
        new = _ffn_down(ft, i, s.n_layer, imatrix)
    elif kind == "attn_output":
        new = _attn_output(ft)
    return new or FTYPES[ft]


def tensor_type(name: str, tensor: str, cols: int, s: Shape, *, imatrix: bool = False,
                embed: str | None = None, output: str | None = None) -> str:
    """The ggml type llama-quantize gives the 2-D tensor ``tensor`` (GGUF name, rows of ``cols``) for
    the file type ``name``; ``imatrix``: as with an importance matrix (lmpress: a calibrated method);
    ``embed`` / ``output``: llama-quantize's --token-embedding-type / --output-tensor-type."""
    ft = ftype(name)
    if embed is not None and tensor == "token_embd.weight":
        return embed
    if output is not None and (tensor == "output.weight" or (s.tied and tensor == "token_embd.weight")):
        return output
    return ggml.fallback_type(rule_type(ft, tensor, cols, s, imatrix=imatrix), cols)


def shape_of(config) -> Shape:
    """The :class:`Shape` of a transformers config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return Shape(cfg.num_hidden_layers, cfg.num_attention_heads // kv, bool(getattr(cfg, "tie_word_embeddings", False)))


def plan(model, name: str, *, imatrix: bool, embed: str | None = None, output: str | None = None,
         overrides: tuple = ()) -> dict[str, str]:
    """``{parameter name of model: ggml type}`` for every matrix ``model`` (Llama, Qwen2, Qwen3) stores in a GGUF
    file of type ``name`` (the tied head, which the file does not store, has none). ``overrides``: a
    quantization config's rules; the first whose ``pattern`` matches a module name and that has a ``gguf``
    type gives that matrix the type (falling back as llama.cpp does where its block does not fit)."""
    from torch import nn

    from .. import arch
    from ..formats.gguf import gguf_names

    s = shape_of(model.config)
    out = {}
    for hf, g in gguf_names(model).items():
        owner, _, leaf = hf.rpartition(".")
        m = model.get_submodule(owner)
        if leaf == "weight" and (isinstance(m, nn.Embedding) or arch.is_linear(m)):
            cols = m.embedding_dim if isinstance(m, nn.Embedding) else m.in_features
            out[hf] = tensor_type(name, g, cols, s, imatrix=imatrix, embed=embed, output=output)
            rule = next((o for o in overrides if re.search(o["pattern"], owner)), None)
            if rule is not None and "gguf" in rule:
                out[hf] = ggml.fallback_type(rule["gguf"], cols)
    return out


def cfg_plan(model, cfg, *, imatrix: bool) -> dict[str, str] | None:
    """``{module name: ggml type}`` of the matrices a quantization config with ``gguf`` set solves,
    plus the keys ``token_embd.weight`` and (untied) ``output.weight``; None without ``gguf``."""
    if getattr(cfg, "gguf", None) is None:
        return None
    p = plan(model, cfg.gguf, imatrix=imatrix, embed=cfg.gguf_embed, output=cfg.gguf_output, overrides=cfg.overrides)
    out = {k.removesuffix(".weight"): v for k, v in p.items()}
    names = {m: n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    out["token_embd.weight"] = out.get(names[emb])
    if head is not None and head.weight is not emb.weight:
        out["output.weight"] = out.get(names[head])
    return out
