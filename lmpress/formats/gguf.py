"""GGUF files that llama.cpp loads and runs: Llama, Qwen2, Qwen3 and Gemma 3 decoders on llama.cpp's block grids.

:func:`write_gguf` writes one ``.gguf`` file with the ``gguf`` package's ``GGUFWriter``, with the
keys, tokenizer and tensor names llama.cpp's own converter (``convert_hf_to_gguf.py``) writes:

- architecture metadata (``{arch}.block_count``, ``.embedding_length``, ``.attention.head_count``,
  ``.rope.freq_base``, ...), ``general.file_type`` and ``general.quantization_version``;
- the tokenizer: a GPT-2 byte-level BPE as ``tokenizer.ggml.model = gpt2`` (tokens, token types,
  merges and the pre-tokenizer name ``tokenizer.ggml.pre``, recognised, as the converter does, by the
  hash of the token ids of a fixed check text); a SentencePiece BPE with byte fallback (Gemma, Llama 2)
  as ``llama`` (tokens, scores that make llama.cpp merge in the tokenizer's merge order, token types,
  ``add_space_prefix``); special token ids, ``add_bos_token`` / ``add_eos_token``;
- the block linears on the grid of ``gtype`` (:mod:`lmpress.quant.ggml`, round-to-nearest; a row
  length the type's block does not divide gets llama.cpp's fallback type), the token embedding
  (and an untied output head) in ``embed_type`` (Q8_0, as llama.cpp's converter), norms and biases
  in F32. Llama's q and k rows are permuted to llama.cpp's rotary layout (interleaved pairs);
- lmpress's own metadata (the recipe) as JSON under ``lmpress.metadata``.

    >>> write_gguf(model, tokenizer, "model.Q4_K.gguf", "Q4_K", {"recipe": [...]})
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError
from ..quant import ggml

ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3"}  # HF class -> gguf architecture
PERMUTE_QK = {"llama"}  # architectures whose q/k rows llama.cpp wants in its interleaved rotary order

# The check text of llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre): the sha256 of the token ids
# a tokenizer gives it names the pre-tokenizer llama.cpp must run. Only tokenizers lmpress meets are listed.
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
              '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def architecture(model: nn.Module) -> str:
    cls = type(model).__name__
    if cls not in ARCHS:
        raise InputError(f"GGUF output supports {', '.join(ARCHS)}, not {cls}; save this model with --format hf")
    return ARCHS[cls]


def tokenizer_pre(tokenizer) -> str:
    """llama.cpp's pre-tokenizer name for ``tokenizer``, from the hash of its ids for :data:`CHECK_TEXT`."""
    ids = tokenizer.encode(CHECK_TEXT)
    h = hashlib.sha256(str(ids).encode()).hexdigest()
    if h not in PRE_BY_HASH:
        raise InputError(f"llama.cpp's pre-tokenizer for this tokenizer is not known to lmpress (check hash {h}); "
                         f"pass pre=... (e.g. 'default' for a plain GPT-2 byte-level BPE)")
    return PRE_BY_HASH[h]


