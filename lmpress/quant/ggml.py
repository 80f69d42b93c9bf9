"""llama.cpp's block quantization types (ggml): their grids, round-to-nearest on them, their bytes.

A weight ``W`` (out, in) is cut, along each row, into blocks of 32 weights (the legacy types
``Q8_0 Q4_0 Q4_1 Q5_0 Q5_1`` and ``IQ4_NL``) or super-blocks of 256 (the K types of llama.cpp PR
1684: ``Q6_K Q5_K Q4_K Q3_K Q2_K``). Every weight is stored as a code ``q`` of ``bits`` bits and
dequantizes to

    w = S * level(q) + M

with ``level(q) = q - 2^(bits-1)`` for symmetric types, ``level(q) = q`` for types with a min and
``level(q) = IQ4_NL_LEVELS[q]`` (16 non-uniform levels) for IQ4_NL. ``S`` and ``M`` are per
sub-block: for the legacy types ``S = d`` and ``M = m`` are fp16 numbers per block; for K types
``S = d * sc`` and ``M = -dmin * mn`` with fp16 ``d``, ``dmin`` per super-block and small integer
sub-block scales ``sc`` (6-bit for Q3_K/Q4_K/Q5_K, 4-bit for Q2_K, int8 for Q6_K) and mins ``mn``.

:func:`quantize` fits these parameters by round-to-nearest, rounding each to its stored precision
(fp16 ``d``, integer ``sc``) *before* the codes are chosen, so the codes are the nearest points of
the grid the file really holds; :func:`dequantize` gives exactly the values llama.cpp (and
``gguf.quants.dequantize``) reads back; :func:`encode` writes the bytes, laid out as
``ggml-common.h`` defines each block. ``quantize(..., reference=True)`` instead reproduces ggml's
reference quantizer of the legacy types (codes from the unrounded float32 scale), bit for bit.

    >>> bq = quantize(W, "Q4_K"); raw = encode(bq)   # raw: uint8 (out, in / 256 * 144)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from .grid import FP16_TINY, fp16_round

QK = 32  # weights per block of the legacy types
QK_K = 256  # weights per super-block of the K types
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class BlockType:
    """One ggml type: ``block`` weights per (super-)block, ``sub`` per sub-block scale, ``bits`` per
    code; ``kind`` is ``sym`` (``level = q - 2^(bits-1)``), ``min`` (``level = q`` plus an offset)
    or ``nl`` (IQ4_NL's levels); ``scale_bits`` is the width of a K type's sub-block scales (0 for
    the legacy types, whose only scale is the fp16 ``d`` of the block)."""

    name: str
    block: int
    sub: int
    bits: int
    kind: str
    scale_bits: int = 0

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def k_type(self) -> bool:
        return self.block == QK_K

    @property
    def n_sub(self) -> int:
        return self.block // self.sub


TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q8_0", QK, QK, 8, "sym"),
    BlockType("Q4_0", QK, QK, 4, "sym"),
    BlockType("Q4_1", QK, QK, 4, "min"),
    BlockType("Q5_0", QK, QK, 5, "sym"),
    BlockType("Q5_1", QK, QK, 5, "min"),
    BlockType("IQ4_NL", QK, QK, 4, "nl"),
    BlockType("Q6_K", QK_K, 16, 6, "sym", 8),
    BlockType("Q4_K", QK_K, 32, 4, "min", 6),
    BlockType("Q5_K", QK_K, 32, 5, "min", 6),
    BlockType("Q3_K", QK_K, 16, 3, "sym", 6),
    BlockType("Q2_K", QK_K, 16, 2, "min", 4),
)}

# llama.cpp's tensor_type_fallback (src/llama-quant.cpp): the type a tensor gets when its row length
# is not a multiple of the requested type's block; F16 when the fallback's block does not divide either.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
            "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
            "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL"}


def block_type(name: str) -> BlockType:
    if name not in TYPES:
        raise InputError(f"unknown GGUF block type {name!r}; lmpress writes {', '.join(TYPES)}")
    return TYPES[name]


def row_bytes(gtype: str, cols: int) -> int:
    """Bytes of one row of ``cols`` weights stored as ggml type ``gtype`` (a block type, F16 or F32; its
    block must divide ``cols``)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[gtype]]
    return cols // block * size


