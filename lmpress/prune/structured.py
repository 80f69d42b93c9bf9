"""Structured pruning that makes a model physically smaller: width (heads, MLP channels, hidden
channels) and depth (whole decoder blocks). The result is a plain Hugging Face model with an
edited ``model.config``, so ``save_pretrained`` / plain ``transformers`` ``from_pretrained`` load it.

Width (Minitron, Muralidharan et al., arXiv 2407.14679), activation-based importance from the
calibration pipeline, aggregated as an L2 norm over all calibration tokens:

* attention: per query head, ``||softmax(QK^T)V||`` (the input of ``o_proj``); a GQA group (one key/value
  head and its query heads) is scored by the sum of its heads and is kept or removed whole;
* MLP channel ``i``: ``||act(x W_gate^T)_i * (x W_up^T)_i||`` (the input of ``down_proj``);
* hidden channel ``i``: ``||LN(x)_i||`` over the normed inputs of attention and MLP in every block.

``importance="contribution"`` multiplies each unit's activation norm by the norm of its outgoing
weights (its contribution to the residual stream). Every block keeps the same number of groups and
channels (so shapes stay uniform), each block choosing its own by its own scores. How the cut is
split between heads, MLP and hidden channels is chosen among the candidate shapes that meet
``target_params`` by the language-model loss on ``search_samples`` calibration rows.

Depth: drop ``drop_layers`` blocks ranked by

* ``"cosine"``: ShortGPT's block influence ``1 - E[cos(x_in, x_out)]`` (Men et al., arXiv 2403.03853);
* ``"activation"``: the relative size of the block's residual update ``E[||x_out - x_in|| / ||x_in||]``;
* ``"perplexity"``: the calibration loss increase when the block alone is skipped (Minitron's PPL
  depth importance).

Recipes::

    - method: prune-width
      target_params: 0.75    # fraction of non-embedding parameters kept
    - method: prune-depth
      drop_layers: 6
      importance: cosine
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import arch
from ..errors import InputError

WIDTH_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
HIDDEN_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # Gemma scales embeddings by sqrt(hidden_size)
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
HIDDEN_STEPS = (1, 0.9375, 0.875, 0.8125, 0.75, 0.625, 0.5)  # hidden sizes tried, as fractions


@dataclass(frozen=True)
class WidthPruneConfig:
    """Remove attention heads (whole GQA groups), MLP channels and optionally hidden channels."""

    method: ClassVar[str] = "prune-width"
    needs_calibration: ClassVar[bool] = True
    target_params: float = 0.75  # fraction of the non-embedding parameters kept
    importance: str = "activation"  # "activation" (Minitron) or "contribution" (activation x outgoing weight norm)
    heads: bool = True  # may remove attention heads (whole key/value groups)
    mlp: bool = True  # may remove MLP channels
    hidden: bool | float = False  # True: may remove hidden (embedding) channels; a fraction: keep exactly that share
    search_samples: int = 4  # calibration rows that pick the split of the cut between heads / MLP / hidden
    channel_multiple: int = 8  # MLP and hidden sizes stay multiples of this
    batch_size: int = 8

    def __post_init__(self):
        if not isinstance(self.target_params, (int, float)) or not 0 < self.target_params <= 1:
            raise ValueError(f"target_params {self.target_params!r} must lie in (0, 1], the fraction of non-embedding parameters kept")
        if self.importance not in ("activation", "contribution"):
            raise ValueError(f"importance {self.importance!r} for width pruning must be 'activation' or 'contribution'")
        if not (self.heads or self.mlp or self.hidden):
            raise ValueError("nothing to prune: enable at least one of heads, mlp, hidden")
        if not isinstance(self.hidden, bool) and not (isinstance(self.hidden, (int, float)) and 0 < self.hidden <= 1):
            raise ValueError(f"hidden {self.hidden!r} must be true / false or the fraction of hidden channels kept, in (0, 1]")
        if self.search_samples < 1 or self.channel_multiple < 1:
            raise ValueError("search_samples and channel_multiple must be >= 1")


@dataclass(frozen=True)
class DepthPruneConfig:
    """Remove whole decoder blocks."""

    method: ClassVar[str] = "prune-depth"
    needs_calibration: ClassVar[bool] = True
    drop_layers: int | None = None  # blocks removed; or give target_params
    target_params: float | None = None  # fraction of non-embedding parameters kept (fewest blocks dropped to reach it)
    importance: str = "cosine"  # "cosine" (ShortGPT), "activation" (relative update size), "perplexity"
    ppl_samples: int = 8  # calibration rows for importance="perplexity"
    batch_size: int = 8

    def __post_init__(self):
        if (self.drop_layers is None) == (self.target_params is None):
            raise ValueError("give exactly one of drop_layers (number of blocks removed) or target_params")
        if self.drop_layers is not None and (not isinstance(self.drop_layers, int) or self.drop_layers < 0):
            raise ValueError(f"drop_layers {self.drop_layers!r} must be a non-negative integer")
        if self.target_params is not None and not 0 < self.target_params <= 1:
            raise ValueError(f"target_params {self.target_params!r} must lie in (0, 1]")
        if self.importance not in DEPTH_IMPORTANCE:
            raise ValueError(f"importance {self.importance!r} must be one of {DEPTH_IMPORTANCE}")
        if self.ppl_samples < 1:
            raise ValueError("ppl_samples must be >= 1")


DEPTH_IMPORTANCE = ("cosine", "activation", "perplexity")


# ---- shapes and parameter counts ------------------------------------------------------------


@dataclass(frozen=True)
class WidthShape:
    """Per-block sizes after width pruning."""

    groups: int  # key/value heads (GQA groups) kept
    intermediate: int  # MLP channels kept
    hidden: int  # hidden channels kept


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside the token embeddings and the output head."""
    from ..counts import param_counts

    c = param_counts(model)
    return c.linear + c.other


