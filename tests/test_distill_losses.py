"""Each distillation loss against a hand computation on small tensors, plus the invariants."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmpress.distill import losses as L

P = [0.7, 0.2, 0.1]
Q = [0.5, 0.3, 0.2]


def logits(probs):
    return torch.tensor(probs).log().view(1, 1, -1)  # (B=1, T=1, V)


def kl_hand(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def mix(p, q, w):
    return [w * a + (1 - w) * b for a, b in zip(p, q)]


def close(x, y, tol=1e-6):
    return abs(float(x) - float(y)) < tol


S, T = logits(Q), logits(P)  # student q, teacher p


def test_forward_and_reverse_kl():
    assert close(L.forward_kl(S, T), kl_hand(P, Q))
    assert close(L.reverse_kl(S, T), kl_hand(Q, P))


def test_jsd_hand_bounds_symmetry():
    for beta in (0.5, 0.2, 0.9):
        m = mix(P, Q, beta)
        hand = beta * kl_hand(P, m) + (1 - beta) * kl_hand(Q, m)
        assert close(L.generalized_jsd(S, T, beta=beta), hand)
        # JSD_beta(p, q) == JSD_(1-beta)(q, p)
        assert close(L.generalized_jsd(S, T, beta=beta), L.generalized_jsd(T, S, beta=1 - beta))
    # bounds: 0 <= JSD <= H(beta); near-disjoint supports reach the upper bound
    a, b = logits([1 - 1e-9, 1e-9 / 2, 1e-9 / 2]), logits([1e-9 / 2, 1e-9 / 2, 1 - 1e-9])
    for beta in (0.5, 0.3):
        h = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        v = float(L.generalized_jsd(a, b, beta=beta))
        assert 0 <= v <= h + 1e-6 and v > h - 1e-4
    assert close(L.generalized_jsd(S, S), 0)


def test_total_variation():
    assert close(L.tv_distance(S, T), 0.5 * sum(abs(a - b) for a, b in zip(P, Q)))
    assert close(L.tv_distance(S, T), 0.2)
    a, b = logits([1 - 2e-9, 1e-9, 1e-9]), logits([1e-9, 1e-9, 1 - 2e-9])
    assert close(L.tv_distance(a, b), 1.0, 1e-6)


def test_skew_kl_and_skew_reverse_kl():
    alpha = 0.1
    assert close(L.skew_forward_kl(S, T, alpha=alpha), kl_hand(P, mix(P, Q, alpha)))
    assert close(L.skew_reverse_kl(S, T, alpha=alpha), kl_hand(Q, mix(Q, P, alpha)))
    assert close(L.skew_forward_kl(S, T, alpha=0.0), kl_hand(P, Q))
    # bounded by -ln(alpha) even for disjoint supports, where KL is huge
    a, b = logits([1 - 2e-12, 1e-12, 1e-12]), logits([1e-12, 1e-12, 1 - 2e-12])
    assert float(L.forward_kl(b, a)) > 20
    assert float(L.skew_forward_kl(b, a, alpha=alpha)) <= -math.log(alpha) + 1e-6


def test_every_divergence_of_p_with_itself_is_zero():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    for name in L.LOSS_NAMES:
        logp, logq = L.log_probs(x, x)
        v = L.divergence_loss(name, logp, logq, teacher_nll=L.token_nll(x, y), gamma=0.4)
        assert abs(float(v)) < 1e-6, name


def test_temperature_and_label_smoothing():
    t = 2.0
    p = F.softmax(T.view(-1) / t, -1).tolist()
    q = F.softmax(S.view(-1) / t, -1).tolist()
    assert close(L.forward_kl(S, T, temperature=t), t * t * kl_hand(p, q))
    eps = 0.1
    ps = [(1 - eps) * a + eps / 3 for a in P]
    assert close(L.forward_kl(S, T, label_smoothing=eps), kl_hand(ps, Q))
    # smoothing with bucket counts: a bucket holding 2 entries gets 2/3 of eps
    lp = torch.tensor([0.6, 0.4]).log()
    out = L.smooth(lp, eps, torch.tensor([1.0, 2.0])).exp()
    assert torch.allclose(out, torch.tensor([0.9 * 0.6 + eps / 3, 0.9 * 0.4 + 2 * eps / 3]))


def test_mask_and_sum_reduction():
    s = torch.cat([S, logits([0.1, 0.1, 0.8])], dim=1)  # (1, 2, 3)
    t = torch.cat([T, logits([0.3, 0.3, 0.4])], dim=1)
    mask = torch.tensor([[1.0, 0.0]])
    assert close(L.forward_kl(s, t, mask), kl_hand(P, Q))
    both = kl_hand(P, Q) + kl_hand([0.3, 0.3, 0.4], [0.1, 0.1, 0.8])
    assert close(L.forward_kl(s, t, reduction="sum"), both)
    assert close(L.forward_kl(s, t), both / 2)


def test_tsld_hand():
    tau = 10.0
    p2, q2 = [0.25, 0.25, 0.5], [0.6, 0.2, 0.2]
    s = torch.cat([S, logits(q2)], dim=1)  # (1, 2, 3)
    t = torch.cat([T, logits(p2)], dim=1)
    y = torch.tensor([[1, 2]])  # ground-truth tokens: teacher probs 0.2 and 0.5
    ce = [-math.log(0.2), -math.log(0.5)]
    z = [math.exp(c / tau) for c in ce]
    scale = [v / sum(z) for v in z]
    hand = scale[0] * kl_hand(P, Q) + scale[1] * kl_hand(p2, q2)
    assert close(L.tsld(s, t, y, tau=tau), hand)
    # mean over sequences: a batch of the same sequence twice gives the same value, the sum twice it
    s2, t2, y2 = s.repeat(2, 1, 1), t.repeat(2, 1, 1), y.repeat(2, 1)
    assert close(L.tsld(s2, t2, y2, tau=tau), hand)
    assert close(L.tsld(s2, t2, y2, tau=tau, reduction="sum"), 2 * hand)
    # a masked token gets no weight: the other carries scale 1
    assert close(L.tsld(s, t, y, torch.tensor([[1.0, 0.0]]), tau=tau), kl_hand(P, Q))


def test_cakld_hand_and_teacher_confidence():
    y = torch.tensor([[0]])
    gamma = L.teacher_confidence(T, y)
    assert close(gamma, 0.7)
    assert close(L.cakld(S, T, gamma=0.7), 0.7 * kl_hand(Q, P) + 0.3 * kl_hand(P, Q))
    assert close(L.cakld(S, T, gamma=0.0), kl_hand(P, Q))
    assert close(L.cakld(S, T, gamma=1.0), kl_hand(Q, P))


def test_cross_entropy_matches_torch():
    torch.manual_seed(0)
    x, y = torch.randn(2, 4, 7), torch.randint(0, 7, (2, 4))
    assert torch.allclose(L.cross_entropy(x, y), F.cross_entropy(x.view(-1, 7), y.view(-1)))


def test_hidden_losses_hand_and_projection():
    hs = torch.tensor([[[1.0, 2.0], [0.0, 1.0]]])  # (1, 2, 2)
    ht = torch.tensor([[[2.0, 2.0], [0.0, -1.0]]])
    # per token mean_d (hs - ht)^2: [0.5, 2.0]
    assert close(L.hidden_mse(hs, ht), 1.25)
    assert close(L.hidden_mse(hs, ht, torch.tensor([[0.0, 1.0]])), 2.0)
    cos0 = (1 * 2 + 2 * 2) / (math.sqrt(5) * math.sqrt(8))
    assert close(L.hidden_cosine(hs, ht), ((1 - cos0) + 2.0) / 2)
    proj = L.HiddenProjection(2, 5, n_layers=3)
    assert proj(1, hs).shape == (1, 2, 5)
    assert close(L.hidden_mse(ht, ht), 0) and close(L.hidden_cosine(ht, ht), 0)


def test_attention_kl_hand():
    a_t = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).view(1, 1, 2, 2)  # (B, H, T, T), causal rows
    a_s = torch.tensor([[1.0, 0.0], [0.8, 0.2]]).view(1, 1, 2, 2)
    hand = (0 + kl_hand([0.5, 0.5], [0.8, 0.2])) / 2
    assert close(L.attention_kl(a_s, a_t), hand)
    assert close(L.attention_kl(a_t, a_t), 0)
    # different head counts: both averaged over heads first
    a_s2 = torch.cat([a_s, a_t], dim=1)  # 2 heads, mean row 2 = [0.65, 0.35]
    hand2 = kl_hand([0.5, 0.5], [0.65, 0.35]) / 2
    assert close(L.attention_kl(a_s2, a_t), hand2)


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown distillation loss"):
        L.per_token_divergence("nope", torch.zeros(3), torch.zeros(3))