def permute_qk(w: Tensor, n_head: int) -> Tensor:
    """Rows (heads * head_dim, ...) from HF's rotary layout (each head's two halves rotate together) to
    llama.cpp's (adjacent pairs rotate together): (H, 2, hd/2, ...) -> (H, hd/2, 2, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gemma3_hparams(writer, cfg, head_dim: int) -> None:
    """What llama.cpp's gemma3 graph reads beyond the common keys: the sliding-window layers, their rotary
    base, the final soft cap; it scales queries by 1/sqrt(head_dim) (27B: by the hidden size per head)."""
    if getattr(cfg, "attn_logit_softcapping", None):
        raise InputError("llama.cpp's gemma3 has no attention logit soft-capping; save this model with --format hf")
    scale_dim = cfg.hidden_size // cfg.num_attention_heads if cfg.num_hidden_layers == 62 else head_dim
    if cfg.query_pre_attn_scalar != scale_dim:
        raise InputError(f"llama.cpp's gemma3 scales queries by 1/sqrt({scale_dim}), this model by 1/sqrt("
                         f"{cfg.query_pre_attn_scalar}) (query_pre_attn_scalar); save it with --format hf")
    if cfg.final_logit_softcapping:
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    kinds = list(getattr(cfg, "layer_types", None) or [])
    if cfg.sliding_window and "sliding_attention" in kinds:
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern([k == "sliding_attention" for k in kinds])
        local = (cfg.rope_parameters or {}).get("sliding_attention", {})
        if local.get("rope_type", "default") != "default":
            raise InputError(f"GGUF output does not write rope scaling {local.get('rope_type')!r} yet; use --format hf")
        writer.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))


def _hparams(writer, cfg) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)  # Gemma 3: one set per layer type; the global layers' is the base
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if rope.get("rope_type", "default") != "default":
        raise InputError(f"GGUF output does not write rope scaling {rope.get('rope_type')!r} yet; use --format hf")
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    gemma3 = getattr(cfg, "model_type", "") in ("gemma3", "gemma3_text")
    if head_dim != cfg.hidden_size // cfg.num_attention_heads or gemma3:  # readers of gemma3 default to 256
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if gemma3:
        _gemma3_hparams(writer, cfg, head_dim)


def _tokenizer_json(tokenizer) -> dict:
    """The tokenizers-library description (tokenizer.json) of a fast ``tokenizer``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError(f"GGUF output reads the tokenizer's tokenizer.json; {type(tokenizer).__name__} has none "
                         "(a slow tokenizer): save the model with a fast tokenizer (AutoTokenizer's default)")
    return json.loads(backend.to_str())


def _space_prefix(tokenizer) -> bool:
    """Whether a SentencePiece ``tokenizer`` prefixes text with a space (llama.cpp's ``add_space_prefix``).
    An error unless, before its BPE, it only escapes spaces as "▁" (and may prefix one) and keeps the
    text one piece: what llama.cpp's SentencePiece tokenizer does."""
    backend, probe = tokenizer.backend_tokenizer, "a b  c\nd"
    text = backend.normalizer.normalize_str(probe) if backend.normalizer else probe
    pieces = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
    escaped = probe.replace(" ", "\u2581")
    if pieces not in ([escaped], ["\u2581" + escaped]):
        raise InputError(f"this SentencePiece tokenizer turns {probe!r} into {pieces} before its BPE; llama.cpp's "
                         f"only writes spaces as '\u2581' ({escaped!r}), so lmpress cannot write it for llama.cpp")
    return pieces[0] != escaped


def check_tokenizer(tokenizer, pre: str | None = None) -> dict:
    """How llama.cpp must run ``tokenizer``, as its converter decides, or an InputError naming what
    lmpress cannot write: ``{"model": "gpt2", "pre": ...}`` for a byte-level BPE (the pre-tokenizer
    recognised by :func:`tokenizer_pre` unless ``pre`` is given), ``{"model": "llama", "pre": "default",
    "add_space_prefix": ..., "merges": [...]}`` for a SentencePiece BPE with byte fallback (Gemma, Llama 2)."""
    tj = _tokenizer_json(tokenizer)
    kind = tj["model"]["type"]
    if kind == "BPE" and "ByteLevel" in json.dumps(tj.get("pre_tokenizer")):
        return {"model": "gpt2", "pre": pre or tokenizer_pre(tokenizer)}
    if kind == "BPE" and tj["model"].get("byte_fallback"):
        return {"model": "llama", "pre": "default", "add_space_prefix": _space_prefix(tokenizer),
                "merges": tj["model"]["merges"]}
    what = "a BPE without byte-level pre-tokenizer or byte fallback" if kind == "BPE" else f"a {kind} model"
    raise InputError(f"GGUF output writes byte-level BPE (GPT-2 style) and SentencePiece BPE (byte fallback: Gemma, "
                     f"Llama 2) tokenizers; this tokenizer is {what}, which lmpress cannot write for llama.cpp yet")


def _token_types(tokenizer, vocab_size: int, spm: bool) -> tuple[list[str], list[int]]:
    """Tokens and token types as the converter writes them: ids without a token become ``[PAD{i}]``,
    UNUSED; added special tokens are CONTROL, other added tokens USER_DEFINED (SentencePiece: spaces
    written as spaces, as llama.cpp matches them in the raw text); SentencePiece's ``<0xXX>`` are BYTE
    and its unknown token UNKNOWN."""
    from gguf import TokenType

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise InputError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} embeddings")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        token, kind = by_id.get(i, f"[PAD{i}]"), TokenType.NORMAL
        if i not in by_id:
            kind = TokenType.UNUSED
        elif spm and i == tokenizer.unk_token_id:
            kind = TokenType.UNKNOWN
        elif i in added and added[i].special:
            kind = TokenType.CONTROL
        elif i in added:
            kind = TokenType.USER_DEFINED
            token = token.replace("\u2581", " ") if spm else token
        elif spm and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            kind = TokenType.BYTE
        tokens.append(token)
        types.append(kind)
    return tokens, types


