"""Low-rank and dense-basis / sparse-coefficient factorizations of one weight matrix (pure functions).

Notation: ``W`` (out, in) is a linear layer's weight, ``X`` (tokens, in) its calibration inputs,
``H = X^T X`` (in, in) their second moment. The output error of an approximation ``W'`` on the
calibration inputs is ``||X (W - W')^T||_F^2 = tr((W - W') H (W - W')^T) = ||(W - W') S||_F^2``
for any ``S`` with ``S S^T = H``.

* Truncated SVD: ``W ≈ U_r Σ_r V_r^T``, optimal for the weight error ``||W - W'||_F``.
* SVD-LLM (Wang et al., arXiv 2403.07378): whiten with the Cholesky factor ``S`` of ``H``, truncate
  the SVD of ``W S`` and map back with ``S^{-1}``. Its truncation is optimal for the *output* error,
  and the output error of dropping ``σ_i(W S)`` is exactly ``σ_i^2`` (SVD-LLM, Theorem 3.2).
* ASVD (Yuan et al., arXiv 2312.05821): the same with a diagonal ``S = diag(mean|x_j|^α)``.

For every invertible right scaling ``S`` the truncation has a form that needs no inverse:
``U_r Σ_r V_r^T S^{-1} = U_r U_r^T (W S) S^{-1} = U_r U_r^T W`` where ``U_r`` are the top-``r`` left
singular vectors of ``W S``. :func:`truncate` returns the factors ``(U_r, U_r^T W)`` (rescaled to
balanced row norms), which is numerically safe even when ``H`` is badly conditioned.

* DSFormer (Chand et al., arXiv 2312.13211): ``W ≈ C B`` with a dense basis ``B`` (k, in) and sparse
  coefficients ``C`` (out, k) holding ``s`` nonzeros per row, fitted by alternating optimization
  (:func:`dense_sparse_factorize`) in the output-error metric when ``H`` is given.

Example::

    U, V = truncate(W, cholesky_whitening(H), r)        # SVD-LLM factors, W ≈ U @ V
    fit = dense_sparse_factorize(W, k=256, s=64, H=H)   # W ≈ fit.dense_coefficients() @ fit.basis
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..stats import damped_cholesky

# ---- whitening and truncation ----------------------------------------------------------------


def cholesky_whitening(H: Tensor, damp: float = 1e-4) -> Tensor:
    """Lower-triangular ``S`` (in, in) with ``S S^T = H + λ I``, ``λ = damp · mean(diag H)`` (SVD-LLM),
    computed in float64.

    The damping makes a rank-deficient ``H`` (dead input channels, few tokens) positive definite; it
    is raised tenfold until the Cholesky factorization succeeds (:func:`lmpress.stats.damped_cholesky`).
    """
    return damped_cholesky(H.double(), damp, method="SVD-LLM")[0]


def asvd_scaling(mean_abs: Tensor, alpha: float = 0.5) -> Tensor:
    """ASVD's diagonal scaling ``s_j = (mean_t |x_tj|)^α`` (arXiv 2312.05821, Eq. 4), as a vector (in,)."""
    return mean_abs.double().clamp_min(1e-8 * float(mean_abs.abs().max().clamp_min(1e-12))) ** alpha


def _scaled(W: Tensor, S: Tensor | None) -> Tensor:
    """``W S`` for ``S`` None (identity), a vector (diagonal) or a matrix (in, in)."""
    W = W.double()
    if S is None:
        return W
    return W * S.double() if S.dim() == 1 else W @ S.double()


def spectrum(W: Tensor, S: Tensor | None = None) -> Tensor:
    """Singular values of ``W S`` (descending). Their squares are the errors of dropping each one."""
    return torch.linalg.svdvals(_scaled(W, S))


def truncate(W: Tensor, S: Tensor | None, r: int) -> tuple[Tensor, Tensor]:
    """Rank-``r`` factors ``U`` (out, r), ``V`` (r, in) with ``U @ V = U_r U_r^T W``, ``U_r`` the top
    left singular vectors of ``W S``: plain SVD for ``S=None``, ASVD for a vector, SVD-LLM for the
    Cholesky factor. Minimizes ``||(W - U V) S||_F`` over rank-``r`` matrices (Eckart-Young).
    """
    U, V, _ = truncate_with_spectrum(W, S, r)
    return U, V


