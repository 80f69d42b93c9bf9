"""Distillation losses: pure functions on logits, log-probabilities and hidden states.

Shapes: ``student`` and ``teacher`` logits are ``(B, T, V)``; ``mask`` is ``(B, T)`` (1 = the
position counts, ``None`` = all count); ``targets`` are the next tokens ``(B, T)`` (the
ground truth, needed by TSLD and CAKLD). ``p`` is the teacher distribution, ``q`` the student's.

Every logit loss reads the same way::

    p = smooth(softmax(teacher / tau), eps)     # temperature tau, label smoothing eps
    q = softmax(student / tau)
    loss = tau**2 * mean_over_masked_tokens( D(p, q) )

The factor ``tau**2`` keeps gradient magnitudes independent of the temperature (Hinton et al.,
arXiv 1503.02531). ``reduction="sum"`` returns the sum over masked tokens instead of the mean
(TSLD: the sum over sequences), so a trainer can divide by a global count across micro-batches
and processes.

========  ====================================================================  ==================
name      per-token divergence ``D(p, q)``                                      reference
========  ====================================================================  ==================
fkl       ``KL(p || q) = sum_v p_v (log p_v - log q_v)``                        Hinton 1503.02531
rkl       ``KL(q || p)``  (mode seeking)                                        Gu 2306.08543
jsd       ``beta KL(p || m) + (1-beta) KL(q || m)``, ``m = beta p + (1-beta) q``  Agarwal 2306.13649
tv        ``1/2 sum_v |p_v - q_v|``                                             Wen 2307.15190
skl       ``KL(p || alpha p + (1-alpha) q)``                                    Ko 2402.03898
srkl      ``KL(q || alpha q + (1-alpha) p)``                                    Ko 2402.03898
tsld      ``sum_t s_t KL_t(p || q)``, ``s = softmax_t(CE_teacher_t / tau_s)``   Kim 2308.06744
cakld     ``gamma KL(q || p) + (1-gamma) KL(p || q)``, ``gamma = E[p(y_t)]``    Du 2402.10631
========  ====================================================================  ==================

Bounds used by the tests: ``0 <= JSD_beta <= H(beta) = -beta ln beta - (1-beta) ln(1-beta)``,
``JSD_beta(p, q) = JSD_(1-beta)(q, p)``, ``0 <= TV <= 1``, ``SKL_alpha <= -ln alpha``, every
divergence of a distribution with itself is 0.

The divergences are written once on log-probabilities over the last axis (``kl``, ``jsd``, ...)
so that the same code serves the full vocabulary and the cached top-k buckets of
:mod:`lmpress.distill.data` (``k`` top tokens plus one tail bucket).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# ---- divergences on log-probabilities over the last axis ----------------------------------


def _plogp_ratio(logp: Tensor, logq: Tensor) -> Tensor:
    """``p (log p - log q)`` elementwise, 0 where ``p == 0`` (also when ``log q`` is -inf there)."""
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return p * diff


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)``. (..., V) -> (...)"""
    return _plogp_ratio(logp, logq).sum(-1)


def _log_mix(logp: Tensor, logq: Tensor, w: float) -> Tensor:
    """``log(w p + (1 - w) q)``, stable. (..., V)"""
    return torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))


def jsd(logp: Tensor, logq: Tensor, beta: float = 0.5) -> Tensor:
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al., arXiv 2306.13649).

    ``JSD_beta(p, q) = beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``,
    with ``0 < beta < 1``. (..., V) -> (...)
    """
    logm = _log_mix(logp, logq, beta)
    return beta * kl(logp, logm) + (1 - beta) * kl(logq, logm)


def total_variation(logp: Tensor, logq: Tensor) -> Tensor:
    """``TV(p, q) = 1/2 sum_v |p_v - q_v|`` (Wen et al., arXiv 2307.15190). (..., V) -> (...)"""
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def skew_kl(logp: Tensor, logq: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew KL (DistiLLM, Ko et al., arXiv 2402.03898): ``KL(p || alpha p + (1 - alpha) q)``.

    ``alpha = 0`` is ``KL(p || q)``; the mixture keeps the loss bounded by ``-ln alpha``.
    Swap the arguments for the skew reverse KL ``KL(q || alpha q + (1 - alpha) p)``.
    """
    if alpha == 0:
        return kl(logp, logq)
    return kl(logp, _log_mix(logp, logq, alpha))