def fallback_type(name: str, cols: int) -> str:
    """The type llama.cpp's quantizer stores a tensor of row length ``cols`` in when ``name`` was asked:
    ``name`` itself if its block divides ``cols``, else its fallback, else ``F16``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    def fits(t: str) -> bool:
        return cols % GGML_QUANT_SIZES[GGMLQuantizationType[t]][0] == 0

    if fits(name):
        return name
    if name in FALLBACK:
        return FALLBACK[name] if fits(FALLBACK[name]) else "F16"
    return "F16"


@dataclass(frozen=True)
class BlockQuant:
    """A weight on a ggml grid. ``q`` (out, in) uint8 codes; ``d`` (out, B) fp16-exact block scales
    (B blocks per row); ``m`` (out, B): the fp16 min of ``Q4_1``/``Q5_1`` or ``dmin`` of K types with
    mins; ``sc``, ``mn`` (out, B, n_sub): a K type's integer sub-block scales and mins (``sc`` signed
    for the symmetric Q3_K and Q6_K)."""

    gtype: str
    q: Tensor
    d: Tensor
    m: Tensor | None = None
    sc: Tensor | None = None
    mn: Tensor | None = None

    @property
    def type(self) -> BlockType:
        return TYPES[self.gtype]

    def scale_offset(self) -> tuple[Tensor, Tensor | None]:
        """``S`` and ``M`` (out, B, n_sub, 1) in float32, computed as ggml computes them."""
        if self.sc is None:
            return self.d[..., None, None], None if self.m is None else self.m[..., None, None]
        S = self.d[..., None] * self.sc.float()
        M = None if self.mn is None else -(self.m[..., None] * self.mn.float())
        return S[..., None], None if M is None else M[..., None]


def split_rows(bq: BlockQuant, rows: list[int]) -> list[BlockQuant]:
    """``bq`` cut into consecutive row ranges (layers solved together, stacked)."""
    fields = {k: getattr(bq, k) for k in ("q", "d", "m", "sc", "mn") if getattr(bq, k) is not None}
    parts = {k: v.split(rows) for k, v in fields.items()}
    return [BlockQuant(bq.gtype, **{k: v[i] for k, v in parts.items()}) for i in range(len(rows))]


def _blocks(w: Tensor, t: BlockType) -> Tensor:
    """(out, in) -> (out, B, n_sub, sub), with a clear error when the row length does not fit."""
    out, cols = w.shape
    if cols % t.block:
        raise InputError(f"{t.name} needs rows of a multiple of {t.block} weights, this one has {cols}; "
                         f"llama.cpp stores such a tensor as {fallback_type(t.name, cols)}")
    return w.float().reshape(out, cols // t.block, t.n_sub, t.sub)


def levels(t: BlockType) -> Tensor:
    """The value of each code, ``level(q)`` for q = 0..maxq (float32)."""
    if t.kind == "nl":
        return torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32)
    q = torch.arange(t.maxq + 1, dtype=torch.float32)
    return q - 2 ** (t.bits - 1) if t.kind == "sym" else q


def _signed_absmax(x: Tensor) -> Tensor:
    """The entry of largest magnitude along the last axis, with its sign."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


def _inverse(s: Tensor) -> Tensor:
    return torch.where(s == 0, torch.zeros_like(s), 1 / s)


def nearest_codes(w: Tensor, bq: BlockQuant) -> Tensor:
    """Codes (out, in) uint8 of ``w`` on the grid of ``bq`` (its scales and offsets kept), as ggml
    rounds: ``x / S + 2^(bits-1)`` rounded half up for the symmetric legacy types, half away from
    zero for Q8_0, to the nearest level for IQ4_NL, half to even for K types."""
    t = bq.type
    x = _blocks(w, t)  # (out, B, n_sub, sub)
    S, M = bq.scale_offset()
    zero = 2 ** (t.bits - 1) if t.kind == "sym" else 0
    x = x if M is None else x - M
    if t.kind == "nl":
        q = (x * _inverse(S))[..., None].sub(levels(t)).abs().argmin(-1)
    elif t.k_type:
        q = torch.where(S == 0, 0.0, torch.round(x / torch.where(S == 0, 1.0, S))) + zero
    elif t.name == "Q8_0":
        y = x * _inverse(S)
        a = y.abs()
        q = torch.sign(y) * (a.floor() + (2 * (a - a.floor())).floor()) + zero  # ggml's roundf
    else:
        q = torch.trunc(x * _inverse(S) + (zero + 0.5))
    return q.clamp(0, t.maxq).to(torch.uint8).reshape(w.shape)