def truncate_with_spectrum(W: Tensor, S: Tensor | None, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`truncate` plus all singular values of ``W S`` (to report the error of the truncation)."""
    if not 1 <= r <= min(W.shape):
        raise ValueError(f"rank {r} out of range for a {tuple(W.shape)} matrix (1..{min(W.shape)})")
    Uf, sigma, _ = torch.linalg.svd(_scaled(W, S), full_matrices=False)  # (out, m), (m,)
    Ur = Uf[:, :r]  # (out, r)
    V = Ur.T @ W.double()  # (r, in)
    return (*_balance(Ur, V, W.dtype), sigma)


def _balance(U: Tensor, V: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """Rescale so that column i of U and row i of V have equal norms (product unchanged)."""
    g = (V.norm(dim=1) / U.norm(dim=0).clamp_min(1e-30)).clamp_min(1e-30).sqrt()  # (r,)
    return (U * g).to(dtype), (V / g[:, None]).to(dtype)


def output_error(W: Tensor, W_hat: Tensor, H: Tensor | None = None) -> float:
    """``tr((W - Ŵ) H (W - Ŵ)^T)``: squared output error on the calibration inputs (weight error if H is None)."""
    D = (W - W_hat).double()
    return float((D * D).sum()) if H is None else float(((D @ H.double()) * D).sum())


# ---- rank allocation under a global budget -----------------------------------------------------


def dense_rank(out_f: int, in_f: int) -> int:
    """Smallest rank whose factors ``r (out + in)`` hold at least as many parameters as the dense layer."""
    return math.ceil(out_f * in_f / (out_f + in_f))


def allocate_ranks(spectra: list[Tensor], shapes: list[tuple[int, int]], budget: int, how: str = "energy",
                   multiple: int = 1) -> list[int]:
    """Per-layer ranks (multiples of ``multiple``, at least one multiple) whose parameters sum to at
    most ``budget``. A rank ``>= dense_rank(out, in)`` means "keep the layer dense" (``out * in``).

    * ``uniform``: every layer keeps the same fraction ``budget / Σ out·in`` of its parameters.
    * ``energy``: greedy on the spectra: each step buys the ``multiple`` singular values with the
      largest share of their layer's energy ``σ_i^2 / Σ_j σ_j^2`` per parameter they cost, i.e. it
      minimizes the sum of the layers' relative errors (relative output errors for a whitened
      spectrum, where ``σ_i^2`` is the output error of dropping ``σ_i``). Making a layer dense buys
      its whole remaining tail.
    """
    total = sum(o * i for o, i in shapes)
    floor = factored_params([multiple] * len(shapes), shapes)
    if budget > total or budget < floor:
        raise ValueError(f"a budget of {budget:,} parameters is outside {floor:,} (rank {multiple} everywhere) .. {total:,} (all dense)")
    if how == "uniform":
        return [_uniform_rank(o, i, budget / total, multiple) for o, i in shapes]
    if how != "energy":
        raise ValueError(f"unknown allocation {how!r}; use 'uniform' or 'energy'")
    if len(spectra) != len(shapes):
        raise ValueError(f"{len(spectra)} spectra for {len(shapes)} layers")
    return _greedy_energy(spectra, shapes, budget - floor, multiple)


def _uniform_rank(o: int, i: int, keep: float, m: int) -> int:
    rd = dense_rank(o, i)
    if keep >= 1 or m >= rd:
        return rd
    r = int(keep * o * i // (o + i)) // m * m
    return max(m, min(r, (rd - 1) // m * m))


def _greedy_energy(spectra: list[Tensor], shapes: list[tuple[int, int]], extra: int, m: int) -> list[int]:
    """Start from rank ``m`` everywhere and spend ``extra`` parameters greedily (see allocate_ranks)."""
    energy = [(s.double() ** 2) / (s.double() ** 2).sum().clamp_min(1e-30) for s in spectra]
    tails = [e.flip(0).cumsum(0).flip(0).tolist() + [0.0] for e in energy]  # tails[l][r]: energy of σ_r..end
    ranks, spent = [min(m, dense_rank(o, i)) for o, i in shapes], 0

    def step(l):  # (-gain per parameter, layer, cost, new rank) of raising layer l's rank by m
        o, i = shapes[l]
        r, rd = ranks[l], dense_rank(o, i)
        if r >= rd:
            return None
        if r + m >= rd:  # the last step makes the layer dense: gains the whole tail
            cost = o * i - r * (o + i)
            return (-tails[l][r] / max(1, cost), l, cost, rd)
        return (-(tails[l][r] - tails[l][r + m]) / (m * (o + i)), l, m * (o + i), r + m)

    heap = [h for h in (step(l) for l in range(len(shapes))) if h]
    heapq.heapify(heap)
    while heap:
        _, l, cost, new_rank = heapq.heappop(heap)
        if spent + cost > extra:
            continue  # this layer cannot grow further; others (cheaper steps) still may
        ranks[l] = new_rank
        spent += cost
        nxt = step(l)
        if nxt:
            heapq.heappush(heap, nxt)
    return ranks


def factored_params(ranks: list[int], shapes: list[tuple[int, int]]) -> int:
    """Parameters of layers factored at ``ranks`` (dense where the rank reaches ``dense_rank``)."""
    return sum(o * i if r >= dense_rank(o, i) else r * (o + i) for r, (o, i) in zip(ranks, shapes))


# ---- DSFormer: dense basis times sparse coefficients ------------------------------------------


@dataclass
class DenseSparseFit:
    """``W ≈ C B``: ``values``/``indices`` (out, s) hold row o of C's nonzeros at columns ``indices``."""

    basis: Tensor  # B (k, in)
    values: Tensor  # (out, s)
    indices: Tensor  # (out, s) int64, columns of C in 0..k-1
    errors: list[float]  # objective ||(W - C B) S||_F^2 after init and after each iteration

    def dense_coefficients(self) -> Tensor:
        C = torch.zeros(self.values.shape[0], self.basis.shape[0], dtype=self.values.dtype)
        return C.scatter_(1, self.indices, self.values)  # (out, k)


