"""Distillation data: deterministic batches, corpus windows, sampling, the cached teacher top-k."""

import pytest
import torch

from lmpress.distill import data as D
from lmpress.distill import losses as L
from lmpress.errors import InputError


def test_batch_rows_permutes_each_epoch_and_is_deterministic():
    n, b = 10, 4
    seen = torch.cat([D.batch_rows(n, b, s, seed=3) for s in range(5)])  # 20 rows = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(D.batch_rows(n, b, 2, seed=3), seen[8:12])  # straddles epochs, still known from the step
    assert not torch.equal(D.batch_rows(n, b, 0, seed=4), seen[:4])


def test_on_policy_fraction():
    picks = [D.on_policy_step(s, 0.3, seed=0) for s in range(2000)]
    assert abs(sum(picks) / 2000 - 0.3) < 0.04
    assert picks == [D.on_policy_step(s, 0.3, seed=0) for s in range(2000)]
    assert not any(D.on_policy_step(s, 0.0, seed=0) for s in range(100))


def test_corpus_windows_use_calibration_documents_only(tmp_path, byte_tok):
    docs = [f"doc{i:03d} " + "lorem ipsum " * 20 for i in range(60)]
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    w = D.corpus_windows(byte_tok, str(tmp_path / "c.txt"), seq_len=64, max_rows=1000, seed=0)
    assert w.shape[1] == 64 and (w[:, 0] == byte_tok.bos_token_id).all()
    text = bytes((w[:, 1:].flatten() - 3).tolist()).decode(errors="replace")
    assert "doc001" in text and "doc000" not in text and "doc020" not in text and "doc040" not in text
    few = D.corpus_windows(byte_tok, str(tmp_path / "c.txt"), seq_len=64, max_rows=3, seed=0)
    assert few.shape == (3, 64)
    with pytest.raises(InputError, match="fewer than one training window"):
        D.corpus_windows(byte_tok, str(tmp_path / "c.txt"), seq_len=10**6, max_rows=1)


def test_sample_with_cache_matches_full_recompute(llama):
    class NoCache(torch.nn.Module):  # any module: logits only, no KV cache
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(ids, use_cache=False).logits

    prefix = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    greedy = D.sample(llama, prefix, 6, temperature=0)
    assert torch.equal(greedy, D.sample(NoCache(llama), prefix, 6, temperature=0))
    a = D.sample(llama, prefix, 6, generator=torch.Generator().manual_seed(1))
    b = D.sample(llama, prefix, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(a[:, :5], prefix) and a.shape == (2, 11)


def test_teacher_sequences_keep_prompts(llama):
    w = torch.randint(3, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    out = D.teacher_sequences(llama, w, prompt_len=4, seed=0, batch_size=2, progress=False)
    assert out.shape == w.shape and torch.equal(out[:, :4], w[:, :4]) and not torch.equal(out, w)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tv", "skl", "srkl", "tsld", "cakld"])
def test_topk_loss_equals_full_loss_when_k_is_vocab(name):
    torch.manual_seed(0)
    V = 13
    s, t = torch.randn(2, 5, V, requires_grad=True), torch.randn(2, 5, V) * 2
    y, mask = torch.randint(0, V, (2, 5)), torch.tensor([[1.0, 1, 1, 0, 1], [1, 1, 1, 1, 1]])
    kw = dict(temperature=1.5, label_smoothing=0.05, gamma=0.3, beta=0.4, alpha=0.2, tau=2.0)
    logp_t = torch.log_softmax(t / 1.5, -1)
    vals, idx = logp_t.topk(V, dim=-1)  # k = V, float32 values
    cached = D.topk_loss(name, s, vals, idx, mask, targets=y, **kw)
    logp, logq = L.log_probs(s, t, 1.5, 0.05)
    nll = L.token_nll(logp_t, y, is_logp=True)
    kw.pop("label_smoothing")
    full = L.divergence_loss(name, logp, logq, mask, teacher_nll=nll, **kw)
    assert torch.allclose(cached, full, atol=1e-6, rtol=1e-5), (cached, full)
    g1, = torch.autograd.grad(cached, s)
    g2, = torch.autograd.grad(full, s)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_topk_buckets_sum_to_one_and_lower_bound_full_kl():
    torch.manual_seed(1)
    V, k = 50, 5
    s, t = torch.randn(3, 4, V), torch.randn(3, 4, V) * 3
    vals, idx = torch.log_softmax(t, -1).topk(k, dim=-1)
    logp, logq, counts = D.topk_log_probs(s, vals.half(), idx)
    assert logp.shape == (3, 4, k + 1) and counts.tolist() == [1.0] * k + [V - k]
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3, 4), atol=1e-5)
    assert torch.allclose(logq.exp().sum(-1), torch.ones(3, 4), atol=1e-5)
    bucket = L.kl(logp, logq)
    full = L.kl(torch.log_softmax(t, -1), torch.log_softmax(s, -1))
    assert (bucket <= full + 2e-3).all()  # data-processing inequality (fp16 values: small slack)


def test_cache_roundtrip_and_loss(tmp_path, llama):
    w = torch.randint(3, 256, (5, 9), generator=torch.Generator().manual_seed(0))
    path = D.cache_teacher_topk(llama, w, tmp_path / "c", k=256, shard_rows=2, batch_size=2, progress=False)
    cache = D.TopKCache(path)
    assert len(cache) == 5 and cache.k == 256 and len(list(path.glob("topk-*.safetensors"))) == 3
    ids, vals, idx = cache.get(torch.tensor([4, 1]))
    assert torch.equal(ids, w[[4, 1]]) and vals.dtype == torch.float16 and vals.shape == (2, 8, 256)
    assert cache.nbytes() < 5 * 8 * 256 * 6 + 3 * 4096  # fp16 values + int32 indices (+ headers)
    with torch.no_grad():
        t = llama(ids, use_cache=False).logits[:, :-1]
    s = torch.randn_like(t)
    cached = D.topk_loss("fkl", s, vals, idx)
    assert torch.allclose(cached, L.forward_kl(s, t), rtol=2e-3)
    with pytest.raises(InputError, match="already exists"):
        D.cache_teacher_topk(llama, w, path, k=4, progress=False)
    (path / "topk-00001.safetensors").unlink()
    with pytest.raises(InputError, match="incomplete"):
        D.TopKCache(path)