def dequantize(bq: BlockQuant) -> Tensor:
    """``S * level(q) + M`` (out, in) float32: exactly what ``gguf.quants.dequantize`` reads from
    :func:`encode`'s bytes."""
    t = bq.type
    out, cols = bq.q.shape
    lv = levels(t)[bq.q.long()].reshape(out, cols // t.block, t.n_sub, t.sub)
    S, M = bq.scale_offset()
    y = S * lv
    return (y if M is None else y + M).reshape(out, cols)


def _legacy_params(x: Tensor, t: BlockType) -> tuple[Tensor, Tensor | None]:
    """Float32 ``d`` and min (out, B) of a legacy type's blocks ``x`` (out, B, 32), as ggml's
    reference quantizer computes them: the weight of largest magnitude lands on the lowest level
    (``-2^(bits-1)``, or IQ4_NL's -127), Q8_0 is symmetric in ``max|w| / 127``, the min types span
    [min, max]."""
    x = x.squeeze(2)  # (out, B, 32)
    if t.name == "Q8_0":
        return x.abs().amax(-1) / 127, None
    if t.kind == "sym":
        return _signed_absmax(x) / -(2 ** (t.bits - 1)), None
    if t.kind == "nl":
        return _signed_absmax(x) / IQ4_NL_LEVELS[0], None
    lo, hi = x.amin(-1), x.amax(-1)
    return (hi - lo) / t.maxq, lo


def _k_params(x: Tensor, t: BlockType) -> dict[str, Tensor]:
    """A K type's parameters for super-blocks ``x`` (out, B, n_sub, sub): each sub-block's float
    scale (and min) by round-to-nearest, then the fp16 super-block ``d`` (``dmin``) that maps the
    largest onto the top integer, then the integer ``sc`` (``mn``) rounded against the fp16 value."""
    if t.kind == "sym":
        s = _signed_absmax(x) / -(2 ** (t.bits - 1))  # (out, B, n_sub): extreme weight -> lowest level
        top = 2 ** (t.scale_bits - 1)  # signed scales in [-top, top - 1]
        d = fp16_round(_signed_absmax(s) / -top)  # (out, B): the largest scale -> -top
        sc = torch.round(s * _inverse(d)[..., None]).clamp(-top, top - 1)
        return {"d": d, "sc": sc.to(torch.int8)}
    lo = x.amin(-1).clamp(max=0)  # (out, B, n_sub): the grid holds 0, as llama.cpp's K types do
    hi = x.amax(-1).clamp(min=0)
    s, mins = (hi - lo) / t.maxq, -lo
    top = 2**t.scale_bits - 1
    d, dmin = fp16_round(s.amax(-1) / top), fp16_round(mins.amax(-1) / top)  # (out, B)
    sc = torch.round(s * _inverse(d)[..., None]).clamp(0, top)
    mn = torch.round(mins * _inverse(dmin)[..., None]).clamp(0, top)
    return {"d": d, "m": dmin, "sc": sc.to(torch.uint8), "mn": mn.to(torch.uint8)}


def quantize(w: Tensor, gtype: str, *, reference: bool = False) -> BlockQuant:
    """``w`` (out, in) on the grid of ``gtype`` by round-to-nearest.

    The block parameters are rounded to their stored precision first and the codes are the nearest
    points of that grid. ``reference=True`` (legacy types only) chooses the codes from the float32
    scale and min instead, as ggml's reference quantizer (and ``gguf.quants.quantize``) does, so
    :func:`encode` gives their bytes bit for bit.
    """
    t = block_type(gtype)
    x = _blocks(w, t)
    if t.k_type:
        if reference:
            raise InputError(f"reference=True reproduces ggml's legacy quantizers; {gtype} has none to match")
        p = _k_params(x, t)
        return BlockQuant(gtype, nearest_codes(w, BlockQuant(gtype, w, **p)), **p)
    d, lo = _legacy_params(x, t)
    stored = {"d": fp16_round(d), "m": None if lo is None else fp16_round(lo)}
    grid = {"d": d, "m": lo} if reference else stored
    return BlockQuant(gtype, nearest_codes(w, BlockQuant(gtype, w, **grid)), **stored)


# ---- importance-weighted parameter search (the scales a solver keeps) ----
#
# llama.cpp's quantizers with an importance matrix (ggml-quants.c: make_qx_quants, make_qkx3_quants,
# make_qp_quants, the IQ4_NL search) try a few scales per block, refit each by weighted least squares
# on the codes it gives, and keep the best by the weighted error. :func:`fit` does the same search,
# vectorised over all blocks, but every candidate is rounded to its stored precision (fp16 ``d``,
# ``m``; integer sub-block scales and mins) before its codes and its error are computed, so the error
# compared is that of the grid the file will hold.

SEARCH = tuple(i / 20 for i in range(-18, 19, 3))  # shifts of the extreme weight's level (llama.cpp: 0.1 * is, |is| <= 9)


def _nearest_index(y: Tensor, t: BlockType) -> Tensor:
    """The code (int64) of the level of ``t`` nearest to each ``y`` (in level units)."""
    low = int(levels(t)[0])
    if t.kind != "nl":
        return torch.round(y).clamp_(low, low + t.maxq).sub_(low).long()
    return _NL_CODE[_nl_cell(y)]


def _nl_cell(y: Tensor) -> Tensor:
    """IQ4_NL's levels are integers, so the midpoints between them are multiples of 1/2: the nearest
    level is constant on each half-unit cell [k/2, (k+1)/2), looked up in a table."""
    lo, hi = IQ4_NL_LEVELS[0], IQ4_NL_LEVELS[-1]
    return y.clamp(lo, hi).sub_(lo).mul_(2).floor_().long()


_NL_CODE = torch.tensor([min(range(16), key=lambda i: (abs(IQ4_NL_LEVELS[i] - (IQ4_NL_LEVELS[0] + k / 2 + 0.25)), i))
                         for k in range(2 * (IQ4_NL_LEVELS[-1] - IQ4_NL_LEVELS[0]) + 1)])
_NL_VALUE = torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32)[_NL_CODE]


