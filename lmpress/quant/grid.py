"""Quantization grids: the math shared by RTN, GPTQ and AWQ (pure functions).

A weight ``W`` (out, in) is split into groups of ``group_size`` consecutive columns
(``group_size = in`` is per-channel). Each (row, group) has a scale ``s`` and a zero point ``z``
and its weights become codes ``q = clamp(round(w / s) + z, 0, maxq)``, dequantized as
``(q - z) * s``. Scales and zeros are rounded to fp16 *before* the codes are computed, so the
stored model is exactly the one that was optimized.

- asymmetric: ``s = (max - min) / maxq``, ``z = round(-min / s)`` (min/max of the group, each
  clipped towards 0 by a factor ``clip``);
- symmetric: ``s = 2 * max|w| / maxq``, ``z = (maxq + 1) / 2``;
- ternary (TWN, arXiv 1605.04711): codes {0, 1, 2} with ``z = 1`` and
  ``s = mean(|w| : |w| > 0.7 mean|w|)``, i.e. weights in {-s, 0, +s}; stored as 2-bit codes.

``mse_clip`` searches the clip factor per (row, group) that minimises the squared weight error
(optionally weighted per column by activation energy), as in AWQ's and llama.cpp's clip searches.

Quantization-aware training (:mod:`lmpress.distill.qat`) uses these same functions with a
straight-through ``round_fn`` (round forward, identity backward; Bengio et al., arXiv 1308.3432)
and separate low/high clip factors ``clip``/``clip_hi`` that it learns, so the packed model is
the trained one bit for bit. With the default ``round_fn=torch.round`` nothing is differentiable
and RTN / GPTQ / AWQ compute exactly what they always did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError

BITS = (2, 3, 4, 8)  # the widths the packed format stores (lmpress.quant.pack); the only copy
FP16_TINY = 1e-7  # smallest scale: stays non-zero (subnormal) in fp16


@dataclass(frozen=True)
class GridSpec:
    """The grid of one layer: bit width, group size (-1 = per channel), symmetry, ternary.

    ``fake=True``: a grid that is only fake-quantized (QAT with float output), so any width from 1
    to 8 bits is allowed; the packed format stores :data:`BITS` only.
    """

    bits: int = 4
    group_size: int = 64
    sym: bool = False
    ternary: bool = False
    fake: bool = False

    def __post_init__(self):
        if self.ternary and self.bits != 2:
            object.__setattr__(self, "bits", 2)
        if self.fake and not 1 <= self.bits <= 8:
            raise InputError(f"fake quantization takes 1 to 8 bits, got {self.bits}")
        if not self.fake and self.bits not in BITS:
            raise InputError(f"bits must be one of {BITS} (or --ternary), got {self.bits}")
        if self.group_size == 0 or self.group_size < -1:
            raise InputError(f"group_size must be positive or -1 (per channel), got {self.group_size}")

    @property
    def maxq(self) -> int:
        return 2 if self.ternary else 2**self.bits - 1

    def groups(self, cols: int) -> int:
        """Group size for a layer with ``cols`` input features; a clear error if it does not divide."""
        g = cols if self.group_size == -1 else self.group_size
        if cols % g:
            divisors = [d for d in (32, 64, 128, 192, 256) if cols % d == 0]
            raise InputError(f"group_size {g} does not divide in_features={cols}; use one of {divisors} or -1 (per channel)")
        return g


def _grouped(w: Tensor, g: int) -> Tensor:
    return w.reshape(w.shape[0], -1, g)  # (out, G, g)


def fp16_round(t: Tensor) -> Tensor:
    """``t`` rounded to float16, as float32; straight-through (identity gradient) when ``t`` needs a
    gradient: ``t + (h - t)`` is exactly ``h``, the difference of a float32 and its fp16 rounding being exact."""
    h = t.to(torch.float16).to(torch.float32)
    return t + (h - t).detach() if t.requires_grad else h


def grid_params(w: Tensor, spec: GridSpec, clip: Tensor | float = 1.0, clip_hi: Tensor | float | None = None, *,
                round_fn=torch.round) -> tuple[Tensor, Tensor]:
    """Scales and zeros (out, G) for ``w`` (out, in); ``clip`` (out, G) or scalar shrinks the range.

    Asymmetric grids may shrink the top of the range by a separate ``clip_hi`` (default ``clip``).
    ``round_fn`` rounds the zero point (a straight-through round makes ``s``, ``z`` differentiable in
    the clip factors; ``w``'s min and max are used as they are, so pass ``w.detach()`` for QAT).
    """
    g = spec.groups(w.shape[1])
    wg = _grouped(w.float(), g)  # (out, G, g)
    if clip_hi is not None and (spec.sym or spec.ternary):
        raise InputError("a separate high clip factor (clip_hi) applies to asymmetric grids only")
    if spec.ternary:
        a = wg.abs()
        delta = 0.7 * a.mean(-1, keepdim=True)
        big = (a > delta).float()
        s = (a * big).sum(-1) / big.sum(-1).clamp_min(1)
        s = fp16_round((s * clip).clamp_min(FP16_TINY))
        return s, torch.ones_like(s)
    if spec.sym:
        amax = wg.abs().amax(-1) * clip
        s = fp16_round((2 * amax / spec.maxq).clamp_min(FP16_TINY))
        return s, torch.full_like(s, (spec.maxq + 1) / 2)
    lo = wg.amin(-1).clamp(max=0) * clip
    hi = wg.amax(-1).clamp(min=0) * (clip if clip_hi is None else clip_hi)
    s = fp16_round(((hi - lo) / spec.maxq).clamp_min(FP16_TINY))
    z = round_fn(-lo / s).clamp(0, spec.maxq)
    return s, z


def grid_codes(w: Tensor, s: Tensor, z: Tensor, spec: GridSpec, round_fn=torch.round) -> Tensor:
    """Codes ``clamp(round(w / s) + z, 0, maxq)`` (out, in) as float, for ``w`` (out, in) with per-group
    ``s``, ``z`` (out, G); differentiable in ``w``, ``s``, ``z`` with a straight-through ``round_fn``."""
    g = w.shape[1] // s.shape[1]
    q = round_fn(_grouped(w.float(), g) / s[..., None]) + z[..., None]  # (out, G, g)
    return q.clamp(0, spec.maxq).reshape(w.shape)


def quantize_codes(w: Tensor, s: Tensor, z: Tensor, spec: GridSpec) -> Tensor:
    """Codes (out, in) as uint8 for ``w`` (out, in) with per-group ``s``, ``z`` (out, G)."""
    return grid_codes(w, s, z, spec).to(torch.uint8)


def dequantize(q: Tensor, s: Tensor, z: Tensor) -> Tensor:
    """``(q - z) * s`` per group -> float32 (out, in)."""
    g = q.shape[1] // s.shape[1]
    return ((_grouped(q.float(), g) - z[..., None]) * s[..., None]).reshape(q.shape)


def fake_quantize(w: Tensor, s: Tensor, z: Tensor, spec: GridSpec, round_fn=torch.round) -> Tensor:
    """``dequantize(codes)``: ``w`` (out, in) on the grid, as float32 (see :func:`grid_codes` for ``round_fn``)."""
    return dequantize(grid_codes(w, s, z, spec, round_fn), s, z)


def mse_clip_factors(w: Tensor, spec: GridSpec, *, col_weight: Tensor | None = None, steps: int = 20,
                     max_shrink: float = 0.25) -> Tensor:
    """The clip factor (out, G) among ``1 - max_shrink * i / steps``, i = 0..steps, that minimises each
    (row, group)'s squared weight error, weighted per column by ``col_weight`` (in,) when given."""
    g = spec.groups(w.shape[1])
    wg = _grouped(w.float(), g)  # (out, G, g)
    cw = torch.ones(w.shape[1]) if col_weight is None else col_weight.float()
    cw = cw.reshape(1, -1, g)  # (1, G, g)
    best_err = torch.full(wg.shape[:2], float("inf"))
    best_c = torch.ones(wg.shape[:2])
    for i in range(steps + 1):
        c = torch.full(wg.shape[:2], 1.0 - max_shrink * i / steps)  # (out, G)
        s, z = grid_params(w, spec, c)
        err = ((_grouped(fake_quantize(w, s, z, spec), g) - wg) ** 2 * cw).sum(-1)  # (out, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_c = torch.where(better, c, best_c)
    return best_c


def mse_clip(w: Tensor, spec: GridSpec, *, col_weight: Tensor | None = None, steps: int = 20,
             max_shrink: float = 0.25) -> tuple[Tensor, Tensor]:
    """Grid parameters whose per-(row, group) clip factor minimises the (weighted) squared error."""
    return grid_params(w, spec, mse_clip_factors(w, spec, col_weight=col_weight, steps=steps, max_shrink=max_shrink))


def choose_params(w: Tensor, spec: GridSpec, clip_search: bool, col_weight: Tensor | None = None):
    return mse_clip(w, spec, col_weight=col_weight) if clip_search else grid_params(w, spec)