# ---- turning logits into distributions -------------------------------------------------------


def smooth(logp: Tensor, eps: float, counts: Tensor | None = None) -> Tensor:
    """Label smoothing of a distribution: ``log((1 - eps) p + eps u)``, ``u`` uniform over the vocabulary.

    ``counts`` (last axis of ``logp``) says how many vocabulary entries each bucket holds (a
    top-k bucket holds 1, the tail bucket ``V - k``); ``None`` means one entry per bucket.
    """
    if eps == 0:
        return logp
    counts = torch.ones(logp.shape[-1]) if counts is None else counts
    log_u = (counts.to(logp) / counts.sum()).log()
    return torch.logaddexp(logp + math.log1p(-eps), log_u + math.log(eps))


def log_probs(student: Tensor, teacher: Tensor, temperature: float = 1.0, label_smoothing: float = 0.0):
    """``(log p, log q)``: teacher and student log-probabilities at ``temperature``, in float32. (B, T, V)"""
    logq = F.log_softmax(student.float() / temperature, dim=-1)
    logp = F.log_softmax(teacher.float() / temperature, dim=-1)
    return smooth(logp, label_smoothing), logq


def reduce_tokens(per_token: Tensor, mask: Tensor | None, reduction: str = "mean") -> Tensor:
    """Mean (or sum) of ``per_token`` (B, T) over the masked positions."""
    if mask is None:
        mask = torch.ones_like(per_token)
    mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return total / mask.sum().clamp_min(1)


LOSS_NAMES = ("fkl", "rkl", "jsd", "tv", "skl", "srkl", "tsld", "cakld")


def per_token_divergence(name: str, logp: Tensor, logq: Tensor, *, beta=0.5, alpha=0.1, gamma=None) -> Tensor:
    """``D(p, q)`` of the loss ``name`` at each position. (..., V) -> (...)"""
    if name in ("fkl", "tsld"):  # TSLD scales the forward KL per token (see tsld)
        return kl(logp, logq)
    if name == "rkl":
        return kl(logq, logp)
    if name == "jsd":
        return jsd(logp, logq, beta)
    if name == "tv":
        return total_variation(logp, logq)
    if name == "skl":
        return skew_kl(logp, logq, alpha)
    if name == "srkl":
        return skew_kl(logq, logp, alpha)
    if name == "cakld":
        if gamma is None:
            raise ValueError("cakld needs gamma (the teacher's mean confidence, see teacher_confidence)")
        return gamma * kl(logq, logp) + (1 - gamma) * kl(logp, logq)
    raise ValueError(f"unknown distillation loss {name!r}; known: {', '.join(LOSS_NAMES)}")


def divergence_loss(name, logp, logq, mask=None, *, teacher_nll=None, tau=10.0, temperature=1.0,
                    reduction="mean", **kw) -> Tensor:
    """The loss ``name`` from log-probabilities (full vocabulary or top-k buckets), times ``temperature**2``.

    TSLD needs ``teacher_nll`` (B, T), the teacher's cross-entropy on the ground truth; its
    ``"mean"`` is over sequences, its ``"sum"`` the sum over sequences.
    """
    d = per_token_divergence(name, logp, logq, **kw)  # (B, T)
    if name != "tsld":
        return temperature**2 * reduce_tokens(d, mask, reduction)
    if teacher_nll is None:
        raise ValueError("tsld needs teacher_nll (the teacher's per-token cross-entropy)")
    per_seq = (tsld_scale(teacher_nll, mask, tau) * d).sum(-1)  # (B,)
    rows = per_seq.new_ones(per_seq.shape) if mask is None else (mask.sum(-1) > 0).to(per_seq)
    total = temperature**2 * (per_seq * rows).sum()
    return total if reduction == "sum" else total / rows.sum().clamp_min(1)