def _nearest_level(y: Tensor, t: BlockType) -> Tensor:
    """The value of the level of ``t`` nearest to each ``y`` (level units), float32."""
    if t.kind != "nl":
        low = -(2 ** (t.bits - 1)) if t.kind == "sym" else 0
        return torch.round(y).clamp_(low, low + t.maxq)
    return _NL_VALUE[_nl_cell(y)]


def _level_values(x: Tensor, S: Tensor, M: Tensor | None, t: BlockType) -> Tensor:
    """Nearest levels of ``x`` with sub-block scale ``S`` and offset ``M`` (broadcast); 0 where S = 0."""
    y = (x if M is None else x - M) / torch.where(S == 0, 1.0, S)
    return _nearest_level(torch.where(S == 0, 0.0, y), t)


def _werr(x: Tensor, S: Tensor, M: Tensor | None, t: BlockType, wt: Tensor) -> Tensor:
    """Weighted squared error per sub-block (summed over the last axis) of ``x`` on that grid."""
    v = S * _level_values(x, S, M, t)
    return (wt * (x - (v if M is None else v + M)) ** 2).sum(-1)


def _keep(best: list, err: Tensor, *params: Tensor) -> None:
    """Keep, per entry, the candidate ``params`` with the lowest ``err`` (best = [err, *params])."""
    if not best:
        best.extend([err, *params])
        return
    better = err < best[0]
    for i, v in enumerate((err, *params)):
        best[i] = torch.where(better.reshape(better.shape + (1,) * (v.dim() - better.dim())), v, best[i])


def _fit_scale(x: Tensor, wt: Tensor, t: BlockType, stored: bool) -> tuple[Tensor, Tensor]:
    """A symmetric (or IQ4_NL) sub-block scale per row of ``x`` (..., n): the extreme weight put near
    the lowest level, refit by weighted least squares, (fp16 when ``stored``); returns (S, err)."""
    lv = levels(t)
    mx = _signed_absmax(x)[..., None]  # (..., 1)
    rnd = fp16_round if stored else (lambda v: v)
    best: list = []
    for shift in SEARCH:
        s0 = mx / (lv[0] + shift)
        l = _level_values(x, s0, None, t)
        s_ls = (wt * x * l).sum(-1, keepdim=True) / (wt * l * l).sum(-1, keepdim=True).clamp_min(1e-30)
        for s in ((s0, s_ls) if shift == 0 else (s_ls,)):  # round-to-nearest's own scale is among them
            s = rnd(torch.where(torch.isfinite(s), s, s0))
            _keep(best, _werr(x, s, None, t, wt), s)
    return best[1], best[0]


