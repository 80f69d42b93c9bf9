"""AWQ: activation-aware weight quantization. Scale up the input channels that carry large
activations before rounding (and fold the inverse scale into the preceding norm or linear), so the
salient weights lose less precision; then round to nearest, with an activation-weighted clip search.
Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
arXiv 2306.00978.

Recipe::

    - method: awq
      bits: 4
      group_size: 64

For each (preceding op, linears) pair of a block (see ``arch.ArchSpec.scale_pairs``), with
``a`` the mean |x| per input channel: ``s = a^alpha / sqrt(max(a^alpha) min(a^alpha))``, alpha on a
grid in [0, 1) chosen to minimise ``|| X W^T - (X / s) Q(W s)^T ||^2`` on calibration tokens. A pair
whose preceding linear does not match in shape (grouped-query v -> o) is left unscaled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .. import arch, stats
from ..errors import InputError
from .config import QuantConfig
from .grid import GridSpec, choose_params, dequantize, fake_quantize, grid_params, quantize_codes
from . import ggml
from .gguf_mix import cfg_plan
from .qlinear import GGMLLinear, ggml_embeddings_, quantize_head_, replace_linear


@dataclass(frozen=True)
class AWQConfig(QuantConfig):
    """AWQ options. n_grid: alpha values tried; sample_tokens: calibration rows used in the search."""

    method: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True
    clip_search: bool = True
    n_grid: int = 20
    sample_tokens: int = 2048


def awq_scale(x_absmean: Tensor, X: Tensor, W: Tensor, spec: GridSpec | str, grid: int = 20) -> tuple[Tensor, float]:
    """Best per-input-channel scale ``s`` (in,) for weights W (out, in) given sample inputs X (n, in);
    ``spec``: lmpress's grid, or the name of a llama.cpp block type (its round-to-nearest)."""
    ref = X @ W.T  # (n, out)
    best, best_s, best_a = float("inf"), torch.ones_like(x_absmean), 0.0
    a = x_absmean.clamp_min(1e-8)
    for i in range(grid):
        alpha = i / grid
        s = a**alpha
        s = s / (s.max() * s.min()).sqrt()
        Ws = W * s[None, :]
        Wq = _round_trip(Ws, spec) / s[None, :]
        err = ((X @ Wq.T - ref) ** 2).mean().item()
        if err < best:
            best, best_s, best_a = err, s, alpha
    return best_s, best_a


def _round_trip(w: Tensor, spec: GridSpec | str) -> Tensor:
    if isinstance(spec, str):
        from . import ggml

        return ggml.dequantize(ggml.quantize(w, spec))
    return fake_quantize(w, *grid_params(w, spec), spec)


def fold_scale(prev: nn.Module, linears: list[nn.Module], s: Tensor) -> None:
    """Divide the output of ``prev`` by ``s`` and multiply the linears' input columns by ``s``."""
    with torch.no_grad():
        if arch.is_linear(prev):
            w = arch.linear_weight(prev)
            arch.set_linear_weight(prev, w / s[:, None])
            if getattr(prev, "bias", None) is not None:
                prev.bias.div_(s)
        elif arch.norm_adds_one(prev):  # RMSNorm computing x * (1 + weight)
            prev.weight.copy_((1 + prev.weight) / s - 1)
        else:  # RMSNorm / LayerNorm: x * weight (+ bias)
            prev.weight.div_(s)
            if getattr(prev, "bias", None) is not None:
                prev.bias.div_(s)
        for lin in linears:
            arch.set_linear_weight(lin, arch.linear_weight(lin) * s[None, :])


def awq_(model, cfg: AWQConfig, ctx) -> dict:
    """Scale (fold) and quantize every block linear of ``model`` in place."""
    from ..calib import walk_blocks

    if ctx.calib is None:
        raise InputError("AWQ needs calibration data")
    pairs = arch.spec_for(model).scale_pairs
    if not pairs:
        raise InputError(f"AWQ needs the scale pairs of {type(model).__name__}; it is not described in lmpress.arch")
    plan = cfg_plan(model, cfg, imatrix=True)
    n_tok = ctx.calib.numel()
    stride = max(1, n_tok // cfg.sample_tokens)
    report: dict = {"alphas": {}, "skipped_pairs": []}

    def per_block(bctx):
        lin = bctx.linears
        st = stats.collect(bctx, list(lin), lambda: stats.InputStats("abs", "sq", rows=cfg.sample_tokens, stride=stride))
        for prev_name, names in pairs:
            prev = bctx.block.get_submodule(prev_name)
            mods = [lin[n] for n in names]
            if arch.is_linear(prev) and arch.linear_weight(prev).shape[0] != mods[0].in_features:
                report["skipped_pairs"].append(f"{bctx.name}.{prev_name}")
                continue
            W = torch.cat([arch.linear_weight(m).detach().float() for m in mods])
            first = f"{bctx.name}.{names[0]}"
            spec = plan[first] if plan is not None else cfg.layer_grid(first) or cfg.grid()
            s, alpha = awq_scale(st[names[0]].mean_abs, st[names[0]].sample, W, spec, cfg.n_grid)
            fold_scale(prev, mods, s)
            for acc in {id(st[n]): st[n] for n in names}.values():  # once per input group
                acc.divide_inputs(s)  # the inputs are now x / s
            report["alphas"][f"{bctx.name}.{names[0]}"] = alpha
        for n, m in lin.items():
            full = f"{bctx.name}.{n}"
            w = arch.linear_weight(m).detach().float()
            if plan is not None:  # llama.cpp's grid, scales searched with the activation energy as importance
                bq = ggml.fit(w, plan[full], st[n].mean_sq) if cfg.clip_search else ggml.quantize(w, plan[full])
                arch.set_linear_weight(m, ggml.dequantize(bq))
                bctx.defer(lambda full=full, bq=bq: arch.set_module(
                    model, full, GGMLLinear.from_blocks(bq, getattr(model.get_submodule(full), "bias", None))))
                continue
            spec = cfg.layer_grid(full)
            if spec is None:
                continue
            s, z = choose_params(w, spec, cfg.clip_search, col_weight=st[n].mean_sq)
            q = quantize_codes(w, s, z, spec)
            arch.set_linear_weight(m, dequantize(q, s, z))
            bctx.defer(lambda full=full, q=q, s=s, z=z, spec=spec: replace_linear(model, full, q, s, z, spec))

    walk_blocks(model, ctx.calib, per_block, progress="awq" if ctx.progress else False)
    if cfg.head_bits:
        quantize_head_(model, GridSpec(cfg.head_bits, cfg.group_size, cfg.sym))
    if plan is not None:
        ggml_embeddings_(model, plan)
    report["skipped_pairs"] = len(report["skipped_pairs"])
    return report