def spm_scores(tokens: list[str], merges: list) -> list[float]:
    """Scores for llama.cpp's SentencePiece tokenizer, which merges, among adjacent pieces whose join is a
    token, the pair whose token scores highest: minus the rank of the first of ``merges`` (tokenizer.json's
    BPE merges, best first) that makes the token, so llama.cpp merges in the Hugging Face tokenizer's
    order; tokens no merge makes score below all of them."""
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault("".join(m) if isinstance(m, list) else m.replace(" ", "", 1), r)
    floor = -float(len(merges))
    return [-float(rank[t]) if t in rank else floor for t in tokens]


def _vocab(writer, tokenizer, vocab_size: int, pre: str | None) -> None:
    """The tokenizer as llama.cpp's converter writes it: a byte-level BPE as ``gpt2`` (tokens, types,
    merges, ``tokenizer.ggml.pre``), a SentencePiece BPE as ``llama`` (tokens, scores, types,
    ``add_space_prefix``); special token ids and whether BOS / EOS are added, as the tokenizer does."""
    from gguf import SpecialVocab

    how = check_tokenizer(tokenizer, pre)
    spm = how["model"] == "llama"
    tokens, types = _token_types(tokenizer, vocab_size, spm)
    writer.add_tokenizer_model(how["model"])
    writer.add_tokenizer_pre(how["pre"])
    writer.add_token_list(tokens)
    if spm:
        writer.add_token_scores(spm_scores(tokens, how["merges"]))
        writer.add_add_space_prefix(how["add_space_prefix"])
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = SpecialVocab(tmp, load_merges=not spm, n_vocab=vocab_size)
    if not spm and not special.merges:
        raise InputError("GGUF output needs a byte-level BPE tokenizer with merges (tokenizer.json); this one has none")
    ids = tokenizer.encode("a")  # with the special tokens the tokenizer adds
    for name, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        special.add_special_token[name] = tid is not None and (ids[:1] if name == "bos" else ids[-1:]) == [tid]
    special.add_to_gguf(writer, quiet=True)


def gguf_names(model: nn.Module) -> dict[str, str]:
    """``{state-dict name: GGUF tensor name}`` of ``model``'s tensors; a layer solved on a ggml grid
    (its ``raw`` bytes) is listed as ``<layer>.weight``; the tied head, not stored, is left out."""
    import gguf

    arch, cfg = architecture(model), model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    out = {}
    for hf_name in model.state_dict():
        if hf_name.endswith(".raw"):
            hf_name = hf_name.removesuffix(".raw") + ".weight"
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings or hf_name in out:
            continue  # llama.cpp uses token_embd as the output head when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InputError(f"no GGUF name for tensor {hf_name} of {arch}; GGUF output cannot hold this model")
        out[hf_name] = name
    return out


def _tensor_types(name: str, shape: tuple[int, ...], gtype: str, embed_type: str) -> str:
    """The ggml type of one GGUF tensor: F32 for vectors, ``embed_type`` for the token embedding and
    output head, ``gtype`` (or llama.cpp's fallback for its row length) for the block linears."""
    if len(shape) == 1:
        return "F32"
    want = embed_type if name in ("token_embd.weight", "output.weight") else gtype
    return ggml.fallback_type(want, shape[-1]) if want in ggml.TYPES else want


SOLVED_KINDS = ("ggml", "ggml_embedding")  # layers that hold ggml bytes: written as they are