def _geometry(model: nn.Module) -> dict:
    cfg = model.config
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    return {"groups": kv, "q_per_group": cfg.num_attention_heads // kv, "head_dim": _head_dim(model),
            "intermediate": cfg.intermediate_size, "hidden": cfg.hidden_size}


def _head_dim(model: nn.Module) -> int:
    return arch.blocks(model)[0].self_attn.head_dim


def width_params(model: nn.Module, shape: WidthShape) -> int:
    """Non-embedding parameters of ``model`` after width pruning to ``shape`` (closed form)."""
    g = _geometry(model)
    scale = {"q": shape.groups / g["groups"], "kv": shape.groups / g["groups"], "mlp": shape.intermediate / g["intermediate"],
             "hidden": shape.hidden / g["hidden"]}
    total = 0
    for dims, numel in _param_roles(model):
        total += round(numel * math.prod(scale[d] for d in dims if d))
    return total


def _param_roles(model: nn.Module):
    """``(axes per dim, numel)`` of every non-embedding parameter; axes name what pruning shrinks."""
    g = _geometry(model)
    emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    head = model.get_output_embeddings()
    emb |= {id(p) for p in head.parameters(recurse=False)} if head is not None else set()
    spec = arch.spec_for(model)
    for name, p in model.named_parameters():
        if id(p) in emb:
            continue
        yield _roles(name.removeprefix(spec.blocks + "."), p, g), p.numel()


def _roles(name: str, p: Tensor, g: dict) -> tuple:
    """Which axis each dim of a parameter belongs to (None: unchanged)."""
    parts = name.split(".")
    key = ".".join(parts[1:-1]) if parts[0].isdigit() else ""
    if key in ("self_attn.q_proj",):
        return ("q", "hidden")[: p.dim()]
    if key in ("self_attn.k_proj", "self_attn.v_proj"):
        return ("kv", "hidden")[: p.dim()]
    if key == "self_attn.o_proj":
        return ("hidden", "q")[: p.dim()]
    if key in ("mlp.gate_proj", "mlp.up_proj"):
        return ("mlp", "hidden")[: p.dim()]
    if key == "mlp.down_proj":
        return ("hidden", "mlp")[: p.dim()]
    if p.dim() == 1 and p.shape[0] == g["hidden"] and "self_attn" not in key:
        return ("hidden",)  # a norm of the residual stream
    return (None,) * p.dim()


# ---- importance -----------------------------------------------------------------------------


