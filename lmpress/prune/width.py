"""Width pruning (Minitron, Muralidharan et al., arXiv 2407.14679): remove attention heads (whole
GQA groups), MLP channels and optionally hidden channels, so the model is physically smaller. The
result is a plain Hugging Face model with an edited ``model.config``, so ``save_pretrained`` /
plain ``transformers`` ``from_pretrained`` load it. Which projections are cut comes from
:class:`lmpress.arch.WidthSpec` (Llama, Mistral, Qwen2/3, Gemma 3 without hidden channels).

Activation-based importance from the calibration pipeline, aggregated as an L2 norm over all
calibration tokens:

* attention: per query head, ``||softmax(QK^T)V||`` (the input of ``o_proj``); a GQA group (one key/value
  head and its query heads) is scored by the sum of its heads and is kept or removed whole;
* MLP channel ``i``: ``||act(x W_gate^T)_i * (x W_up^T)_i||`` (the input of ``down_proj``);
* hidden channel ``i``: ``||LN(x)_i||`` over the normed inputs of attention and MLP in every block.

``importance="contribution"`` multiplies each unit's activation norm by the norm of its outgoing
weights (its contribution to the residual stream). Every block keeps the same number of groups and
channels (so shapes stay uniform), each block choosing its own by its own scores. How the cut is
split between heads, MLP and hidden channels is chosen among the candidate shapes that meet
``target_params`` by the language-model loss on ``search_samples`` calibration rows.

Recipe::

    - method: prune-width
      target_params: 0.75    # fraction of non-embedding parameters kept
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .. import arch, stats
from ..errors import InputError
from .shared import lm_loss, non_embedding_params

HIDDEN_STEPS = (1, 0.9375, 0.875, 0.8125, 0.75, 0.625, 0.5)  # hidden sizes tried, as fractions


@dataclass(frozen=True)
class WidthPruneConfig:
    """Remove attention heads (whole GQA groups), MLP channels and optionally hidden channels."""

    family: ClassVar[str] = "prune"
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


# ---- shapes and parameter counts ------------------------------------------------------------


@dataclass(frozen=True)
class WidthShape:
    """Per-block sizes after width pruning."""

    groups: int  # key/value heads (GQA groups) kept
    intermediate: int  # MLP channels kept
    hidden: int  # hidden channels kept


def _geometry(model: nn.Module) -> dict:
    cfg = model.config
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    return {"groups": kv, "q_per_group": cfg.num_attention_heads // kv, "head_dim": _head_dim(model),
            "intermediate": cfg.intermediate_size, "hidden": cfg.hidden_size}


def _head_dim(model: nn.Module) -> int:
    return arch.blocks(model)[0].get_submodule(arch.width_spec(model).attn).head_dim


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
    spec, ws = arch.spec_for(model), arch.width_spec(model)
    axes = _linear_axes(ws)
    for name, p in model.named_parameters():
        if id(p) in emb:
            continue
        yield _roles(name.removeprefix(spec.blocks + "."), p, g, axes, ws.attn), p.numel()


def _linear_axes(ws: arch.WidthSpec) -> dict[str, tuple[str, str]]:
    """(output axis, input axis) of each projection width pruning cuts."""
    return {ws.q: ("q", "hidden"), ws.k: ("kv", "hidden"), ws.v: ("kv", "hidden"), ws.o: ("hidden", "q"),
            ws.gate: ("mlp", "hidden"), ws.up: ("mlp", "hidden"), ws.down: ("hidden", "mlp")}


def _roles(name: str, p: Tensor, g: dict, axes: dict[str, tuple[str, str]], attn: str) -> tuple:
    """Which axis each dim of a parameter belongs to (None: unchanged)."""
    parts = name.split(".")
    key = ".".join(parts[1:-1]) if parts[0].isdigit() else ""
    if key in axes:
        return axes[key][: p.dim()]
    if p.dim() == 1 and p.shape[0] == g["hidden"] and not (key + ".").startswith(attn + "."):
        return ("hidden",)  # a norm of the residual stream
    return (None,) * p.dim()


# ---- importance -----------------------------------------------------------------------------


@dataclass
class WidthImportance:
    groups: Tensor  # (L, G) per block, per key/value group
    channels: Tensor  # (L, I) per block, per MLP channel
    hidden: Tensor  # (D,)


def width_importance(model: nn.Module, calib: Tensor, cfg: WidthPruneConfig, progress) -> WidthImportance:
    """Activation importances of heads, MLP channels and hidden channels on the calibration pipeline."""
    from ..calib import walk_blocks

    g, ws = _geometry(model), arch.width_spec(model)
    n_blocks = len(arch.blocks(model))
    heads = torch.zeros(n_blocks, g["groups"] * g["q_per_group"])
    chans = torch.zeros(n_blocks, g["intermediate"])
    hidden = stats.InputStats("sq")  # the normed inputs of attention and MLP, all blocks

    def fn(bctx):
        own = {ws.o: stats.InputStats("sq"), ws.down: stats.InputStats("sq")}  # heads' outputs, MLP channels
        bctx.collect({**own, ws.q: hidden, ws.gate: hidden} if cfg.hidden else own)
        heads[bctx.index] = own[ws.o].sq_sum.reshape(-1, g["head_dim"]).sum(1)  # (H * hd,) -> (H,)
        chans[bctx.index] = own[ws.down].sq_sum

    walk_blocks(model, calib, fn, batch_size=cfg.batch_size, progress=progress and "width importance")
    heads, chans = heads.sqrt(), chans.sqrt()  # L2 over tokens
    if cfg.importance == "contribution":
        heads, chans = _times_outgoing(model, heads, chans, g)
    groups = heads.reshape(n_blocks, g["groups"], g["q_per_group"]).sum(-1)  # (L, G): a group = its query heads
    hidden = hidden.sq_sum.sqrt() if cfg.hidden else torch.zeros(g["hidden"])
    return WidthImportance(groups, chans, hidden)


def _times_outgoing(model, heads: Tensor, chans: Tensor, g: dict) -> tuple[Tensor, Tensor]:
    """Scale activation norms by the norm of the weights each unit writes to the residual stream."""
    h, c = heads.clone(), chans.clone()
    ws = arch.width_spec(model)
    for i, b in enumerate(arch.blocks(model)):
        Wo = b.get_submodule(ws.o).weight.detach().float()  # (D, H * hd)
        h[i] *= Wo.reshape(Wo.shape[0], -1, g["head_dim"]).pow(2).sum(dim=(0, 2)).sqrt()
        c[i] *= b.get_submodule(ws.down).weight.detach().float().norm(dim=0)
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
    g, ws = _geometry(model), arch.width_spec(model)
    hid = plan.hidden
    for i, b in enumerate(arch.blocks(model)):
        grp = plan.groups[i] if plan.groups is not None else torch.arange(g["groups"])
        q = _rows(grp, g["q_per_group"], g["head_dim"])
        kv = _rows(grp, 1, g["head_dim"])
        ch = plan.channels[i] if plan.channels is not None else None
        new = {ws.q: (q, hid), ws.k: (kv, hid), ws.v: (kv, hid), ws.o: (hid, q),
               ws.gate: (ch, hid), ws.up: (ch, hid), ws.down: (hid, ch)}  # (rows, cols) kept
        for name, (rows, cols) in new.items():
            arch.set_module(b, name, _slice_linear(b.get_submodule(name), rows, cols))
    if hid is not None:
        _slice_hidden_rest(model, hid, g["hidden"], ws)
    _edit_width_config(model, plan, g)


def _slice_hidden_rest(model: nn.Module, hid: Tensor, hidden: int, ws: arch.WidthSpec) -> None:
    """Hidden channels outside the block linears: embeddings, norms, an untied output head."""
    linears = {id(p) for b in arch.blocks(model) for n in ws.linears for p in b.get_submodule(n).parameters()}
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


def _check_width_arch(model: nn.Module, cfg: WidthPruneConfig) -> None:
    arch.width_spec(model, hidden=bool(cfg.hidden))  # raises for models it cannot cut


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
        tried.append({**vars(shape), "params": width_params(model, shape), "calib_loss": lm_loss(trial, rows)})
        del trial
    best = min(range(len(shapes)), key=lambda j: tried[j]["calib_loss"]) if tried else 0
    apply_width_plan(model, plan_for(imp, shapes[best]))
    return {"shape": vars(shapes[best]), "params_before": before, "params_after": non_embedding_params(model), "candidates": tried}