def solved_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` solved on a ggml grid, by name."""
    return {n: m for n, m in model.named_modules() if getattr(m, "kind", None) in SOLVED_KINDS}


def check_solved(model: nn.Module) -> dict[str, nn.Module]:
    """The layers solved on ggml grids; an error if any other layer is compressed (on lmpress's own
    grid, sparse, factored): a GGUF file would have to re-round it, which lmpress never does."""
    solved = solved_layers(model)
    other = [n for n, m in model.named_modules() if hasattr(m, "kind") and n not in solved]
    if other:
        m = model.get_submodule(other[0])
        raise InputError(f"{other[0]} was compressed on lmpress's own grid ({type(m).__name__}: {m.extra_repr()}); "
                         "GGUF output never re-rounds solved weights onto another grid: run lmpress compress again "
                         "with --format gguf:TYPE, so the method solves on llama.cpp's grid itself")
    return solved


def gguf_tensors(model: nn.Module, gtype: str, embed_type: str = "Q8_0", types: dict[str, str] | None = None):
    """``(gguf_name, ggml_type, data)`` per tensor, data being the raw bytes (uint8, rows x row bytes) of
    a block type or a float array; q/k rows already in llama.cpp's order. Layers solved on a ggml grid
    give their own bytes (rows permuted, never re-rounded); float matrices are rounded to nearest on
    ``types[name]`` when given, else on ``gtype`` (``embed_type`` for the embedding and head)."""
    arch, cfg = architecture(model), model.config
    solved = check_solved(model)
    sd = model.state_dict()
    for hf_name, name in gguf_names(model).items():
        owner = hf_name.rpartition(".")[0]
        if owner in solved and hf_name.endswith(".weight"):
            w, t = solved[owner].raw.detach().cpu(), solved[owner].gtype
        else:
            w = sd[hf_name].detach().float().cpu()
            t = (types or {}).get(hf_name) if w.dim() == 2 and types else _tensor_types(name, tuple(w.shape), gtype, embed_type)
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            w = w + 1.0  # Gemma3RMSNorm multiplies by (1 + weight), llama.cpp by the stored weight
        if arch in PERMUTE_QK and hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            w = permute_qk(w, cfg.num_attention_heads if "q_proj" in hf_name else cfg.num_key_value_heads)
        if w.dtype == torch.uint8:
            yield name, t, w.numpy()
        elif t in ggml.TYPES:
            yield name, t, ggml.encode(ggml.quantize(w, t))
        else:
            yield name, t, w.numpy().astype(np.float16 if t == "F16" else np.float32)


def _file_type(gtype: str) -> int:
    from gguf import LlamaFileType

    for name in (f"MOSTLY_{gtype}", f"MOSTLY_{gtype}_S", f"ALL_{gtype}"):
        if name in LlamaFileType.__members__:
            return int(LlamaFileType[name])
    return int(LlamaFileType.GUESSED)


def write_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, gtype: str, metadata: dict, *,
               embed_type: str = "Q8_0", pre: str | None = None, types: dict[str, str] | None = None) -> dict[str, str]:
    """Write ``model`` (a Llama, Qwen2, Qwen3 or Gemma 3 decoder) and its ``tokenizer`` (byte-level or
    SentencePiece BPE, :func:`check_tokenizer`) to the GGUF file ``path``, block linears in ``gtype`` (a
    block type, or ``F16``/``F32``), embeddings in ``embed_type`` (a block type, ``F16`` or ``F32``),
    ``metadata`` (JSON-able, lmpress's recipe) under ``lmpress.metadata``; ``pre`` overrides a byte-level
    BPE's detected pre-tokenizer name. ``types`` (``{state-dict name: ggml type}``, e.g. llama.cpp's rule
    from :func:`lmpress.quant.gguf_mix.plan`) overrides both, ``gtype`` then naming the file type.
    Layers already solved on a ggml grid are written as they are. Written to a temporary file that is
    then renamed, so ``path`` never holds half a file. Returns ``{tensor name: ggml type}``."""
    import gguf

    if types is None and gtype not in ("F16", "F32"):  # F16 / F32: a float file (llama-quantize's input)
        ggml.block_type(gtype)
    if embed_type not in ggml.TYPES and embed_type not in ("F16", "F32"):
        raise InputError(f"embed_type must be a block type ({', '.join(ggml.TYPES)}), F16 or F32, not {embed_type!r}")
    arch, path = architecture(model), Path(path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: the folder {path.parent} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(getattr(model.config, "_name_or_path", "") or arch)
        _hparams(writer, model.config)
        writer.add_file_type(_file_type(gtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _vocab(writer, tokenizer, model.config.vocab_size, pre)
        writer.add_string("lmpress.metadata", json.dumps(metadata, sort_keys=True))
        written = {}
        for name, t, data in gguf_tensors(model, gtype, embed_type, types):
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[t])
            written[name] = t
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return written
