"""The column sweep shared by GPTQ and SparseGPT (optimal-brain-surgeon updates, row by row).

Within one lazy block of columns, each column in turn is replaced (rounded to the grid, zeroed
where the keep mask says so, or both: SparseGPT's joint mode) and its error, scaled by the inverse
Hessian's upper Cholesky factor ``U1`` (:func:`lmpress.stats.damped_cholesky`), is spread over
the block's later columns::

    v = keep * ((clamp(round(w / s) + z, 0, maxq) - z) * s)     # or keep * w without a grid
    err = (w - v) / U1[i, i];   W1[:, j] -= err * U1[i, j]  for j > i

Rows are independent, so the C++ kernel (``lmpress/csrc/gptq_block.cpp``, built on first use) walks
each row's block in cache; :func:`sweep_reference` is the same arithmetic in torch, used when the
kernel cannot be built or ``LMPRESS_NO_KERNEL`` is set, and as the tests' reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

NONE = torch.empty(0)  # "no mask" / "no grid"


def sweep_columns(W1: Tensor, U1: Tensor, K1: Tensor, S1: Tensor, Z1: Tensor, Q1: Tensor, E1: Tensor,
                  c0: int, c1: int, maxq: float, kernel: bool = True) -> None:
    """Sweep block columns ``c0..c1-1`` in place. W1, K1, S1, Z1, Q1, E1: (rows, b) float32
    (K1 empty: keep all; maxq 0: no grid, S1/Z1 unused); U1 (b, b). Q1 gets the codes (with a grid)
    or the new values, E1 the scaled errors."""
    from .quant.kernels import gptq_extension

    ext = gptq_extension() if kernel else None
    if ext is not None:
        ext.sweep_columns(W1, U1, K1, S1, Z1, Q1, E1, c0, c1, float(maxq))
    else:
        sweep_reference(W1, U1, K1, S1, Z1, Q1, E1, c0, c1, maxq)


def sweep_reference(W1, U1, K1, S1, Z1, Q1, E1, c0, c1, maxq) -> None:
    d = torch.diag(U1).tolist()
    for i in range(c0, c1):
        w = W1[:, i]
        if maxq > 0:
            q = torch.round(w / S1[:, i]).add_(Z1[:, i]).clamp_(0, maxq)
            v = (q - Z1[:, i]) * S1[:, i]
        else:
            q = v = w
        if K1.numel():
            keep = K1[:, i] != 0
            v = torch.where(keep, v, 0.0)
            q = torch.where(keep, q, Z1[:, i] if maxq > 0 else 0.0)
        Q1[:, i] = q
        err = (w - v).div_(d[i])
        W1[:, i + 1 :].addr_(err, U1[i, i + 1 :], alpha=-1.0)
        E1[:, i] = err


def sweep_levels(W1: Tensor, U1: Tensor, S1: Tensor, M1: Tensor, Q1: Tensor, E1: Tensor, c0: int, c1: int,
                 nearest, lv: Tensor) -> None:
    """The sweep of :func:`sweep_columns` on a grid of any levels (llama.cpp's block types): each
    weight becomes ``S * lv[q] + M`` with ``q = nearest((w - M) / S)`` the code of the nearest level
    (``nearest``: level units -> int64 codes); S1, M1 (rows, b) each column's sub-block scale and
    offset (where S is 0 the value is M). Q1 gets the codes. Torch only: no kernel for these grids."""
    d = torch.diag(U1).tolist()
    for i in range(c0, c1):
        w, s, m = W1[:, i], S1[:, i], M1[:, i]
        q = nearest(torch.where(s == 0, 0.0, (w - m) / torch.where(s == 0, 1.0, s)))
        Q1[:, i] = q
        err = (w - (s * lv[q] + m)).div_(d[i])
        W1[:, i + 1 :].addr_(err, U1[i, i + 1 :], alpha=-1.0)
        E1[:, i] = err