def dense_sparse_factorize(W: Tensor, k: int, s: int, H: Tensor | None = None, iters: int = 10,
                           damp: float = 1e-4, dtype: torch.dtype = torch.float32) -> DenseSparseFit:
    """DSFormer factorization ``W (out, in) ≈ C (out, k; s nonzeros per row) @ B (k, in)``.

    Minimizes ``||(W - C B) S||_F^2`` with ``S S^T = H`` (the output error on the calibration inputs;
    the weight error when ``H`` is None) by alternating (arXiv 2312.13211, Sec. 3, fitted per layer):

    1. init: ``B`` = the top-``k`` whitened SVD factor ``U_k^T W`` (so ``s = k`` is SVD-LLM at rank k);
    2. sparse coding of every row by iterative hard thresholding with a least-squares refit on the
       support (:func:`sparse_code`); a row keeps its old code when the new one is not better;
    3. basis update by least squares, ``(C^T C + λ I) B = C^T W + λ B_old`` (a proximal MOD step:
       for positive-definite ``H`` the weighted and unweighted solutions coincide).

    Every step is non-increasing in the objective, so ``errors`` never goes up.
    """
    (out_f, in_f), out_dtype = W.shape, W.dtype
    if not 1 <= s <= k <= min(out_f, in_f):
        raise ValueError(f"need 1 <= s ({s}) <= k ({k}) <= min(out, in) = {min(out_f, in_f)}")
    H = torch.eye(in_f, dtype=torch.float64) if H is None else _damped(H, damp)
    B = truncate(W, cholesky_whitening(H, 0.0), k)[1].to(dtype)  # (k, in)
    W, H = W.to(dtype), H.to(dtype)
    C = _threshold_init(W, B, H, s)
    errors = [_objective(W, C, B, H)]
    for _ in range(iters):
        B = _basis_update(W, C, B)
        C = sparse_code(W @ H @ B.T, B @ H @ B.T, s, C)
        errors.append(_objective(W, C, B, H))
    values, indices = _to_sparse(C, s)
    return DenseSparseFit(B.to(out_dtype), values.to(out_dtype), indices, errors)


def _damped(H: Tensor, damp: float) -> Tensor:
    H = H.double()
    return H + damp * H.diagonal().mean().clamp_min(1e-12) * torch.eye(H.shape[0], dtype=H.dtype)