def _named(name, student, teacher, mask, temperature, label_smoothing, reduction, **kw):
    logp, logq = log_probs(student, teacher, temperature, label_smoothing)
    return divergence_loss(name, logp, logq, mask, temperature=temperature, reduction=reduction, **kw)


# ---- the named logit losses ----------------------------------------------------------------


def forward_kl(student, teacher, mask=None, *, temperature=1.0, label_smoothing=0.0, reduction="mean"):
    """``KL(p || q)`` per token, mean over masked tokens (Hinton et al., arXiv 1503.02531)."""
    return _named("fkl", student, teacher, mask, temperature, label_smoothing, reduction)


def reverse_kl(student, teacher, mask=None, *, temperature=1.0, label_smoothing=0.0, reduction="mean"):
    """``KL(q || p)`` per token (MiniLLM, Gu et al., arXiv 2306.08543)."""
    return _named("rkl", student, teacher, mask, temperature, label_smoothing, reduction)


def generalized_jsd(student, teacher, mask=None, *, beta=0.5, temperature=1.0, label_smoothing=0.0, reduction="mean"):
    """``JSD_beta(p, q)`` per token (GKD, Agarwal et al., arXiv 2306.13649)."""
    return _named("jsd", student, teacher, mask, temperature, label_smoothing, reduction, beta=beta)


def tv_distance(student, teacher, mask=None, *, temperature=1.0, label_smoothing=0.0, reduction="mean"):
    """Total variation ``1/2 |p - q|_1`` per token (Wen et al., arXiv 2307.15190)."""
    return _named("tv", student, teacher, mask, temperature, label_smoothing, reduction)


def skew_forward_kl(student, teacher, mask=None, *, alpha=0.1, temperature=1.0, label_smoothing=0.0, reduction="mean"):
    """``KL(p || alpha p + (1 - alpha) q)`` per token (DistiLLM, Ko et al., arXiv 2402.03898)."""
    return _named("skl", student, teacher, mask, temperature, label_smoothing, reduction, alpha=alpha)


def skew_reverse_kl(student, teacher, mask=None, *, alpha=0.1, temperature=1.0, label_smoothing=0.0, reduction="mean"):
    """``KL(q || alpha q + (1 - alpha) p)`` per token (DistiLLM, Ko et al., arXiv 2402.03898)."""
    return _named("srkl", student, teacher, mask, temperature, label_smoothing, reduction, alpha=alpha)


