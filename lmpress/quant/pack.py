"""Bit-packed storage of weight-only quantized matrices, and the reference dequantization.

Convention (whole project): a weight ``W`` of shape ``(out, in)`` is stored as integer codes
``q`` in ``[0, 2**bits - 1]``, scales ``s`` and zeros ``z`` of shape ``(out, in // group_size)``
(fp16), and ``W ≈ (q - z) * s``, where each block of ``group_size`` consecutive columns shares one
``(s, z)`` per row. ``group_size == in`` is per-channel. Ternary weights are ``bits=2`` codes
{0, 1, 2} with ``z = 1``.

On-disk layout (version 1) of ``pack(q, bits)``: a ``uint8`` tensor of shape
``(out, in * bits // 8)``. Each output row is packed on its own, rows follow each other (row-major),
so a row starts on a byte boundary and a kernel reads the weights in one sequential pass.
Inside a row, codes are little-endian: the earlier code sits in the lower bits.

* 8 bits, 1 code per byte: ``byte[k] = q[k]``; any ``in``.
* 4 bits, 2 codes per byte: ``byte[j] = q[2j] | q[2j+1] << 4``; ``in % 2 == 0``.
* 2 bits, 4 codes per byte: ``byte[j] = q[4j] | q[4j+1] << 2 | q[4j+2] << 4 | q[4j+3] << 6``;
  ``in % 4 == 0``.
* 3 bits, 8 codes per 3 bytes (dense): ``word[j] = sum_i q[8j+i] << 3i`` (24 bits), stored
  little-endian as ``byte[3j+b] = (word[j] >> 8b) & 0xFF``; ``in % 8 == 0``.

Every width is therefore one little-endian bit stream per row with code ``k`` at bit ``bits * k``.
The fused kernel (``lmpress/csrc/qgemv.cpp``) reads a row as 64-byte blocks (48 for 3 bits) of 16
32-bit lanes, each lane holding ``32 // bits`` consecutive codes (8 for 3 bits), and isolates
code ``j`` of all 16 lanes with one AND -- no shuffles in the inner loop.

Example::

    packed = pack(q, bits=4)                              # (out, in // 2) uint8
    W = dequantize_packed(packed, s, z, 4, 64, q.shape)   # (out, in) float32
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from .grid import BITS

LAYOUT_VERSION = 1
_IN_MULTIPLE = {8: 1, 4: 2, 2: 4, 3: 8}  # columns one packing unit holds


def packed_shape(shape: tuple[int, int], bits: int) -> tuple[int, int]:
    """Shape of ``pack(q, bits)`` for codes of ``shape == (out, in)``."""
    _check_bits(bits)
    out, cols = _check_shape(shape, bits)
    return out, cols * bits // 8


def pack(q: Tensor, bits: int) -> Tensor:
    """Pack codes ``q`` (out, in) in ``[0, 2**bits - 1]`` into uint8 (out, in * bits // 8)."""
    _check_bits(bits)
    _check_codes(q, bits)
    out, cols = _check_shape(tuple(q.shape), bits)
    q = q.to(torch.int32)
    if bits == 8:
        return q.to(torch.uint8).contiguous()
    if bits == 3:
        return _pack3(q, out, cols)
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=q.device) * bits  # (per,)
    words = (q.view(out, cols // per, per) << shifts).sum(-1)  # (out, in // per)
    return words.to(torch.uint8)


def unpack(packed: Tensor, bits: int, shape: tuple[int, int]) -> Tensor:
    """Inverse of :func:`pack`: bytes (out, in * bits // 8) -> uint8 codes (out, in) = ``shape``."""
    shape = tuple(int(d) for d in shape)
    expected = packed_shape(shape, bits)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
        raise InputError(
            f"packed weights for {bits}-bit codes of shape {shape} must be uint8 of shape "
            f"{expected}; got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    out, cols = shape
    if bits == 8:
        return packed.clone()
    if bits == 3:
        return _unpack3(packed, out, cols)
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits  # (per,)
    codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (out, in // per, per)
    return codes.reshape(out, cols)


def dequantize_packed(
    packed: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int,
    shape: tuple[int, int],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Reference dequantization: ``W = (q - z) * s`` per group, in float32, cast to ``dtype``."""
    out, cols = (int(d) for d in shape)
    ngroups = check_groups(scales, zeros, out, cols, group_size)
    q = unpack(packed, bits, (out, cols)).float().view(out, ngroups, group_size)
    s = scales.float().unsqueeze(-1)  # (out, ngroups, 1)
    z = zeros.float().unsqueeze(-1)
    return ((q - z) * s).reshape(out, cols).to(dtype)


def check_groups(scales: Tensor, zeros: Tensor, out: int, cols: int, group_size: int) -> int:
    """Validate ``group_size`` and the (out, in // group_size) scales and zeros; return ngroups."""
    if group_size <= 0 or cols % group_size != 0:
        raise InputError(f"group_size must divide in_features={cols}; got {group_size}")
    ngroups = cols // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (out, ngroups):
            raise InputError(
                f"{name} must have shape (out, in // group_size) = {(out, ngroups)}; "
                f"got {tuple(t.shape)}"
            )
    return ngroups


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise InputError(f"bits must be one of {BITS}; got {bits!r}")


def _check_shape(shape: tuple[int, ...], bits: int) -> tuple[int, int]:
    if len(shape) != 2:
        raise InputError(f"codes must be a 2-D (out, in) matrix; got shape {tuple(shape)}")
    out, cols = shape
    need = _IN_MULTIPLE[bits]
    if cols % need != 0:
        raise InputError(
            f"{bits}-bit packing stores {need} codes per unit, so in_features must be a "
            f"multiple of {need}; got {cols}"
        )
    return out, cols


def _check_codes(q: Tensor, bits: int) -> None:
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise InputError(f"codes must be an integer tensor; got {q.dtype}")
    if q.numel() == 0:
        return
    lo, hi = int(q.min()), int(q.max())
    if lo < 0 or hi > 2**bits - 1:
        raise InputError(
            f"{bits}-bit codes must lie in [0, {2**bits - 1}]; got values in [{lo}, {hi}]"
        )


def _pack3(q: Tensor, out: int, cols: int) -> Tensor:
    """8 codes -> one 24-bit little-endian word -> 3 bytes."""
    shifts = torch.arange(8, dtype=torch.int32, device=q.device) * 3  # (8,)
    words = (q.view(out, cols // 8, 8) << shifts).sum(-1, keepdim=True)  # (out, in // 8, 1)
    byte_shifts = torch.arange(3, dtype=torch.int32, device=q.device) * 8  # (3,)
    return ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(out, cols // 8 * 3)


def _unpack3(packed: Tensor, out: int, cols: int) -> Tensor:
    b = packed.reshape(out, cols // 8, 3).to(torch.int32)  # (out, in // 8, 3)
    words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)  # (out, in // 8)
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device) * 3  # (8,)
    codes = (words.unsqueeze(-1) >> shifts) & 7  # (out, in // 8, 8)
    return codes.to(torch.uint8).reshape(out, cols)
