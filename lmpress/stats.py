"""Statistics of a linear layer's calibration inputs, and the damped Cholesky factorization of ``X^T X``.

Every layer-wise method reads sums over the calibration rows x (tokens, in) of a linear layer:

* ``X^T X`` (in, in): GPTQ's Hessian ``2/n X^T X`` (arXiv 2210.17323), SparseGPT's ``X^T X``
  (arXiv 2301.00774), SVD-LLM's second moment (arXiv 2403.07378), DSFormer's output-error metric;
* ``Σ x²`` per input channel (in,): Wanda's ``||X_j||²`` (arXiv 2306.11695), OWL's scores, width
  pruning's MLP and hidden channel importance, AWQ's clip-search weights;
* ``Σ |x|`` per input channel (in,): AWQ's (arXiv 2306.00978) and ASVD's (arXiv 2312.05821) scales;
* an evenly spaced sample of rows: AWQ's scale search.

:class:`InputStats` streams the ones a method asks for; :func:`collect` runs one calibration pass
of a block with one accumulator per group of linears that read the same input. Each method keeps
its own weighting (GPTQ's ``2/n``, plain sums for SparseGPT and SVD-LLM, means for AWQ and ASVD).

:func:`damped_cholesky` factors ``H + λ I`` with ``λ = damp · mean(diag H)`` (or gives the upper
factor of its inverse, which GPTQ's and SparseGPT's column sweep uses), raising ``damp`` tenfold
while ``H`` is not positive definite; :func:`without_dead` first makes the inputs that were never
active (a zero diagonal entry) harmless. Example::

    st = InputStats("xtx")                          # one per input group, fed by the pipeline
    H, dead = without_dead(st.xtx)
    U, used = damped_cholesky(H, 0.01, inverse=True)  # U^T U = (H + used * mean(diag H) * I)^-1
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .errors import InputError

SUMS = ("xtx", "sq", "abs")  # what InputStats can sum


def gram(x: Tensor, min_split: int = 1024, *, add_to: Tensor | None = None) -> Tensor:
    """``x^T x`` (in, in) as float32 for x (tokens, in), the product in x's dtype (bf16 inputs: a bf16
    product). Wide inputs are cut into three column blocks and each off-diagonal block is computed
    once (6 of 9 block products: about 20% faster here).

    ``add_to``: a running sum (in, in), to which the product is added block by block, in place: the
    same bits as ``add_to += gram(x)`` without a second (in, in) tensor (321 MB for an 8960-wide input)."""
    d = x.shape[1]
    if d < min_split:
        prod = (x.T @ x).float()
        return prod if add_to is None else add_to.add_(prod)
    size = math.ceil(d / 3)
    parts = [p.contiguous() for p in x.split(size, dim=1)]
    out = torch.empty(d, d) if add_to is None else add_to
    put = (lambda dst, v: dst.copy_(v)) if add_to is None else (lambda dst, v: dst.add_(v))
    for i, a in enumerate(parts):
        for j in range(i, len(parts)):
            blk = (a.T @ parts[j]).float()
            ri, rj = slice(i * size, i * size + a.shape[1]), slice(j * size, j * size + parts[j].shape[1])
            put(out[ri, rj], blk)
            if j != i:
                put(out[rj, ri], blk.T)
    return out


def _batch_sum(key: str, x: Tensor, xf: Tensor) -> Tensor:
    """One batch's contribution to sum ``key``; x as observed, xf the same rows in float32."""
    if key == "xtx":
        return gram(x)  # (in, in)
    if key == "sq":
        return (xf * xf).sum(0)  # (in,)
    return xf.abs().sum(0)  # (in,)


