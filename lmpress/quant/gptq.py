"""GPTQ: quantize a layer's weights column by column, each rounding error compensated on the
columns not yet quantized through the inverse Hessian of the layer's inputs.
Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv 2210.17323.

Recipe::

    - method: gptq
      bits: 3
      group_size: 64
      act_order: true        # the default
      calib_dtype: bfloat16  # the default; float32 for passes at full precision

The Hessian ``H = 2/n X^T X`` of each linear's inputs comes from the calibration pipeline; the
layers of a block that read the same input (q/k/v, gate/up) share one Hessian
(:class:`lmpress.stats.InputStats`). With ``sequential`` each such group is quantized before the next group's inputs are collected, so
later layers see the quantization error of earlier ones.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import arch, stats
from ..calib import CALIB_DTYPES, resolve_calib_dtype
from ..errors import InputError
from ..sweep import NONE, sweep_columns, sweep_levels
from .config import QuantConfig
from .gguf_mix import cfg_plan
from .grid import GridSpec, choose_params, dequantize
from .qlinear import ggml_embeddings_, quantize_head_, replace_linear


@dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    """GPTQ options (plus the common ones of :class:`QuantConfig`).

    damp: dampening added to the Hessian diagonal, as a fraction of its mean; grows x10 while the
        Cholesky factorization fails (the report lists the layers where it did). block_size: columns
        per lazy batch update.
    act_order (on by default): quantize columns by decreasing Hessian diagonal; groups keep their
        original columns (scales computed up front, "static groups"), so packing and kernels are
        unchanged. On the default model it cuts W4 g64's perplexity increase by about a third.
    sequential: quantize q/k/v, then o, then gate/up, then down, each on inputs that already
        carry the earlier groups' quantization (about 1.5x the calibration passes; off by default).
    clip_search (on by default for GPTQ): each group's scale and zero come from a clip search that
        minimises the group's squared error, instead of its min/max.
    calib_dtype: dtype of the calibration passes (block forwards and Hessian products); the weights
        and the GPTQ solve stay in float32. "bfloat16" (default) is about 3x faster on CPUs with bf16
        units; "float32" for full-precision passes.
    scale_refit (llama.cpp grids only): after the sweep has chosen the codes, each block's fp16 scale
        (and min) is solved again by least squares in the layer's output error
        (:func:`lmpress.quant.ggml.refit_scales`); it never makes a layer's error larger.
    """

    method: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    sequential: bool = False
    clip_search: bool = True
    calib_dtype: str = "auto"  # resolved when the config is made: bfloat16 on CPUs with bf16 units, else float32
    scale_refit: bool = True  # llama.cpp grids (--format gguf:TYPE): block scales re-solved for the chosen codes

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "calib_dtype", resolve_calib_dtype(self.calib_dtype))  # the recipe saves the resolved value
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp {self.damp} must lie in [0, 1), e.g. 0.01")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"block_size {self.block_size!r} must be a positive integer, e.g. 128")


@dataclass(frozen=True)
class InverseHessian:
    """What the column sweep needs from a layer's Hessian H (in, in); layers reading one input share it."""

    U: Tensor  # (in, in) upper Cholesky factor of (H + λI)^-1, rows and columns in the order perm
    perm: Tensor  # (in,) column order: decreasing diag(H) with act_order, else 0..in-1
    dead: Tensor  # bool (in,): inputs never active; their weights are zeroed
    act_order: bool
    damp: float  # the dampening used: above the configured one where H was not positive definite


def inverse_hessian(H: Tensor, damp: float = 0.01, act_order: bool = False) -> InverseHessian:
    H = H.detach().float()
    dead = torch.diag(H) == 0
    diag = torch.diag(H).masked_fill(dead, 1)  # stats.without_dead's diagonal
    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(H.shape[0])

    def permuted() -> Tensor:  # without_dead(H) in the order perm, made with one (in, in) copy
        Hp = H[perm[:, None], perm]
        Hp.diagonal()[dead[perm]] = 1
        return Hp

    U, used = stats.damped_cholesky(permuted(), damp, inverse=True, method="GPTQ", rebuild=permuted)
    return InverseHessian(U, perm, dead, act_order, used)