@dataclass
class WidthImportance:
    groups: Tensor  # (L, G) per block, per key/value group
    channels: Tensor  # (L, I) per block, per MLP channel
    hidden: Tensor  # (D,)


def head_scores(o_in: Tensor, head_dim: int) -> Tensor:
    """Sum of squares over tokens of each head's attention output. o_in: (T, H * hd) -> (H,)"""
    heads = o_in.float().reshape(o_in.shape[0], -1, head_dim)  # (T, H, hd)
    return (heads * heads).sum(dim=(0, 2))


def channel_scores(x: Tensor) -> Tensor:
    """Sum of squares over tokens per channel. (T, C) -> (C,)"""
    x = x.float()
    return (x * x).sum(0)


def width_importance(model: nn.Module, calib: Tensor, cfg: WidthPruneConfig, progress) -> WidthImportance:
    """Activation importances of heads, MLP channels and hidden channels on the calibration pipeline."""
    from ..calib import walk_blocks

    g = _geometry(model)
    n_blocks = len(arch.blocks(model))
    heads = torch.zeros(n_blocks, g["groups"] * g["q_per_group"])
    chans = torch.zeros(n_blocks, g["intermediate"])
    hidden = torch.zeros(g["hidden"])

    def fn(bctx):
        i = bctx.index

        def add(t, idx, v):
            t[idx] += v

        obs = {"self_attn.o_proj": lambda x: add(heads, i, head_scores(x, g["head_dim"])),
               "mlp.down_proj": lambda x: add(chans, i, channel_scores(x))}
        if cfg.hidden:
            obs["self_attn.q_proj"] = obs["mlp.gate_proj"] = lambda x: add(hidden, slice(None), channel_scores(x))
        bctx.collect(obs)

    walk_blocks(model, calib, fn, batch_size=cfg.batch_size, progress=progress and "width importance")
    heads, chans = heads.sqrt(), chans.sqrt()  # L2 over tokens
    if cfg.importance == "contribution":
        heads, chans = _times_outgoing(model, heads, chans, g)
    groups = heads.reshape(n_blocks, g["groups"], g["q_per_group"]).sum(-1)  # (L, G): a group = its query heads
    return WidthImportance(groups, chans, hidden.sqrt())


def _times_outgoing(model, heads: Tensor, chans: Tensor, g: dict) -> tuple[Tensor, Tensor]:
    """Scale activation norms by the norm of the weights each unit writes to the residual stream."""
    h, c = heads.clone(), chans.clone()
    for i, b in enumerate(arch.blocks(model)):
        Wo = b.self_attn.o_proj.weight.detach().float()  # (D, H * hd)
        h[i] *= Wo.reshape(Wo.shape[0], -1, g["head_dim"]).pow(2).sum(dim=(0, 2)).sqrt()
        c[i] *= b.mlp.down_proj.weight.detach().float().norm(dim=0)
    return h, c


# ---- width surgery --------------------------------------------------------------------------


@dataclass
class WidthPlan:
    """Which units each block keeps (sorted indices); None keeps all."""

    groups: list[Tensor] | None = None  # per block: key/value groups kept
    channels: list[Tensor] | None = None  # per block: MLP channels kept
    hidden: Tensor | None = None  # hidden channels kept (all blocks)


def plan_for(imp: WidthImportance, shape: WidthShape) -> WidthPlan:
    """Keep the most important units: per block for heads and channels, globally for hidden."""

    def top(scores: Tensor, k: int) -> Tensor:
        return torch.topk(scores, k).indices.sort().values

    return WidthPlan([top(s, shape.groups) for s in imp.groups], [top(s, shape.intermediate) for s in imp.channels],
                     top(imp.hidden, shape.hidden))


def _rows(groups: Tensor, per_group: int, head_dim: int) -> Tensor:
    """Weight rows of the heads of ``groups``: (k,) group ids -> (k * per_group * head_dim,)"""
    heads = (groups[:, None] * per_group + torch.arange(per_group)).flatten()  # (k * per_group,)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _slice_linear(lin: nn.Linear, rows: Tensor | None, cols: Tensor | None) -> nn.Linear:
    W = lin.weight.detach()
    W = W if rows is None else W.index_select(0, rows)
    W = W if cols is None else W.index_select(1, cols)
    new = nn.Linear(W.shape[1], W.shape[0], bias=lin.bias is not None, dtype=W.dtype, device=W.device)
    with torch.no_grad():
        new.weight.copy_(W)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach() if rows is None else lin.bias.detach().index_select(0, rows))
    return new