class InputStats:
    """Streaming sums over the calibration rows x (tokens, in) of one linear layer's input.

    ``want``: any of ``"xtx"`` (``Σ x^T x``, (in, in)), ``"sq"`` (``Σ x²``, (in,)), ``"abs"``
    (``Σ |x|``, (in,)). ``rows``: also keep an evenly spaced float32 sample of up to this many rows
    (every ``stride``-th row of each batch). Products are float32, also for bfloat16 inputs, unless
    ``upcast=False``: then ``x^T x`` is the product in x's dtype (GPTQ under bf16 forwards: faster,
    and accurate enough for it), summed in float32. ``dtype``: of the running sums (float64 for
    SVD-LLM's whitening).
    """

    def __init__(self, *want: str, rows: int = 0, stride: int = 1, upcast: bool = True,
                 dtype: torch.dtype = torch.float32):
        unknown = set(want) - set(SUMS)
        if unknown:
            raise ValueError(f"InputStats sums {SUMS}, not {sorted(unknown)}")
        self.want, self.keep, self.stride, self.upcast, self.dtype = want, rows, stride, upcast, dtype
        self.sums: dict[str, Tensor] = {}
        self.n = 0  # rows seen
        self._rows: list[Tensor] = []

    def __call__(self, x: Tensor) -> None:
        x = x.detach()
        xf = x.float() if self.upcast or self.keep or set(self.want) - {"xtx"} else x
        for key in self.want:
            if key == "xtx" and key in self.sums:  # added in place, block by block (no second (in, in) tensor)
                gram(xf if self.upcast else x, add_to=self.sums[key])
                continue
            v = _batch_sum(key, xf if self.upcast else x, xf).to(self.dtype)
            self.sums[key] = v if key not in self.sums else self.sums[key].add_(v)
        self.n += x.shape[0]
        if self.keep and sum(r.shape[0] for r in self._rows) < self.keep:
            self._rows.append(xf[:: self.stride].clone())

    def _sum(self, key: str) -> Tensor:
        if key not in self.sums:
            raise ValueError(f"no {key!r} sum here: ask InputStats({key!r}, ...) for it"
                             + (" (no calibration rows reached this layer)" if key in self.want else ""))
        return self.sums[key]

    @property
    def xtx(self) -> Tensor:
        """``X^T X`` (in, in), summed over all rows."""
        return self._sum("xtx")

    @property
    def hessian(self) -> Tensor:
        """GPTQ's ``H = 2/n X^T X`` (in, in)."""
        return 2.0 * self.xtx / self.n

    def take_hessian(self) -> Tensor:
        """:attr:`hessian` made in the storage of ``X^T X`` (the sum is gone afterwards): the same
        bits without a second (in, in) tensor."""
        return self.sums.pop("xtx").mul_(2.0).div_(self.n)

    @property
    def sq_sum(self) -> Tensor:
        """``Σ_t x_tj²`` (in,): Wanda's ``||X_j||²``."""
        return self._sum("sq")

    @property
    def mean_sq(self) -> Tensor:
        return self.sq_sum / max(1, self.n)

    @property
    def mean_abs(self) -> Tensor:
        """``mean_t |x_tj|`` (in,)."""
        return self._sum("abs") / max(1, self.n)

    @property
    def sample(self) -> Tensor:
        """The kept rows (≤ rows, in), float32."""
        return torch.cat(self._rows)[: self.keep]

    def sum_over_ranks(self) -> None:
        """Under torch.distributed: replace the sums and the row count by their totals over all ranks
        (reduced to rank 0 and broadcast, so every rank holds the same bits). Each rank's sum is
        over its own rows, so the total differs from one process's running sum only in the order of
        the float32 additions: by at most about ``(batches) * 2**-24 * Σ|x_i x_j|`` per entry."""
        import torch.distributed as dist

        if self.keep:
            raise InputError("a sample of calibration rows (AWQ's scale search) is not gathered across processes; "
                             "run this method in one process")
        n = torch.tensor([float(self.n)], dtype=torch.float64)
        for t in [self.sums[k] for k in sorted(self.sums)] + [n]:
            dist.reduce(t, dst=0)
            dist.broadcast(t, src=0)
        self.n = int(n.item())

    def divide_inputs(self, s: Tensor) -> None:
        """The layer's inputs are now ``x / s`` (s (in,) > 0, folded into the op before it, as AWQ
        does): rescale what was summed so far."""
        scale = {"xtx": s[:, None] * s[None, :], "sq": s**2, "abs": s}
        self.sums = {key: v / scale[key] for key, v in self.sums.items()}
        self._rows = [r / s for r in self._rows]