@contextmanager
def _sweep_threads(kernel: bool):
    """Yields whether the C++ sweep runs. Without it the torch column loop runs on one thread: it is
    many tiny ops, where threads only add synchronisation."""
    from .kernels import gptq_extension

    if kernel and gptq_extension() is not None:
        yield True
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield False
    finally:
        torch.set_num_threads(threads)


def gptq_quantize(W: Tensor, H: Tensor, spec: GridSpec, *, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, clip_search: bool = False,
                  kernel: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Codes q (out, in) and scales/zeros (out, G) for ``W`` (out, in) given ``H`` (in, in).

    ``kernel``: run the column sweep (:mod:`lmpress.sweep`) in C++ when it is available, else in
    its torch reference loop (same arithmetic)."""
    with _sweep_threads(kernel) as kernel:
        return gptq_solve(W, inverse_hessian(H, damp, act_order), spec, block_size=block_size,
                          clip_search=clip_search, kernel=kernel)


def _params_by_rows(W: Tensor, spec: GridSpec, clip_search: bool, rows: int = 512) -> tuple[Tensor, Tensor]:
    """:func:`choose_params` a slice of rows at a time: the same values (every step works within a
    row's groups), with the clip search's temporaries the size of the slice, not of the stacked
    layers (an 8960 x 1536 gate/up stack made five 110 MB temporaries)."""
    parts = [choose_params(W[a : a + rows], spec, clip_search) for a in range(0, W.shape[0], rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def gptq_solve(W: Tensor, hinv: InverseHessian, spec: GridSpec, *, block_size: int = 128,
               clip_search: bool = False, kernel: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`gptq_quantize` with the inverse Hessian factored already."""
    W = W.detach().float().clone()
    out_f, cols = W.shape
    gs = spec.groups(cols)
    W[:, hinv.dead] = 0.0
    perm, U = hinv.perm, hinv.U
    static = hinv.act_order or gs == cols  # group parameters fixed up front
    if static:
        s_all, z_all = _params_by_rows(W, spec, clip_search)
    else:
        s_all, z_all = torch.empty(out_f, cols // gs), torch.empty(out_f, cols // gs)
    W = W[:, perm]
    group_of = perm // gs  # group of each (permuted) column
    Q = torch.empty_like(W)
    maxq = float(spec.maxq)
    if not static:  # groups are contiguous: a block holds whole groups
        block_size = max(gs, block_size // gs * gs)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # (out, b)
        E1 = torch.zeros_like(W1)
        Q1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2].contiguous()
        idx = group_of[i1:i2]
        S1, Z1 = s_all[:, idx].contiguous(), z_all[:, idx].contiguous()  # each column's scale and zero
        for c0 in range(0, i2 - i1, (i2 - i1) if static else gs):
            c1 = min(c0 + (i2 - i1 if static else gs), i2 - i1)
            if not static:  # the group's parameters come from its weights as updated so far
                g = int(group_of[i1 + c0])
                s_all[:, g : g + 1], z_all[:, g : g + 1] = choose_params(W1[:, c0:c1], spec, clip_search)
                S1[:, c0:c1], Z1[:, c0:c1] = s_all[:, g : g + 1], z_all[:, g : g + 1]
            sweep_columns(W1, U1, NONE, S1, Z1, Q1, E1, c0, c1, maxq, kernel)
        Q[:, i1:i2] = Q1
        W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
    del W
    q = Q.to(torch.uint8)  # codes are whole numbers: the same codes, a quarter of the bytes to unpermute
    del Q
    return q[:, torch.argsort(perm)], s_all, z_all


def gptq_solve_ggml(W: Tensor, hinv: InverseHessian, gtype: str, importance: Tensor, *, block_size: int = 128):
    """GPTQ on one of llama.cpp's block grids (:mod:`lmpress.quant.ggml`): returns a ``BlockQuant``.

    The block parameters (fp16 ``d``/``m``; a K type's super-block ``d``/``dmin`` and integer
    sub-block scales and mins) come from the importance-weighted search of :func:`ggml.fit_params`
    (``importance`` (in,), e.g. diag(H)), at their stored precision, before the sweep sees them; the
    sweep then chooses each code, column by column, with error feedback. With act-order the
    parameters come from the weights before the sweep (static groups); in natural order each
    (super-)block's come from its weights as updated when the sweep reaches it."""
    from . import ggml

    t = ggml.block_type(gtype)
    W = W.detach().float().clone()
    out_f, cols = W.shape
    W[:, hinv.dead] = 0.0
    importance = importance.float().clamp_min(0)
    static = hinv.act_order
    params = ggml.fit_params(W, gtype, importance) if static else {}
    S_all, M_all = ggml.column_scale_offset(gtype, params, cols) if static else (torch.empty_like(W), torch.zeros_like(W))
    perm, U = hinv.perm, hinv.U
    W, S_all, M_all = W[:, perm], S_all[:, perm], M_all[:, perm]
    Q = torch.empty_like(W)
    lv = ggml.levels(t)
    nearest = lambda y: ggml.nearest_index(y, gtype)  # noqa: E731
    if not static:  # a lazy block holds whole (super-)blocks
        block_size = max(t.block, block_size // t.block * t.block)
        parts: dict[str, list] = {}
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2].contiguous()
        E1, Q1 = torch.zeros_like(W1), torch.empty_like(W1)
        S1, M1 = S_all[:, i1:i2].contiguous(), M_all[:, i1:i2].contiguous()
        for c0 in range(0, i2 - i1, (i2 - i1) if static else t.block):
            c1 = min(c0 + (i2 - i1 if static else t.block), i2 - i1)
            if not static:  # this block's parameters from its weights as the sweep left them
                p = ggml.fit_params(W1[:, c0:c1], gtype, importance[i1 + c0 : i1 + c1])
                for k, v in p.items():
                    parts.setdefault(k, []).append(v)
                S1[:, c0:c1], M1[:, c0:c1] = ggml.column_scale_offset(gtype, p, c1 - c0)
            sweep_levels(W1, U1, S1, M1, Q1, E1, c0, c1, nearest, lv)
        Q[:, i1:i2] = Q1
        W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
    if not static:
        params = {k: torch.cat(v, dim=1) for k, v in parts.items()}
    q = Q[:, torch.argsort(perm)].to(torch.uint8)
    return ggml.BlockQuant(gtype, q, **params)


def _stacked(ws: list[Tensor]) -> Tensor:
    """The rows of ``ws`` stacked; one tensor as it is (the solver copies it anyway: no second copy)."""
    return ws[0] if len(ws) == 1 else torch.cat(ws)


def _solve_ggml(W: Tensor, hinv: InverseHessian, gtype: str, H: Tensor, cfg: GPTQConfig):
    from . import ggml

    bq = gptq_solve_ggml(W, hinv, gtype, torch.diag(H), block_size=cfg.block_size)
    if not cfg.scale_refit:
        return bq
    Hd = H.float().clone()  # the damped Hessian the sweep solved with, dead inputs as it saw them
    Hd[hinv.dead, :] = 0
    Hd[:, hinv.dead] = 0
    Hd.diagonal().add_(hinv.damp * torch.diag(Hd).mean())
    return ggml.refit_scales(bq, W.float().masked_fill(hinv.dead, 0.0), Hd)


def gptq_(model, cfg: GPTQConfig, ctx) -> dict:
    """Quantize every block linear of ``model`` in place with GPTQ on ``ctx.calib``."""
    from ..calib import walk_blocks

    if ctx.calib is None:
        raise InputError("GPTQ needs calibration data")
    errors: dict[str, float] = {}
    raised: dict[str, float] = {}
    plan = cfg_plan(model, cfg, imatrix=True)

    def record(full, W, Wq, H, damp):
        D = Wq - W
        errors[full] = (((D @ H) * D).sum() / ((W @ H) * W).sum()).item()
        if damp > cfg.damp:
            raised[full] = damp

    def quantize_group_ggml(bctx, names, H):
        from . import ggml
        from .qlinear import GGMLLinear

        by_type: dict[str, list[str]] = {}
        for n in names:
            by_type.setdefault(plan[f"{bctx.name}.{n}"], []).append(n)
        Ws = {n: arch.linear_weight(bctx.linears[n]).detach().float() for n in names}
        with _sweep_threads(False):
            hinv = inverse_hessian(H, cfg.damp, cfg.act_order)
            solved = {t: _solve_ggml(torch.cat([Ws[n] for n in ns]), hinv, t, H, cfg) for t, ns in by_type.items()}
        for t, ns in by_type.items():
            for n, bq in zip(ns, ggml.split_rows(solved[t], [Ws[n].shape[0] for n in ns])):
                full, Wq = f"{bctx.name}.{n}", ggml.dequantize(bq)
                record(full, Ws[n], Wq, H, hinv.damp)
                arch.set_linear_weight(bctx.linears[n], Wq)
                bctx.defer(lambda full=full, bq=bq: arch.set_module(
                    model, full, GGMLLinear.from_blocks(bq, getattr(model.get_submodule(full), "bias", None))))

    def grids(bctx, names) -> dict[GridSpec, list[str]]:
        by_spec: dict[GridSpec, list[str]] = {}
        for n in names:
            spec = cfg.layer_grid(f"{bctx.name}.{n}")
            if spec is not None:
                by_spec.setdefault(spec, []).append(n)
        return by_spec

    def solve_group(bctx, by_spec, H):
        """``({spec: (q, s, z)}, damp used)`` for one input group's layers."""
        Ws = {n: arch.linear_weight(bctx.linears[n]).detach().float() for ns in by_spec.values() for n in ns}
        with _sweep_threads(True) as kernel:
            hinv = inverse_hessian(H, cfg.damp, cfg.act_order)
            # layers reading one input share H: GPTQ treats rows independently, so one solve over
            # their stacked rows gives each layer's exact result with one factorization and loop
            return {spec: gptq_solve(_stacked([Ws[n] for n in ns]), hinv, spec, block_size=cfg.block_size,
                                     clip_search=cfg.clip_search, kernel=kernel) for spec, ns in by_spec.items()}, hinv.damp

    def apply_group(bctx, by_spec, H, solved, damp):
        for spec, ns in by_spec.items():
            q, s, z = solved[spec]
            Ws = {n: arch.linear_weight(bctx.linears[n]).detach().float() for n in ns}
            rows = [Ws[n].shape[0] for n in ns]
            for n, qi, si, zi in zip(ns, q.split(rows), s.split(rows), z.split(rows)):
                full = f"{bctx.name}.{n}"
                Wq = dequantize(qi, si, zi)
                record(full, Ws[n], Wq, H, damp)
                arch.set_linear_weight(bctx.linears[n], Wq)  # same outputs as the packed layer, faster here
                bctx.defer(lambda full=full, q=qi, s=si, z=zi, spec=spec: replace_linear(model, full, q, s, z, spec))

    def per_block(bctx):
        groups = bctx.groups
        batches = [[g] for g in groups] if cfg.sequential else [groups]
        for batch in batches:
            st = stats.collect(bctx, [n for g in batch for n in g], lambda: stats.InputStats("xtx", upcast=False))
            if plan is not None:  # llama.cpp's grids (--format gguf:TYPE); solved on every rank alike
                for g in batch:
                    quantize_group_ggml(bctx, g, st[g[0]].take_hessian())
                continue
            work = [(grids(bctx, g), st[g[0]].take_hessian()) for g in batch]
            work = [(by_spec, H) for by_spec, H in work if by_spec]
            # each group's solve may run on another rank under torch.distributed (cost ~ rows x in^2)
            costs = [sum(arch.linear_weight(bctx.linears[n]).shape[0] for ns in b.values() for n in ns) * H.shape[0] ** 2 for b, H in work]
            solved = bctx.solve_spread([lambda b=b, H=H: solve_group(bctx, b, H) for b, H in work], costs)
            for (by_spec, H), (result, damp) in zip(work, solved):
                apply_group(bctx, by_spec, H, result, damp)

    walk_blocks(model, ctx.calib, per_block, progress="gptq" if ctx.progress else False,
                dtype=CALIB_DTYPES[cfg.calib_dtype])
    if cfg.head_bits:
        quantize_head_(model, GridSpec(cfg.head_bits, cfg.group_size, cfg.sym))
    if plan is not None:
        ggml_embeddings_(model, plan)
    vals = list(errors.values())
    out = {"layers": len(vals), "relative_output_error_mean": sum(vals) / max(1, len(vals))}
    if raised:  # the Hessian was not positive definite at the configured dampening: say so
        out["dampening_raised"] = raised
    return out