def _fit_scale_min(x: Tensor, wt: Tensor, t: BlockType, stored: bool, zero_in: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Scale and offset per row of ``x`` (..., n) for ``x = S q + M`` (q = 0..maxq): ranges shrunk
    and shifted, each refit by weighted least squares on its codes; ``zero_in`` keeps M <= 0 (the K
    types store ``-dmin * mn``). Returns (S, M, err)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if zero_in:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    rnd = fp16_round if stored else (lambda v: v)
    best: list = []
    for shift in SEARCH:
        s0 = ((hi - lo) / (t.maxq + shift)).clamp_min(FP16_TINY)
        q = _level_values(x, s0, lo, t)
        sw, sq, sx = wt.sum(-1, keepdim=True), (wt * q).sum(-1, keepdim=True), (wt * x).sum(-1, keepdim=True)
        sqq, sqx = (wt * q * q).sum(-1, keepdim=True), (wt * q * x).sum(-1, keepdim=True)
        det = sw * sqq - sq * sq
        s = (sw * sqx - sq * sx) / det
        m = (sqq * sx - sq * sqx) / det
        if zero_in:  # the best scale with the offset held at 0
            s = torch.where(m > 0, sqx / sqq.clamp_min(1e-30), s)
            m = m.clamp(max=0)
        ok = torch.isfinite(s) & torch.isfinite(m) & (s > 0)
        cands = ((s0, lo),) if shift == 0 else ()
        for S, M in cands + ((torch.where(ok, s, s0), torch.where(ok, m, lo)),):
            S, M = rnd(S), rnd(M)
            _keep(best, _werr(x, S, M, t, wt), S, M)
    return best[1], best[2], best[0]


def _int_scales(v: Tensor, d: Tensor, lo: int, hi: int) -> Tensor:
    return torch.round(v * _inverse(d)[..., None]).clamp(lo, hi)


def _fit_super(x: Tensor, wt: Tensor, t: BlockType, S: Tensor, M: Tensor | None) -> dict[str, Tensor]:
    """A K type's fp16 ``d`` (and ``dmin``) and integer sub-block scales (mins) for super-blocks ``x``
    (..., n_sub, sub) whose float sub-block scales ``S`` (and offsets ``M``) (..., n_sub) were fit:
    candidate ``d`` put the largest scale on or just below the top integer, each rounded to fp16, and
    the one with the least weighted error of the whole super-block, codes recomputed, is kept."""
    sym = t.kind == "sym"
    top = 2 ** (t.scale_bits - 1) if sym else 2**t.scale_bits - 1
    lo, hi = (-top, top - 1) if sym else (0, top)
    ext = _signed_absmax(S) / -top if sym else S.amax(-1) / top  # (...,)
    mins = None if M is None else -M  # (..., n_sub) >= 0
    dmin = None if M is None else fp16_round(mins.amax(-1) / top)
    mn = None if M is None else _int_scales(mins, dmin, 0, top)

    def err(d, sc, dm, m):
        Sq = (d[..., None] * sc)[..., None]
        Mq = None if m is None else -(dm[..., None] * m)[..., None]
        return _werr(x, Sq, Mq, t, wt).sum(-1)

    best: list = []
    for shift in (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0):
        d = fp16_round(ext * top / (top - shift)) if top > shift else ext
        sc = _int_scales(S, d, lo, hi)
        _keep(best, err(d, sc, dmin, mn), d, sc)
    d, sc = best[1], best[2]
    out = {"d": d, "sc": sc.to(torch.int8 if sym else torch.uint8)}
    if M is not None:
        best = []
        for shift in (0.0, 0.5, 1.0, 2.0, 4.0):
            dm = fp16_round(mins.amax(-1) / (top - shift))
            m = _int_scales(mins, dm, 0, top)
            _keep(best, err(d, sc, dm, m), dm, m)
        out.update(m=best[1], mn=best[2].to(torch.uint8))
    return out


def fit_params(w: Tensor, gtype: str, importance: Tensor | None = None) -> dict[str, Tensor]:
    """Block parameters of ``w`` (out, in) on ``gtype``, stored precision, from the importance-weighted
    search (``importance``: (in,) or (out, in) non-negative weights, e.g. diag(H); None: uniform)."""
    t = block_type(gtype)
    x = _blocks(w, t)  # (out, B, n_sub, sub)
    wt = torch.ones_like(x) if importance is None else importance.float().expand(w.shape).reshape(x.shape)
    wt = wt + 1e-12 * wt.mean()  # a block with no importance at all still gets a finite fit
    if not t.k_type:
        if t.kind == "min":
            S, M, _ = _fit_scale_min(x, wt, t, stored=True, zero_in=False)
            return {"d": S[..., 0, 0], "m": M[..., 0, 0]}
        S, _ = _fit_scale(x, wt, t, stored=True)
        return {"d": S[..., 0, 0]}
    if t.kind == "min":
        S, M, _ = _fit_scale_min(x, wt, t, stored=False, zero_in=True)
        return _fit_super(x, wt, t, S[..., 0], M[..., 0])
    S, _ = _fit_scale(x, wt, t, stored=False)
    return _fit_super(x, wt, t, S[..., 0], None)


def column_scale_offset(gtype: str, params: dict[str, Tensor], cols: int) -> tuple[Tensor, Tensor]:
    """Each column's ``S`` and ``M`` (out, cols) float32 (M zero for types without an offset), from
    block parameters as :func:`fit_params` returns them, computed as :func:`dequantize` computes them."""
    t = block_type(gtype)
    d = params["d"]
    S, M = BlockQuant(gtype, d, **params).scale_offset()  # (out, B, n_sub, 1)
    shape = (*S.shape[:3], t.sub)
    return S.expand(shape).reshape(-1, cols), torch.zeros(d.shape[0], cols) if M is None else M.expand(shape).reshape(-1, cols)


def nearest_index(y: Tensor, gtype: str) -> Tensor:
    """The code (int64) of the level of ``gtype`` nearest to each ``y`` (level units)."""
    return _nearest_index(y, block_type(gtype))


def fit(w: Tensor, gtype: str, importance: Tensor | None = None) -> BlockQuant:
    """``w`` on ``gtype`` with the parameters of :func:`fit_params` and the nearest codes."""
    p = fit_params(w, gtype, importance)
    return BlockQuant(gtype, nearest_codes(w, BlockQuant(gtype, w, **p)), **p)


def _objective(M: Tensor, rhs: Tensor, x: Tensor) -> Tensor:
    """``x^T M x - 2 rhs^T x`` per row: the output error up to a constant."""
    return (x[:, None, :] @ M @ x[:, :, None])[:, 0, 0] - 2 * (rhs * x).sum(-1)


def refit_scales(bq: BlockQuant, w: Tensor, H: Tensor, *, chunk: int = 64) -> BlockQuant:
    """The codes of ``bq`` kept, each (super-)block's ``d`` (and ``m`` / ``dmin``) solved again by least
    squares in the layer's output error ``tr((w - ŵ) H (w - ŵ)^T)`` (``H`` (in, in): the Hessian X X^T).

    ``ŵ`` is linear in them: ``d * level(q) * sc`` plus ``m`` (Q4_1, Q5_1) or ``-dmin * mn`` (K types
    with mins), the integer sub-block scales ``sc``/``mn`` fixed. Per row that is a (P*B, P*B) system
    (B blocks, P = 1 or 2 parameters each), solved exactly with a tiny ridge towards the old values, then
    rounded to fp16; a row keeps its old parameters where the rounded solution is not better.
    """
    t = bq.type
    out, cols = bq.q.shape
    B, n = cols // t.block, t.block
    lv = levels(t)[bq.q.long()].reshape(out, B, t.n_sub, t.sub)
    bases = [(lv if bq.sc is None else lv * bq.sc.float()[..., None]).reshape(out, B, n)]
    if bq.m is not None:
        bases.append((torch.ones_like(lv) if bq.mn is None else -bq.mn.float()[..., None].expand_as(lv)).reshape(out, B, n))
    H = H.float()
    Hb = H.reshape(B, n, B, n)
    HW = (w.float() @ H).reshape(out, B, n)
    x_all = torch.cat([bq.d] + ([bq.m] if bq.m is not None else []), 1).float()
    eye = torch.eye(x_all.shape[1])
    for r0 in range(0, out, chunk):
        r = slice(r0, min(out, r0 + chunk))
        Ls = [L[r] for L in bases]
        Gs = [torch.einsum("bick,rck->rbic", Hb, L) for L in Ls]  # (R, B, n, B): H times each basis
        M = torch.cat([torch.cat([torch.einsum("rbi,rbic->rbc", La, G) for G in Gs], 2) for La in Ls], 1)
        rhs = torch.cat([(La * HW[r]).sum(-1) for La in Ls], 1)
        x0 = x_all[r]
        mu = 1e-6 * M.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True).clamp_min(1e-30)
        x = fp16_round(torch.linalg.solve(M + mu[..., None] * eye, rhs + mu * x0))
        better = torch.isfinite(x).all(-1) & (_objective(M, rhs, x) < _objective(M, rhs, x0))
        x_all[r] = torch.where(better[:, None], x, x0)
    d, m = x_all[:, :B].contiguous(), (x_all[:, B:].contiguous() if bq.m is not None else None)
    return BlockQuant(bq.gtype, bq.q, d, m, bq.sc, bq.mn)