def apply_width_plan(model: nn.Module, plan: WidthPlan) -> None:
    """Slice the tensors of ``model`` to the units ``plan`` keeps and edit ``model.config``."""
    g = _geometry(model)
    hid = plan.hidden
    for i, b in enumerate(arch.blocks(model)):
        grp = plan.groups[i] if plan.groups is not None else torch.arange(g["groups"])
        q = _rows(grp, g["q_per_group"], g["head_dim"])
        kv = _rows(grp, 1, g["head_dim"])
        ch = plan.channels[i] if plan.channels is not None else None
        new = {"self_attn.q_proj": (q, hid), "self_attn.k_proj": (kv, hid), "self_attn.v_proj": (kv, hid),
               "self_attn.o_proj": (hid, q), "mlp.gate_proj": (ch, hid), "mlp.up_proj": (ch, hid), "mlp.down_proj": (hid, ch)}
        for name, (rows, cols) in new.items():
            arch.set_module(b, name, _slice_linear(b.get_submodule(name), rows, cols))
    if hid is not None:
        _slice_hidden_rest(model, hid, g["hidden"])
    _edit_width_config(model, plan, g)


def _slice_hidden_rest(model: nn.Module, hid: Tensor, hidden: int) -> None:
    """Hidden channels outside the block linears: embeddings, norms, an untied output head."""
    linears = {id(p) for b in arch.blocks(model) for n in ATTN + MLP for p in b.get_submodule(n).parameters()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    for mod in model.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if id(p) in linears:
                continue
            if mod is emb:
                mod.weight = nn.Parameter(p.detach().index_select(1, hid))
                mod.embedding_dim = len(hid)
            elif mod is head and not tied:
                model.set_output_embeddings(_slice_linear(head, None, hid))
            elif p.dim() == 1 and p.shape[0] == hidden:
                setattr(mod, pname, nn.Parameter(p.detach().index_select(0, hid)))
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def _edit_width_config(model: nn.Module, plan: WidthPlan, g: dict) -> None:
    cfg = model.config
    if plan.groups is not None:
        k = len(plan.groups[0])
        cfg.num_key_value_heads = k
        cfg.num_attention_heads = k * g["q_per_group"]
    if plan.channels is not None:
        cfg.intermediate_size = len(plan.channels[0])
    if plan.hidden is not None:
        cfg.hidden_size = len(plan.hidden)
    cfg.head_dim = g["head_dim"]  # no longer hidden_size / num_attention_heads


# ---- width: choosing the shape -------------------------------------------------------------


def candidate_shapes(model: nn.Module, cfg: WidthPruneConfig) -> list[WidthShape]:
    """Shapes meeting the target: for each head count and hidden size allowed, the largest MLP."""
    g = _geometry(model)
    budget = cfg.target_params * non_embedding_params(model)
    mult = cfg.channel_multiple
    group_opts = range(g["groups"], 0, -1) if cfg.heads else [g["groups"]]
    hidden_opts = [g["hidden"]]
    if cfg.hidden:
        steps = HIDDEN_STEPS if cfg.hidden is True else (cfg.hidden,)
        hidden_opts = sorted({max(mult, round(g["hidden"] * f / mult) * mult) for f in steps}, reverse=True)
    out = []
    for d in hidden_opts:
        for k in group_opts:
            inter = _largest_mlp(model, k, d, budget, mult, cfg.mlp)
            if inter is not None:
                out.append(WidthShape(k, inter, d))
    return out


def _largest_mlp(model, groups: int, hidden: int, budget: float, mult: int, prune_mlp: bool) -> int | None:
    """The largest MLP size (a multiple of ``mult``, at most the original) that fits ``budget``."""
    full = _geometry(model)["intermediate"]
    at_full = width_params(model, WidthShape(groups, full, hidden))
    if at_full <= budget:
        return full
    if not prune_mlp:
        return None
    base = width_params(model, WidthShape(groups, 0, hidden))
    inter = int((budget - base) / ((at_full - base) / full)) // mult * mult
    while inter >= mult and width_params(model, WidthShape(groups, inter, hidden)) > budget:
        inter -= mult
    return inter if inter >= mult else None


def _lm_loss(model: nn.Module, ids: Tensor, batch: int = 2) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(ids), batch):
            x = ids[s : s + batch]
            logits = model(x, use_cache=False).logits[:, :-1].float()  # (b, T-1, V)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            count += x[:, 1:].numel()
    return total / count


