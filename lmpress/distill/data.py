"""Where distillation tokens come from, and a compact on-disk cache of the teacher's predictions.

Sources (all deterministic given a seed, and addressed by step so that a resumed run reads the
same batches as an uninterrupted one):

* **corpus windows** (:func:`corpus_windows`): the calibration part of a corpus (never the
  evaluation documents, see :mod:`lmpress.data`), shuffled with the seed, tokenized and cut into
  rows of ``seq_len`` tokens, BOS first. :func:`batch_rows` picks the rows of step ``s`` from a
  per-epoch permutation, so any step's batch is known without replaying earlier ones.
* **teacher-generated sequences** (:func:`teacher_sequences`): sequence-level distillation (Kim &
  Rush, arXiv 1606.07947): each window keeps its first ``prompt_len`` tokens and the teacher
  writes the rest (sampling at a temperature, or greedy at 0).
* **on-policy samples** (:func:`on_policy_step`, :func:`sample`): a fraction of the steps replace
  the continuation by one the *student* samples, and the loss is taken on those tokens only
  (GKD, Agarwal et al., arXiv 2306.13649; DistiLLM, arXiv 2402.03898): the student learns from its
  own mistakes, which also keeps it from over-fitting a fixed offline set.
* **cached teacher top-k** (:func:`cache_teacher_topk`, :class:`TopKCache`, :func:`topk_log_probs`):
  the teacher runs once; its ``k`` largest log-probabilities per position are stored as float16
  values and int32 vocabulary indices in safetensors shards (``6 k`` bytes per token instead of
  ``4 V``), so later epochs or runs need no teacher forward.

Top-k loss. The cached positions give a distribution over ``k + 1`` buckets: the ``k`` stored
tokens and one *tail* bucket for the rest of the vocabulary, with teacher tail mass
``p_tail = 1 - sum_i p_i`` (floored at ``TAIL_FLOOR``; the buckets are renormalised to sum to 1,
which also absorbs float16 rounding). The student's buckets are its probabilities of the same
``k`` tokens and its exact remaining mass ``q_tail = sum_{v not in top-k} q_v``. Any divergence of
:mod:`lmpress.distill.losses` is then taken over the buckets; by the data-processing inequality
the bucket KL is a lower bound of the full KL, equal to it when ``k = V`` (no tail bucket).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..io import write_failure
from ..progress import bar

TAIL_FLOOR = 1e-6
CACHE_VERSION = 1

# ---- corpus windows ----------------------------------------------------------------------------


def corpus_windows(tokenizer, corpus=None, *, seq_len: int, max_rows: int, seed: int = 0) -> Tensor:
    """Up to ``max_rows`` rows of ``seq_len`` tokens of the corpus's calibration text. (n, seq_len)

    Fewer rows come back when the corpus holds less text; the caller then runs several epochs.
    """
    from ..data import SEPARATOR, load_documents, split_documents

    docs, _ = split_documents(load_documents(corpus))
    random.Random(seed).shuffle(docs)
    bos = tokenizer.bos_token_id
    body = seq_len - (bos is not None)
    need, ids = max_rows * body, []
    for i in range(0, len(docs), 64):
        ids.extend(tokenizer(SEPARATOR.join(docs[i : i + 64]) + SEPARATOR, add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    n = min(max_rows, len(ids) // body)
    if n == 0:
        raise InputError(f"the corpus gives {len(ids)} tokens, fewer than one training window of {body}; give more text")
    rows = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)  # (n, body)
    if bos is not None:
        rows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), rows], dim=1)  # (n, seq_len)
    return rows


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def batch_rows(n_rows: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Row indices of the global batch of ``step``: epoch ``e`` visits the rows in a permutation
    seeded by ``(seed, e)``; a batch may straddle two epochs. (batch_size,)"""
    idx = torch.arange(step * batch_size, (step + 1) * batch_size)
    epoch, pos = idx // n_rows, idx % n_rows
    out = torch.empty(batch_size, dtype=torch.long)
    for e in epoch.unique().tolist():
        perm = torch.randperm(n_rows, generator=_generator(seed, 17, e))
        sel = epoch == e
        out[sel] = perm[pos[sel]]
    return out


def on_policy_step(step: int, fraction: float, seed: int) -> bool:
    """Whether ``step`` uses student samples: a seeded coin with probability ``fraction``."""
    if fraction <= 0:
        return False
    return torch.rand(1, generator=_generator(seed, 29, step)).item() < fraction


# ---- sampling ------------------------------------------------------------------------------