def collect(bctx, names: list[str], make: Callable[[], InputStats]) -> dict[str, InputStats]:
    """Run block ``bctx``'s calibration pass once and return ``{name: stats}`` for the named
    linears; linears that read the same input (one of ``bctx.groups``: q/k/v, gate/up) share one
    accumulator, made by ``make()``."""
    rep = {}  # name -> the first named member of its input group
    for g in bctx.groups:
        members = [n for n in g if n in names]
        rep.update({n: members[0] for n in members})
    accs = {r: make() for r in sorted(set(rep.values()))}
    bctx.collect(accs)
    if getattr(bctx, "world", 1) > 1:
        for r in sorted(accs):
            accs[r].sum_over_ranks()
    return {n: accs[rep[n]] for n in names}


def without_dead(H: Tensor) -> tuple[Tensor, Tensor]:
    """``(H', dead)``: a copy of H (in, in) with ``H'_jj = 1`` on the inputs that were never active
    (``H_jj = 0``; bool (in,)), so that H' can be factored. The weights on dead inputs never touch
    an output on the calibration data: methods set them to zero."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    return H, dead


def damped_cholesky(H: Tensor, damp: float, *, inverse: bool = False, method: str = "",
                    rebuild: Callable[[], Tensor] | None = None) -> tuple[Tensor, float]:
    """``(L, used)``: the lower Cholesky factor of ``H + λ I``, ``λ = used · mean(diag H)``, in H's
    dtype; with ``inverse``, the upper factor ``U`` of ``(H + λ I)^-1`` (``U^T U``; GPTQ, SparseGPT).

    ``used`` starts at ``damp`` and grows tenfold (to at least 1e-10 when ``damp`` is 0) while the
    factorization fails: ``X^T X`` summed from bfloat16 products, or from few tokens, can be singular
    or slightly indefinite. Callers report the layers where ``used > damp``.

    ``rebuild``: H is consumed (factored in its own storage, which is returned) and ``rebuild()``
    makes H again for a retry: no (in, in) copy on the first try, which matters for wide inputs (an
    8960-wide MLP input's H is 321 MB). The bits are the same either way.
    """
    mean = torch.diag(H).mean().clamp_min(1e-30)  # a contiguous copy: the summation order of the earlier GPTQ/SparseGPT code
    info = torch.empty((), dtype=torch.int32)
    for k in range(12):
        used = damp if k == 0 else max(damp * 10**k, 10.0 ** (k - 11))
        A = H if rebuild is not None and k == 0 else rebuild() if rebuild is not None else H.clone()
        A.diagonal().add_(used * mean)  # H + used·mean·I, entry for entry
        # LAPACK works on column-major matrices: a row-major ``out`` costs a hidden (in, in) copy per call.
        # H is symmetric, so its transposed view is the same matrix in column-major order: factor that
        # (upper U = L^T there is L in A's own order) and nothing is copied. Reads H's upper triangle.
        At = A.mT
        torch.linalg.cholesky_ex(At, upper=True, out=(At, info))  # A: lower L, H = L L^T
        if info == 0 and inverse:
            torch.cholesky_inverse(At, upper=True, out=At)  # (H + λI)^-1, symmetric
            torch.linalg.cholesky_ex(At, upper=False, out=(At, info))  # A: upper U, (H + λI)^-1 = U^T U
        if info == 0:
            return A, used
        del A
    raise _singular(method, used)


def _singular(method: str, used: float) -> InputError:
    return InputError(f"{method or 'Cholesky'}: the Hessian X^T X stays singular even with strong dampening "
                      f"({used:g} x its mean diagonal); use more calibration data, and check the inputs for NaN")
