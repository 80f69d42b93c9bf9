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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError

BITS = (2, 3, 4, 8)
FP16_TINY = 1e-7  # smallest scale: stays non-zero (subnormal) in fp16


@dataclass(frozen=True)
class GridSpec:
    """The grid of one layer: bit width, group size (-1 = per channel), symmetry, ternary."""

    bits: int = 4
    group_size: int = 64
    sym: bool = False
    ternary: bool = False

    def __post_init__(self):
        if self.ternary and self.bits != 2:
            object.__setattr__(self, "bits", 2)
        if self.bits not in BITS:
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
    return t.to(torch.float16).to(torch.float32)


def grid_params(w: Tensor, spec: GridSpec, clip: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """Scales and zeros (out, G) for ``w`` (out, in); ``clip`` (out, G) or scalar shrinks the range."""
    g = spec.groups(w.shape[1])
    wg = _grouped(w.float(), g)  # (out, G, g)
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
    hi = wg.amax(-1).clamp(min=0) * clip
    s = fp16_round(((hi - lo) / spec.maxq).clamp_min(FP16_TINY))
    z = torch.round(-lo / s).clamp(0, spec.maxq)
    return s, z


def quantize_codes(w: Tensor, s: Tensor, z: Tensor, spec: GridSpec) -> Tensor:
    """Codes (out, in) as uint8 for ``w`` (out, in) with per-group ``s``, ``z`` (out, G)."""
    g = w.shape[1] // s.shape[1]
    q = torch.round(_grouped(w.float(), g) / s[..., None]) + z[..., None]
    return q.clamp(0, spec.maxq).reshape(w.shape).to(torch.uint8)


def dequantize(q: Tensor, s: Tensor, z: Tensor) -> Tensor:
    """``(q - z) * s`` per group -> float32 (out, in)."""
    g = q.shape[1] // s.shape[1]
    return ((_grouped(q.float(), g) - z[..., None]) * s[..., None]).reshape(q.shape)


def fake_quantize(w: Tensor, s: Tensor, z: Tensor, spec: GridSpec) -> Tensor:
    return dequantize(quantize_codes(w, s, z, spec), s, z)


def mse_clip(w: Tensor, spec: GridSpec, *, col_weight: Tensor | None = None, steps: int = 20,
             max_shrink: float = 0.25) -> tuple[Tensor, Tensor]:
    """Grid parameters whose per-(row, group) clip factor minimises the (weighted) squared error."""
    g = spec.groups(w.shape[1])
    wg = _grouped(w.float(), g)  # (out, G, g)
    cw = torch.ones(w.shape[1]) if col_weight is None else col_weight.float()
    cw = cw.reshape(1, -1, g)  # (1, G, g)
    best_err = torch.full(wg.shape[:2], float("inf"))
    best_s, best_z = grid_params(w, spec)
    for i in range(steps + 1):
        c = 1.0 - max_shrink * i / steps
        s, z = grid_params(w, spec, c)
        err = ((_grouped(fake_quantize(w, s, z, spec), g) - wg) ** 2 * cw).sum(-1)  # (out, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def choose_params(w: Tensor, spec: GridSpec, clip_search: bool, col_weight: Tensor | None = None):
    return mse_clip(w, spec, col_weight=col_weight) if clip_search else grid_params(w, spec)