def _cache_kw(model) -> str | None:
    """The keyword a model's forward takes for its KV cache (``cache`` in transformers 5), or None."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _logits(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits


def _next_token(logits: Tensor, temperature: float, generator) -> Tensor:
    """Sample (or argmax at temperature 0) one token per row. (B, V) -> (B, 1)"""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def sample(model, prefix: Tensor, n_new: int, *, temperature: float = 1.0, generator=None, bf16: bool = False) -> Tensor:
    """Continue ``prefix`` (B, P) by ``n_new`` tokens sampled from ``model``. -> (B, P + n_new)

    Uses the model's KV cache when its forward takes one; any other module is re-run on the
    whole sequence for each new token.
    """
    kw = _cache_kw(model)
    ids = prefix
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if kw is None:
            for _ in range(n_new):
                ids = torch.cat([ids, _next_token(_logits(model(ids))[:, -1], temperature, generator)], 1)
            return ids
        out = model(ids, use_cache=True)
        for i in range(n_new):
            tok = _next_token(out.logits[:, -1], temperature, generator)
            ids = torch.cat([ids, tok], 1)
            if i + 1 < n_new:
                out = model(tok, use_cache=True, **{kw: out[kw]})
    return ids


def teacher_sequences(teacher, windows: Tensor, *, prompt_len: int, temperature: float = 1.0, seed: int = 0,
                      batch_size: int = 8, bf16: bool = False, progress: bool = True) -> Tensor:
    """Sequence-level KD data: keep each row's first ``prompt_len`` tokens, let the teacher write the
    rest (Kim & Rush, arXiv 1606.07947). (n, L) -> (n, L)"""
    n, L = windows.shape
    if not 0 < prompt_len < L:
        raise InputError(f"prompt_len must be between 1 and seq_len - 1 = {L - 1}, got {prompt_len}")
    out = []
    for s in bar(range(0, n, batch_size), desc="teacher sequences", enabled=progress):
        g = _generator(seed, 31, s)
        out.append(sample(teacher, windows[s : s + batch_size, :prompt_len], L - prompt_len,
                          temperature=temperature, generator=g, bf16=bf16))
    return torch.cat(out)


# ---- cached teacher top-k ------------------------------------------------------------------


@torch.no_grad()
def teacher_topk(teacher, ids: Tensor, k: int, temperature: float = 1.0, bf16: bool = False):
    """``(values fp16 (B, L-1, k), indices int32 (B, L-1, k))``: top-k teacher log-probs predicting tokens 1..L-1."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = _logits(teacher(ids, use_cache=False) if _cache_kw(teacher) else teacher(ids))
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # (B, L-1, V)
    v, i = logp.topk(k, dim=-1)
    return v.half(), i.int()


