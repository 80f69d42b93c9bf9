"""Importance scores and pruning masks: pure functions, tensors in, tensors out.

A mask is a bool tensor shaped like the weight, ``True`` where the weight is *kept*. Weights are
(out_features, in_features), rows are output channels.

* Magnitude: ``S = |W|``.
* Wanda (Sun et al., arXiv 2306.11695): ``S_ij = |W_ij| * ||X_j||_2``, compared within each output
  row; ``X_j`` is input feature ``j`` over all calibration tokens.
* N:M (Mishra et al., arXiv 2104.08378): at most ``N`` nonzeros in every ``M`` consecutive inputs of
  a row ("2:4" keeps 2 of every 4).
* OWL (Yin et al., arXiv 2310.05065): layers with more outlier scores keep more weights. The layer
  outlier ratio ``D_l`` is the share of Wanda scores above ``M`` times their mean; densities are
  ``D_l`` rescaled to a spread of ``2 * lambda`` and shifted to average ``1 - sparsity``.

Example::

    keep = topk_mask(wanda_scores(W, x_norm), 0.5, scope="row")   # (out, in) bool
    W = W * keep
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError

SCOPES = ("row", "layer")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"2:4" -> (2, 4)``: keep N of every M; ``None`` for unstructured."""
    if pattern is None:
        return None
    parts = str(pattern).split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"pattern {pattern!r} is not N:M (two integers, e.g. '2:4')") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: N:M needs 0 < N < M (N weights kept of every M), e.g. '2:4'")
    return n, m


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity {sparsity!r} must lie in [0, 1), the fraction of weights set to zero, e.g. 0.5")


def magnitude_scores(W: Tensor) -> Tensor:
    """|W|. (out, in) -> (out, in)"""
    return W.abs()


def wanda_scores(W: Tensor, x_norm: Tensor) -> Tensor:
    """|W_ij| * ||X_j||_2 (Wanda). W: (out, in), x_norm: (in,) -> (out, in)"""
    return W.abs() * x_norm.to(W.dtype)[None, :]


def prune_count(n: int, sparsity: float) -> int:
    """How many of ``n`` weights a sparsity removes: ``n * sparsity`` rounded to nearest (half up)."""
    return int(n * sparsity + 0.5)


def topk_mask(scores: Tensor, sparsity: float, scope: str = "row") -> Tensor:
    """Drop the lowest-scoring ``sparsity`` share of each row (``scope="row"``) or of the whole
    matrix (``"layer"``); exactly ``prune_count`` per row / per matrix. (out, in) -> bool (out, in)
    """
    check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r} must be one of {SCOPES}")
    flat = scores if scope == "row" else scores.reshape(1, -1)  # (rows, cols)
    k = prune_count(flat.shape[1], sparsity)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        drop = torch.topk(flat, k, dim=1, largest=False).indices  # (rows, k)
        keep.scatter_(1, drop, False)
    return keep.reshape(scores.shape)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest scores in every ``m`` consecutive columns of each row.
    (out, in) -> bool (out, in); ``in`` must be a multiple of ``m``.
    """
    rows, cols = scores.shape
    if cols % m:
        raise InputError(f"N:M sparsity with M={m} needs in_features divisible by {m}; this layer has {cols}")
    groups = scores.reshape(rows, cols // m, m)  # (out, in/m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def satisfies_nm(W: Tensor, n: int, m: int) -> bool:
    """True when every block of ``m`` consecutive inputs of every row has at most ``n`` nonzeros."""
    rows, cols = W.shape
    if cols % m:
        return False
    return bool(((W != 0).reshape(rows, cols // m, m).sum(-1) <= n).all())


def outlier_ratio(scores: Tensor, m: float) -> float:
    """Share of scores above ``m`` times their mean (OWL's layer outlier ratio, D_l)."""
    return (scores > m * scores.mean()).float().mean().item()


def relative_output_error(triples) -> float:
    """``sqrt(sum ||y' - y||^2 / sum ||y - x||^2)`` over (x, y, y') batches: how far a changed block's
    output y' moves from the original y, relative to the original block's own update y - x."""
    num = den = 0.0
    for x, y, y2 in triples:
        num += (y2.double() - y.double()).pow(2).sum().item()
        den += (y.double() - x.double()).pow(2).sum().item()
    return (num / den) ** 0.5 if den > 0 else 0.0


def owl_sparsities(ratios: Tensor, sparsity: float, lam: float) -> Tensor:
    """OWL per-layer sparsities from outlier ratios D (L,): densities spread over ``2*lam``,
    proportional to D, averaging ``1 - sparsity``. (L,) -> (L,)
    """
    check_sparsity(sparsity)
    if not 0 <= lam <= min(sparsity, 1 - sparsity):
        raise ValueError(f"OWL lambda {lam} must lie in [0, min(sparsity, 1 - sparsity)] = [0, {min(sparsity, 1 - sparsity):.3g}]")
    d = ratios.double()
    spread = d.max() - d.min()
    density = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)
    density = density - density.mean() + (1 - sparsity)
    return (1 - density).clamp(0, 1 - 1e-6).float()