# ---- the fp16 block parameters inside the bytes ----
# byte offsets, inside one block, of the fp16 scale ``d`` and of the fp16 minimum ``m`` (Q4_1, Q5_1) or
# super-block ``dmin`` (K types with minima), as ggml-common.h lays the blocks out
FP16_FIELDS: dict[str, tuple[int, int | None]] = {
    "Q8_0": (0, None), "Q4_0": (0, None), "Q4_1": (0, 2), "Q5_0": (0, None), "Q5_1": (0, 2), "IQ4_NL": (0, None),
    "Q6_K": (208, None), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q3_K": (108, None), "Q2_K": (80, 82),
}


def _blocks_of(raw: Tensor, gtype: str) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = GGML_QUANT_SIZES[GGMLQuantizationType[gtype]][1]
    return raw.cpu().numpy().reshape(raw.shape[0], -1, size)  # (out, B, type_size)


def fp16_fields(raw: Tensor, gtype: str) -> tuple[Tensor, Tensor | None]:
    """The fp16 ``d`` and ``m`` / ``dmin`` (None for types without) of every (super-)block of the ggml
    bytes ``raw`` (out, row bytes), float32 (out, B)."""
    blocks = _blocks_of(raw, gtype)
    get = lambda o: torch.from_numpy(np.ascontiguousarray(blocks[..., o : o + 2]).view(np.float16)[..., 0].astype(np.float32))  # noqa: E731
    d_at, m_at = FP16_FIELDS[gtype]
    return get(d_at), (get(m_at) if m_at is not None else None)