def cache_teacher_topk(teacher, windows: Tensor, out, *, k: int = 64, temperature: float = 1.0,
                       batch_size: int = 8, shard_rows: int = 256, bf16: bool = False, progress: bool = True,
                       overwrite: bool = False) -> Path:
    """Run the teacher once over ``windows`` (n, L) and save its top-k log-probs to the folder ``out``.

    Layout: ``meta.json`` (version, k, temperature, vocab, rows, seq_len, shard_rows) and shards
    ``topk-00000.safetensors`` ... each with ``input_ids`` int32 (r, L), ``values`` float16
    (r, L-1, k) and ``indices`` int32 (r, L-1, k). Written to a temporary folder, then renamed.
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; choose another folder or pass overwrite=True")
    n, L = windows.shape
    vocab = _vocab(teacher)
    if not 0 < k <= vocab:
        raise InputError(f"top-k must be between 1 and the vocabulary size {vocab}, got {k}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for si, s in enumerate(bar(range(0, n, shard_rows), desc="teacher top-k", enabled=progress)):
            rows = windows[s : s + shard_rows]
            parts = [teacher_topk(teacher, rows[b : b + batch_size], k, temperature, bf16) for b in range(0, len(rows), batch_size)]
            save_file({"input_ids": rows.int().contiguous(), "values": torch.cat([p[0] for p in parts]).contiguous(),
                       "indices": torch.cat([p[1] for p in parts]).contiguous()}, str(tmp / f"topk-{si:05d}.safetensors"))
        meta = {"version": CACHE_VERSION, "k": k, "temperature": temperature, "vocab": vocab, "rows": n,
                "seq_len": L, "shard_rows": shard_rows}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure(e, out.parent)
        if reason:
            raise InputError(f"could not write the top-k cache {out} ({reason}); free space or use another --topk-cache") from None
        raise
    return out


def _vocab(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise InputError(f"cannot find the output layer of {type(model).__name__} to read its vocabulary size")
    return head.weight.shape[0]


class TopKCache:
    """Read a folder written by :func:`cache_teacher_topk`; rows are fetched shard by shard."""

    def __init__(self, path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            raise InputError(f"{self.path} is not a teacher top-k cache (no meta.json); write one with cache_teacher_topk")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("version", 0) > CACHE_VERSION:
            raise InputError(f"{self.path} was written by a newer lmpress; upgrade lmpress")
        self.k, self.rows, self.seq_len = self.meta["k"], self.meta["rows"], self.meta["seq_len"]
        self.temperature, self.vocab = self.meta["temperature"], self.meta["vocab"]
        n_shards = math.ceil(self.rows / self.meta["shard_rows"])
        missing = [i for i in range(n_shards) if not self._shard(i).exists()]
        if missing:
            raise InputError(f"{self.path} lacks shard(s) {missing[:3]}; the cache is incomplete, write it again")

    def _shard(self, i: int) -> Path:
        return self.path / f"topk-{i:05d}.safetensors"

    def __len__(self) -> int:
        return self.rows

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.glob("topk-*.safetensors"))

    def get(self, rows: Tensor):
        """``(input_ids (b, L) long, values (b, L-1, k) fp16, indices (b, L-1, k) long)`` of the given rows."""
        from safetensors import safe_open

        per = self.meta["shard_rows"]
        out = {"input_ids": [], "values": [], "indices": []}
        for r in rows.tolist():
            with safe_open(str(self._shard(r // per)), framework="pt") as f:
                for name in out:
                    out[name].append(f.get_slice(name)[r % per : r % per + 1])
        ids, vals, idx = (torch.cat(out[n]) for n in ("input_ids", "values", "indices"))
        return ids.long(), vals, idx.long()

    def windows(self) -> Tensor:
        """All cached input rows. (rows, L)"""
        return self.get(torch.arange(self.rows))[0]


def teacher_buckets(values: Tensor, vocab: int) -> Tensor:
    """Teacher bucket log-probs (B, T, k + 1) from cached top-k log-probs (B, T, k): the tail mass
    ``1 - sum_i p_i`` floored at :data:`TAIL_FLOOR`, all buckets renormalised to sum to 1
    (``k`` buckets, renormalised, when ``k == vocab``)."""
    logp_top = values.float()
    if values.shape[-1] == vocab:
        return logp_top - logp_top.logsumexp(-1, keepdim=True)
    p_tail = (1 - logp_top.exp().sum(-1, keepdim=True)).clamp_min(TAIL_FLOOR)  # (B, T, 1)
    logp = torch.cat([logp_top, p_tail.log()], -1)
    return logp - logp.logsumexp(-1, keepdim=True)


def topk_log_probs(student: Tensor, values: Tensor, indices: Tensor, temperature: float = 1.0):
    """Bucket log-probabilities ``(log p, log q, counts)`` over the ``k`` cached tokens plus a tail.

    ``student`` (B, T, V) logits; ``values`` (B, T, k) teacher log-probs at ``temperature``;
    ``indices`` (B, T, k). Returns ``(B, T, k + 1)`` tensors (``k`` when ``k == V``: no tail) and
    ``counts``, the vocabulary entries per bucket (for label smoothing).
    """
    V, k = student.shape[-1], indices.shape[-1]
    logq_all = F.log_softmax(student.float() / temperature, dim=-1)  # (B, T, V)
    logq_top = logq_all.gather(-1, indices)  # (B, T, k)
    logp = teacher_buckets(values, V)
    if k == V:
        return logp, logq_top, torch.ones(k)
    # student tail: the exact log of the mass outside the top-k, stable and differentiable
    logq_tail = logq_all.scatter(-1, indices, float("-inf")).logsumexp(-1, keepdim=True)  # (B, T, 1)
    counts = torch.cat([torch.ones(k), torch.tensor([float(V - k)])])
    return logp, torch.cat([logq_top, logq_tail], -1), counts


def topk_teacher_nll(logp_buckets: Tensor, indices: Tensor, targets: Tensor) -> Tensor:
    """The teacher's cross-entropy on ``targets`` from the buckets: the stored log-prob when the
    target is among the top-k, else the log of the whole tail mass (an upper bound of its
    probability, so a lower bound of the cross-entropy). (B, T)"""
    k = indices.shape[-1]
    hit = indices == targets.unsqueeze(-1)  # (B, T, k)
    in_top = hit.any(-1)
    top = (logp_buckets[..., :k] * hit).sum(-1)
    tail = logp_buckets[..., k] if logp_buckets.shape[-1] > k else torch.full_like(top, float("-inf"))
    return -torch.where(in_top, top, tail)


def topk_loss(name: str, student: Tensor, values: Tensor, indices: Tensor, mask=None, *, targets=None,
              temperature: float = 1.0, label_smoothing: float = 0.0, reduction: str = "mean", **kw) -> Tensor:
    """Distillation loss ``name`` (see :mod:`lmpress.distill.losses`) against cached top-k teacher
    predictions. ``kw``: beta, alpha, gamma, tau. TSLD needs ``targets``."""
    from .losses import divergence_loss, smooth

    logp, logq, counts = topk_log_probs(student, values, indices, temperature)
    nll = topk_teacher_nll(logp, indices, targets) if targets is not None else None
    logp = smooth(logp, label_smoothing, counts)
    return divergence_loss(name, logp, logq, mask, teacher_nll=nll, temperature=temperature, reduction=reduction, **kw)
