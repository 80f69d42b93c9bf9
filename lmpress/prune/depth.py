"""Depth pruning: remove whole decoder blocks, ranked by

* ``"cosine"``: ShortGPT's block influence ``1 - E[cos(x_in, x_out)]`` (Men et al., arXiv 2403.03853);
* ``"activation"``: the relative size of the block's residual update ``E[||x_out - x_in|| / ||x_in||]``;
* ``"perplexity"``: the calibration loss increase when the block alone is skipped (Minitron's PPL
  depth importance, arXiv 2407.14679).

The result is a plain Hugging Face model with fewer blocks and an edited ``model.config``.

Recipe::

    - method: prune-depth
      drop_layers: 6
      importance: cosine
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import arch
from ..errors import InputError
from .shared import lm_loss, non_embedding_params


@dataclass(frozen=True)
class DepthPruneConfig:
    """Remove whole decoder blocks."""

    family: ClassVar[str] = "prune"
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
    base = lm_loss(model, rows)
    blocks = arch.blocks(model)
    out = torch.zeros(len(blocks))

    def skip(_m, args, kwargs, res):
        x = args[0] if args else kwargs["hidden_states"]
        return (x,) + tuple(res[1:]) if isinstance(res, tuple) else x

    for i in bar(range(len(blocks)), desc="perplexity importance", enabled=bool(progress)):
        h = blocks[i].register_forward_hook(skip, with_kwargs=True)
        try:
            out[i] = lm_loss(model, rows) - base
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