def _objective(W: Tensor, C: Tensor, B: Tensor, H: Tensor) -> float:
    D = (W - C @ B).double()  # (out, in)
    return float(((D @ H.double()) * D).sum())


def _threshold_init(W: Tensor, B: Tensor, H: Tensor, s: int) -> Tensor:
    """Codes for an H-orthogonal basis: the exact coefficients, top-s per row by contribution."""
    G = B @ H @ B.T  # (k, k), diagonal for the SVD init
    C = torch.linalg.solve(G + 1e-12 * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype), B @ H @ W.T).T
    return _refit(W @ H @ B.T, G, _top_mask(C, G, s), C)


def _top_mask(C: Tensor, G: Tensor, s: int) -> Tensor:
    """(out, k) bool mask of the s largest contributions |c_j| · ||b_j||_H per row."""
    score = C.abs() * G.diagonal().clamp_min(0).sqrt()
    return torch.zeros_like(C, dtype=torch.bool).scatter_(1, score.topk(s, dim=1).indices, True)


def sparse_code(R: Tensor, G: Tensor, s: int, C_old: Tensor) -> Tensor:
    """s-sparse codes minimizing ``c G c^T - 2 c·r`` per row (``R = W H B^T`` (out, k), ``G = B H B^T``).

    One iterative-hard-thresholding step preconditioned by ``G^{-1}`` (its gradient step from any
    code lands on the unconstrained least-squares code ``R G^{-1}``), keep the ``s`` largest
    contributions, refit on that support; per row, keep the better of this and ``C_old`` refit on
    its own support (so the objective never increases).
    """
    eye = torch.eye(len(G), dtype=G.dtype)
    C_ls = torch.linalg.solve(G + 1e-10 * G.diagonal().mean() * eye, R.T).T  # (out, k)
    C_new = _refit(R, G, _top_mask(C_ls, G, s), C_ls)
    C_kept = _refit(R, G, C_old != 0, C_old)
    better = _row_objective(R, G, C_new) < _row_objective(R, G, C_kept)
    return torch.where(better[:, None], C_new, C_kept)


def _row_objective(R: Tensor, G: Tensor, C: Tensor) -> Tensor:
    """Per row ``c G c^T - 2 c·r`` (the row's error up to a constant)."""
    return ((C @ G) * C).sum(1) - 2 * (C * R).sum(1)


def _refit(R: Tensor, G: Tensor, mask: Tensor, C0: Tensor, iters: int = 10) -> Tensor:
    """Least squares on a fixed support per row: conjugate gradient on ``min c G c^T - 2 c·r``, c ⊂ mask."""
    if bool(mask.all()):  # dense codes: solve the normal equations directly
        return torch.linalg.solve(G, R.T).T
    m = mask.to(R.dtype)
    C = C0 * m
    Rres = (R - C @ G) * m  # residual of the normal equations on the support
    P = Rres.clone()
    rr = (Rres * Rres).sum(1)
    for _ in range(iters):
        GP = (P @ G) * m
        alpha = rr / (P * GP).sum(1).clamp_min(1e-30)
        C = C + alpha[:, None] * P
        Rres = Rres - alpha[:, None] * GP
        rr_new = (Rres * Rres).sum(1)
        if float(rr_new.max()) <= 1e-12 * float(rr.max().clamp_min(1e-30)):
            break
        P = Rres + (rr_new / rr.clamp_min(1e-30))[:, None] * P
        rr = rr_new
    return C


def _basis_update(W: Tensor, C: Tensor, B_old: Tensor) -> Tensor:
    """Proximal least squares ``argmin_B ||(W - C B) S||^2 + λ ||(B - B_old) S||^2`` (same for any PD H)."""
    CtC = C.T @ C  # (k, k)
    lam = 1e-6 * float(CtC.diagonal().mean().clamp_min(1e-30))
    A = CtC + lam * torch.eye(len(CtC), dtype=C.dtype)
    return torch.linalg.solve(A, C.T @ W + lam * B_old)  # (k, in)


def _to_sparse(C: Tensor, s: int) -> tuple[Tensor, Tensor]:
    """Each row's s stored entries (its support; zeros padded at unused columns), sorted by column."""
    idx = C.abs().topk(s, dim=1).indices.sort(dim=1).values  # (out, s)
    return C.gather(1, idx), idx