def _check_width_arch(model: nn.Module, cfg: WidthPruneConfig) -> None:
    mtype = getattr(model.config, "model_type", None)
    if mtype not in WIDTH_TYPES:
        raise InputError(f"width pruning supports {', '.join(WIDTH_TYPES)} models, not {mtype!r}; use prune-depth or an unstructured method")
    if cfg.hidden and mtype not in HIDDEN_TYPES:
        raise InputError(f"hidden-channel pruning supports {', '.join(HIDDEN_TYPES)}, not {mtype!r}; set hidden: false")


def prune_width_(model: nn.Module, cfg: WidthPruneConfig, ctx) -> dict:
    """Width pruning (Minitron importance), in place: the model ends up with smaller uniform shapes."""
    from .unstructured import require_calib

    _check_width_arch(model, cfg)
    calib = require_calib(ctx, "prune-width")
    g = _geometry(model)
    full = WidthShape(g["groups"], g["intermediate"], g["hidden"])
    if width_params(model, full) <= cfg.target_params * non_embedding_params(model):
        return {"shape": vars(full), "params_before": width_params(model, full), "params_after": width_params(model, full), "candidates": []}
    shapes = candidate_shapes(model, cfg)
    if not shapes:
        raise InputError(f"target_params {cfg.target_params} is too small for the allowed axes "
                         f"(heads={cfg.heads}, mlp={cfg.mlp}, hidden={cfg.hidden}); raise it or allow more axes")
    imp = width_importance(model, calib, cfg, ctx.progress)
    return prune_width_with(model, cfg, imp, calib[: cfg.search_samples])


def prune_width_with(model: nn.Module, cfg: WidthPruneConfig, imp: WidthImportance, rows: Tensor) -> dict:
    """Pick the candidate shape with the lowest loss on ``rows`` (n, L) and cut ``model`` to it."""
    _check_width_arch(model, cfg)
    before = non_embedding_params(model)
    shapes = candidate_shapes(model, cfg)
    if not shapes:
        raise InputError(f"target_params {cfg.target_params} is too small for the allowed axes; raise it or allow more axes")
    tried = []
    for shape in shapes if len(shapes) > 1 else []:
        trial = copy.deepcopy(model)
        apply_width_plan(trial, plan_for(imp, shape))
        tried.append({**vars(shape), "params": width_params(model, shape), "calib_loss": _lm_loss(trial, rows)})
        del trial
    best = min(range(len(shapes)), key=lambda j: tried[j]["calib_loss"]) if tried else 0
    apply_width_plan(model, plan_for(imp, shapes[best]))
    return {"shape": vars(shapes[best]), "params_before": before, "params_after": non_embedding_params(model), "candidates": tried}


# ---- depth ------------------------------------------------------------------------------------


def block_influence(x_in: Tensor, x_out: Tensor) -> tuple[Tensor, Tensor]:
    """Per token: ``(1 - cos(x_in, x_out), ||x_out - x_in|| / ||x_in||)``. (b, T, D) -> (b*T,), (b*T,)"""
    a, b = x_in.float().flatten(0, -2), x_out.float().flatten(0, -2)  # (N, D)
    return 1 - F.cosine_similarity(a, b, dim=-1), (b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)


def _hidden_of(out):
    return out[0] if isinstance(out, tuple) else out