def with_fp16_fields(raw: Tensor, gtype: str, d: Tensor, m: Tensor | None = None) -> Tensor:
    """A copy of ``raw`` with every (super-)block's ``d`` (and ``m`` / ``dmin``) replaced (rounded to fp16);
    the codes and integer sub-block scales are kept."""
    blocks = _blocks_of(raw, gtype).copy()
    d_at, m_at = FP16_FIELDS[gtype]
    for at, v in ((d_at, d), (m_at, m)):
        if v is not None:
            blocks[..., at : at + 2] = v.detach().cpu().numpy().astype(np.float16)[..., None].view(np.uint8)
    return torch.from_numpy(blocks.reshape(raw.shape[0], -1))


def fp16_bases(raw: Tensor, gtype: str, shape: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """``(A, B)`` (out, in) with ``W = d * A + m * B`` (each block's fields broadcast over its weights)
    for the weight ``W`` llama.cpp reads from ``raw``: the weight with ``d = 1, m = 0`` and with
    ``d = 0, m = 1``. ``W`` is linear in the fp16 fields, so training them keeps the codes."""
    from .qlinear import _ggml_values

    d, m = fp16_fields(raw, gtype)
    A = _ggml_values(with_fp16_fields(raw, gtype, torch.ones_like(d), None if m is None else torch.zeros_like(m)), gtype, shape)
    if m is None:
        return A, None
    return A, _ggml_values(with_fp16_fields(raw, gtype, torch.zeros_like(d), torch.ones_like(m)), gtype, shape)


# ---- bytes (layouts of ggml-common.h) ----

def _pack(q: np.ndarray, H: int, S: int, W: int, bits: int) -> np.ndarray:
    """Pack fields ``q`` (..., H*S*W) of ``bits`` bits into bytes (..., H*W): field ``h*S*W + s*W + w``
    goes to byte ``h*W + w`` at bit ``bits*s``, the interleaving ggml uses for every packed array."""
    f = q.astype(np.uint8).reshape(*q.shape[:-1], H, S, W)
    shift = (bits * np.arange(S, dtype=np.uint8)).reshape(S, 1)
    return np.bitwise_or.reduce(f << shift, axis=-2).reshape(*q.shape[:-1], H * W)


def _fp16(x: Tensor) -> np.ndarray:
    """(..., ) float32 (fp16-exact) -> (..., 2) little-endian fp16 bytes."""
    return x.numpy().astype("<f2")[..., None].view(np.uint8)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: 8 six-bit scales and mins (..., 8) -> 12 bytes: bytes 0-3 and 4-7 hold the low
    6 bits of scales and mins 0-3 plus the top 2 bits of 4-7; bytes 8-11 their low nibbles."""
    lo = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    mid = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return np.concatenate([lo, mid, hi], axis=-1)


def _legacy_bytes(t: BlockType, q: np.ndarray, bq: BlockQuant) -> list[np.ndarray]:
    """Parts of a legacy block, q (out, B, 32): ``d [m] [qh] qs``."""
    parts = [_fp16(bq.d)]
    if bq.m is not None:
        parts.append(_fp16(bq.m))
    if t.name == "Q8_0":
        return parts + [q ^ np.uint8(0x80)]  # int8 level = q - 128, as two's complement bytes
    if t.bits == 5:
        parts.append(_pack(q >> 4, 4, 8, 1, 1))  # qh: bit i of a little-endian uint32 = bit 4 of q[i]
    return parts + [_pack(q & 15, 1, 2, 16, 4)]  # qs: byte j = q[j] | q[j + 16] << 4


def _k_bytes(t: BlockType, q: np.ndarray, bq: BlockQuant) -> list[np.ndarray]:
    """Parts of a K super-block, q (out, B, 256), in ggml-common.h's order."""
    sc = bq.sc.numpy()
    d = _fp16(bq.d)
    if t.name == "Q6_K":
        return [_pack(q & 15, 2, 2, 64, 4), _pack(q >> 4, 2, 4, 32, 2), sc.view(np.uint8), d]
    if t.name == "Q3_K":
        v = (sc.astype(np.int16) + 32).astype(np.uint8)  # stored 6-bit scale = sc + 32
        scales = np.concatenate([_pack(v & 15, 1, 2, 8, 4), _pack(v >> 4, 1, 4, 4, 2)], axis=-1)
        return [_pack((q >> 2) & 1, 1, 8, 32, 1), _pack(q & 3, 2, 4, 32, 2), scales, d]
    mn, dmin = bq.mn.numpy(), _fp16(bq.m)
    if t.name == "Q2_K":
        return [sc | (mn << 4), _pack(q, 2, 4, 32, 2), d, dmin]
    parts = [d, dmin, _k_scales(sc, mn)]
    if t.name == "Q5_K":
        parts.append(_pack(q >> 4, 1, 8, 32, 1))
    return parts + [_pack(q & 15, 4, 2, 32, 4)]


def encode(bq: BlockQuant) -> np.ndarray:
    """The raw bytes of ``bq``: uint8 (out, B * type_size), the row layout of a ggml tensor."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    t = bq.type
    out, cols = bq.q.shape
    q = bq.q.numpy().reshape(out, cols // t.block, t.block)  # (out, B, block)
    parts = (_k_bytes if t.k_type else _legacy_bytes)(t, q, bq)
    raw = np.concatenate(parts, axis=-1)  # (out, B, type_size)
    assert raw.shape[-1] == GGML_QUANT_SIZES[GGMLQuantizationType[t.name]][1], (t.name, raw.shape)
    return raw.reshape(out, -1)