def token_nll(logits_or_logp: Tensor, targets: Tensor, *, is_logp: bool = False) -> Tensor:
    """``-log p(y_t)`` per token. (B, T, V), (B, T) -> (B, T)"""
    logp = logits_or_logp if is_logp else F.log_softmax(logits_or_logp.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def tsld_scale(teacher_nll: Tensor, mask: Tensor | None, tau: float = 10.0) -> Tensor:
    """TSLD token scales ``s_t = softmax_t(CE_t / tau)`` over each sequence's masked tokens. (B, T)

    ``CE_t`` is the teacher's cross-entropy on the ground-truth token: tokens the teacher is
    unsure about get more weight (Kim et al., arXiv 2308.06744; their code uses ``tau = 10``).
    """
    z = teacher_nll.float() / tau
    if mask is not None:
        z = z.masked_fill(~mask.bool(), float("-inf"))
    s = torch.softmax(z, dim=-1)
    return torch.nan_to_num(s, nan=0.0).detach()  # a fully masked row gives 0 weights


def tsld(student, teacher, targets, mask=None, *, tau=10.0, temperature=1.0, label_smoothing=0.0, reduction="mean"):
    """Token-scaled logit distillation (Kim et al., NeurIPS 2023, arXiv 2308.06744).

    ``loss = mean_over_sequences( sum_t s_t KL(p_t || q_t) )``, ``s = softmax_t(CE_teacher_t / tau)``.
    The paper writes the per-token term as the cross-entropy ``-sum_v p log q``; KL differs from
    it by the teacher's entropy, a constant, so the gradients are the same and the loss is 0 at
    the optimum. The paper sums over the batch; the mean over sequences used here keeps the
    loss scale independent of the batch size.
    """
    nll = token_nll(teacher, targets)  # the teacher's CE at temperature 1, as in the paper
    return _named("tsld", student, teacher, mask, temperature, label_smoothing, reduction, teacher_nll=nll, tau=tau)


def teacher_confidence(teacher: Tensor, targets: Tensor, mask=None) -> Tensor:
    """CAKLD's ``gamma``: the teacher's mean probability of the ground-truth token (scalar).

    BitDistiller estimates it once over the training data (Du et al., arXiv 2402.10631).
    """
    p_true = (-token_nll(teacher, targets)).exp()
    return reduce_tokens(p_true, mask).detach()


def cakld(student, teacher, mask=None, *, gamma, temperature=1.0, label_smoothing=0.0, reduction="mean"):
    """Confidence-aware KL (BitDistiller, Du et al., arXiv 2402.10631).

    ``D = gamma KL(q || p) + (1 - gamma) KL(p || q)``: a confident teacher (``gamma`` near 1)
    makes the loss mode-seeking (reverse KL), an unsure one mean-seeking (forward KL).
    """
    return _named("cakld", student, teacher, mask, temperature, label_smoothing, reduction, gamma=float(gamma))


def cross_entropy(student, targets, mask=None, *, reduction="mean"):
    """Plain next-token cross-entropy ``-log q(y_t)`` (the no-teacher baseline)."""
    return reduce_tokens(token_nll(student, targets), mask, reduction)


# ---- hidden states and attention maps ------------------------------------------------------


def hidden_mse(h_student: Tensor, h_teacher: Tensor, mask=None, *, reduction="mean") -> Tensor:
    """``mean_d (h_s - h_t)^2`` per token, mean over masked tokens. (B, T, D) x2 -> scalar

    Hint (feature) distillation, FitNets (Romero et al., arXiv 1412.6550); give ``h_s`` through
    a :class:`HiddenProjection` when the widths differ.
    """
    per_token = (h_student.float() - h_teacher.float()).pow(2).mean(-1)  # (B, T)
    return reduce_tokens(per_token, mask, reduction)


def hidden_cosine(h_student: Tensor, h_teacher: Tensor, mask=None, *, reduction="mean") -> Tensor:
    """``1 - cos(h_s, h_t)`` per token, mean over masked tokens (DistilBERT, arXiv 1910.01108)."""
    per_token = 1 - F.cosine_similarity(h_student.float(), h_teacher.float(), dim=-1)  # (B, T)
    return reduce_tokens(per_token, mask, reduction)


HIDDEN_LOSSES = {"mse": hidden_mse, "cosine": hidden_cosine}


class HiddenProjection(torch.nn.Module):
    """Learned linear maps from student to teacher width, one per matched layer (FitNets regressor)."""

    def __init__(self, d_student: int, d_teacher: int, n_layers: int):
        super().__init__()
        self.maps = torch.nn.ModuleList(torch.nn.Linear(d_student, d_teacher, bias=False) for _ in range(n_layers))

    def forward(self, i: int, h: Tensor) -> Tensor:
        return self.maps[i](h)  # (B, T, d_student) -> (B, T, d_teacher)


def attention_kl(a_student: Tensor, a_teacher: Tensor, mask=None, *, reduction="mean", eps: float = 1e-12) -> Tensor:
    """Attention-map distillation ``KL(A_t || A_s)`` over keys, mean over heads (MiniLM, arXiv 2002.10957).

    ``a_*`` are attention probabilities ``(B, H, T, T)``; ``mask`` (B, T) selects the queries.
    When the head counts differ, each model's maps are first averaged over heads.
    """
    if a_student.shape[1] != a_teacher.shape[1]:
        a_student, a_teacher = a_student.mean(1, keepdim=True), a_teacher.mean(1, keepdim=True)
    logt = a_teacher.float().clamp_min(0).log()
    logs = a_student.float().clamp_min(eps).log()
    per_query = kl(logt, logs).mean(1)  # (B, H, T) -> (B, T)
    return reduce_tokens(per_query, mask, reduction)