def activation_importance(model: nn.Module, calib: Tensor, cfg: DepthPruneConfig, progress) -> dict[str, Tensor]:
    """Per block, the mean block influence (ShortGPT) and relative update size, one pipeline pass."""
    from ..calib import walk_blocks

    blocks = arch.blocks(model)
    sums = torch.zeros(len(blocks), 2, dtype=torch.float64)
    counts = torch.zeros(len(blocks))
    on = {"recording": False}

    def hook(i):
        def f(_m, args, kwargs, out):
            if on["recording"]:
                x = args[0] if args else kwargs["hidden_states"]
                bi, rel = block_influence(x, _hidden_of(out))
                sums[i] += torch.stack([bi.double().sum(), rel.double().sum()])
                counts[i] += bi.numel()

        return f

    def fn(bctx):
        on["recording"] = True  # block 0's input capture is over
        if bctx.index == len(blocks) - 1:
            bctx.outputs()  # the pipeline does not run the last block

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        walk_blocks(model, calib, fn, batch_size=cfg.batch_size, progress=progress and "block influence")
    finally:
        for h in handles:
            h.remove()
    mean = sums / counts[:, None].double()
    return {"cosine": mean[:, 0].float(), "activation": mean[:, 1].float()}


def perplexity_importance(model: nn.Module, calib: Tensor, cfg: DepthPruneConfig, progress) -> Tensor:
    """Per block, the calibration loss increase when that block alone is skipped. -> (L,)"""
    from ..progress import bar

    rows = calib[: cfg.ppl_samples]
    base = _lm_loss(model, rows)
    blocks = arch.blocks(model)
    out = torch.zeros(len(blocks))

    def skip(_m, args, kwargs, res):
        x = args[0] if args else kwargs["hidden_states"]
        return (x,) + tuple(res[1:]) if isinstance(res, tuple) else x

    for i in bar(range(len(blocks)), desc="perplexity importance", enabled=bool(progress)):
        h = blocks[i].register_forward_hook(skip, with_kwargs=True)
        try:
            out[i] = _lm_loss(model, rows) - base
        finally:
            h.remove()
    return out


def drop_blocks_(model: nn.Module, drop: list[int]) -> None:
    """Remove decoder blocks ``drop`` and renumber the rest; edit ``model.config`` to match."""
    spec = arch.spec_for(model)
    blocks = arch.blocks(model)
    n = len(blocks)
    keep = [i for i in range(n) if i not in set(drop)]
    for new_i, old_i in enumerate(keep):
        for m in blocks[old_i].modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_i
    arch.set_module(model, spec.blocks, nn.ModuleList([blocks[i] for i in keep]))
    cfg = model.config
    for key, val in list(vars(cfg).items()):
        if isinstance(val, list) and len(val) == n and key != "architectures":
            setattr(cfg, key, [val[i] for i in keep])  # per-layer lists: layer_types, ...
    cfg.num_hidden_layers = len(keep)


def blocks_to_drop(model: nn.Module, cfg: DepthPruneConfig) -> int:
    n = len(arch.blocks(model))
    if cfg.drop_layers is not None:
        k = cfg.drop_layers
    else:
        per_block = sum(p.numel() for p in arch.blocks(model)[0].parameters())
        total = non_embedding_params(model)
        k = max(0, math.ceil((total - cfg.target_params * total) / per_block - 1e-9))
    if k >= n:
        raise InputError(f"dropping {k} of the model's {n} blocks leaves none; drop at most {n - 1}")
    return k


def prune_depth_(model: nn.Module, cfg: DepthPruneConfig, ctx) -> dict:
    """Depth pruning, in place: the least important blocks are removed."""
    from .unstructured import require_calib

    k = blocks_to_drop(model, cfg)
    before = non_embedding_params(model)
    if k == 0:
        return {"dropped": [], "importance": [], "params_before": before, "params_after": before}
    calib = require_calib(ctx, "prune-depth")
    if cfg.importance == "perplexity":
        scores = perplexity_importance(model, calib, cfg, ctx.progress)
    else:
        scores = activation_importance(model, calib, cfg, ctx.progress)[cfg.importance]
    drop = sorted(torch.topk(scores, k, largest=False).indices.tolist())
    drop_blocks_(model, drop)
    return {"dropped": drop, "importance": scores.tolist(), "params_before": before, "params_after": non_embedding_params(model)}
