"""Where things are in a Hugging Face decoder: blocks, linear layers, norms, embeddings.

Architecture knowledge is data: one :class:`ArchSpec` per ``model_type``, and a generic fallback
that finds the longest ``ModuleList`` of identical blocks holding linear layers. Linear layers are
``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored transposed); :func:`linear_weight` and
:func:`set_linear_weight` always use the (out_features, in_features) orientation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InputError


@dataclass(frozen=True)
class WidthSpec:
    """Where width pruning cuts a block (paths relative to the block): the attention projections
    (query heads, key/value heads in GQA groups) and the gated MLP's channels. The attention module
    ``attn`` has a ``head_dim``; ``hidden``: the hidden (residual) channels may be cut as well."""

    attn: str = "self_attn"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    hidden: bool = True

    @property
    def linears(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)


@dataclass(frozen=True)
class ArchSpec:
    blocks: str  # dotted path of the ModuleList of decoder blocks
    embed: str  # token embedding
    final_norm: str | None
    lm_head: str = "lm_head"
    # (preceding op, linears it feeds) inside a block, for scale folding (AWQ, SmoothQuant):
    scale_pairs: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())
    width: WidthSpec | None = None  # what width pruning may cut (None: not supported)


_LLAMA_PAIRS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
_LLAMA = ArchSpec("model.layers", "model.embed_tokens", "model.norm", scale_pairs=_LLAMA_PAIRS, width=WidthSpec())
SPECS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma3_text": ArchSpec(
        "model.layers",
        "model.embed_tokens",
        "model.norm",
        scale_pairs=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("self_attn.v_proj", ("self_attn.o_proj",)),
            ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            ("mlp.up_proj", ("mlp.down_proj",)),
        ),
        width=WidthSpec(hidden=False),  # Gemma scales embeddings by sqrt(hidden_size): hidden channels stay
    ),
    "gpt2": ArchSpec(
        "transformer.h",
        "transformer.wte",
        "transformer.ln_f",
        scale_pairs=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
    ),
    "opt": ArchSpec(
        "model.decoder.layers",
        "model.decoder.embed_tokens",
        "model.decoder.final_layer_norm",
        scale_pairs=(
            ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("self_attn.v_proj", ("self_attn.out_proj",)),
            ("final_layer_norm", ("fc1",)),
        ),
    ),
}


def is_conv1d(m: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer storing its weight as (in_features, out_features)."""
    return type(m).__name__ == "Conv1D"


def is_dense_linear(m: nn.Module) -> bool:
    """A plain float linear layer (``nn.Linear`` or ``Conv1D``), not one of lmpress's compressed layers."""
    return isinstance(m, nn.Linear) or is_conv1d(m)


def is_linear(m: nn.Module) -> bool:
    """Any linear layer: dense, or compressed by lmpress (quantized, sparse, factored)."""
    return is_dense_linear(m) or hasattr(m, "lmpress_linear")


def norm_adds_one(norm: nn.Module) -> bool:
    """True for the Gemma family's RMSNorm, which computes ``x * (1 + weight)`` (not ``x * weight``)."""
    name = type(norm).__name__
    return "Gemma" in name and name.endswith("RMSNorm")


def width_spec(model: nn.Module, hidden: bool = False) -> WidthSpec:
    """What width pruning may cut in ``model`` (also hidden channels when ``hidden``), or a clear error."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    spec = SPECS[mtype].width if mtype in SPECS else None
    if spec is None:
        supported = [t for t, s in SPECS.items() if s.width is not None]
        raise InputError(f"width pruning supports {', '.join(supported)} models, not {mtype!r}; "
                         "use prune-depth or an unstructured method")
    if hidden and not spec.hidden:
        supported = [t for t, s in SPECS.items() if s.width is not None and s.width.hidden]
        raise InputError(f"hidden-channel pruning supports {', '.join(supported)}, not {mtype!r}; set hidden: false")
    return spec


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the layer stores."""
    if is_conv1d(m):
        return m.weight.t()
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise _no_dense_weight(m)
    return w


def set_linear_weight(m: nn.Module, w: torch.Tensor) -> None:
    """Write ``w`` (out_features, in_features) into the layer in place."""
    if not isinstance(getattr(m, "weight", None), nn.Parameter):
        raise _no_dense_weight(m)  # e.g. a computed (densified) weight: writing it would be lost
    with torch.no_grad():
        if is_conv1d(m):
            m.weight.copy_(w.t())
        else:
            m.weight.copy_(w)


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def spec_for(model: nn.Module) -> ArchSpec:
    """The known spec for this model type, or one inferred from the module tree."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype in SPECS:
        return SPECS[mtype]
    return _infer_spec(model)


def _infer_spec(model: nn.Module) -> ArchSpec:
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            same = all(type(b) is type(m[0]) for b in m)
            has_lin = any(is_linear(x) for x in m[0].modules())
            if same and has_lin and (best is None or len(m) > len(best[1])):
                best = (name, m)
    if best is None:
        raise InputError(f"cannot find the decoder blocks of {type(model).__name__}: no list of repeated blocks")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    return ArchSpec(best[0], names.get(id(emb), ""), None)


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(spec_for(model).blocks)


def _no_dense_weight(m: nn.Module) -> Exception:
    kind = getattr(m, "kind", type(m).__name__)
    return InputError(
        f"this method rewrites dense weight matrices, but a {type(m).__name__} layer (kind {kind!r}) stores its "
        "weight in compressed form; put the method before the step that made it in the recipe, or start from "
        "the uncompressed model (low-rank 'svd'/'asvd'/'svd-llm' factors are plain linears and can be quantized)"
    )


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linear layers of one block, by name relative to the block, in module order."""
    return {n: m for n, m in block.named_modules() if n and is_linear(m)}


def compressible_linears(model: nn.Module) -> dict[str, nn.Module]:
    """All linear layers inside decoder blocks, by full name: what layer-wise methods touch."""
    spec = spec_for(model)
    out = {}
    for i, b in enumerate(blocks(model)):
        for n, m in block_linears(b).items():
            out[f"{spec.blocks}.{i}.{n}"] = m
    return out


def skeleton(model: nn.Module) -> nn.Module:
    """The architecture of ``model``'s config on the meta device: the layer types and shapes a plain
    load builds (e.g. which linears GPT-2 stores as ``Conv1D``)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model.config)


def check_positions(model: nn.Module, length: int, what: str) -> None:
    """Refuse ``length`` tokens past a model's learned position embeddings (GPT-2, OPT: an index
    error deep inside the model); warn past a rotary model's trained context (it runs, but worse)."""
    import warnings

    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if not limit or length <= limit:
        return
    rotary = any(getattr(cfg, k, None) is not None for k in ("rope_parameters", "rope_theta", "rope_scaling"))
    if not rotary:
        raise InputError(f"{what} {length} is longer than the model's {limit} learned positions; use at most {limit}")
    warnings.warn(f"{what} {length} is past the model's trained context of {limit} tokens; figures may be worse", stacklevel=3)
