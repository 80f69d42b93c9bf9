"""Honest measurements: perplexity, KL to a reference model, zero-shot multiple choice, size, memory, speed.

Perplexity protocol (``perplexity``): the evaluation token stream is cut into non-overlapping
windows of ``context - 1`` text tokens; each window is prefixed with the BOS token (when the
tokenizer has one) and every text token of the window is predicted, the first one from BOS alone.
Perplexity is ``exp`` of the mean negative log-likelihood over all predicted tokens (token-level).
A trailing partial window is dropped. With ``stride < context - 1`` windows overlap and only the
last ``stride`` tokens of each window after the first are scored (sliding-window evaluation).

KL (``compare``): on the same windows, the mean over predicted tokens of
``KL(p_reference || p_model)`` in nats, and the fraction of tokens where the two models' argmax
agree (top-1 agreement).
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import asdict, dataclass

import torch

from .errors import InputError
from .progress import bar

LOGIT_BYTES = 256 << 20  # logits held at once, bounds the batch of windows


def windows(stream: torch.Tensor, context: int, bos: int | None, stride: int | None = None):
    """``(ids (W, context), score_from)``: token windows and the first scored position per window."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise InputError(f"--context must be a whole number of at least 2 tokens, got {context!r}")
    body = context - (bos is not None)
    stride = stride or body
    rows, starts = [], []
    for i, s in enumerate(range(0, len(stream) - body + 1, stride)):
        rows.append(stream[s : s + body])
        starts.append(0 if i == 0 else body - stride)
    if not rows:
        raise InputError(f"the evaluation stream has {len(stream)} tokens, fewer than one window of {body}: "
                         "raise --eval-tokens or lower --context")
    ids = torch.stack(rows)  # (W, body)
    if bos is not None:
        ids = torch.cat([torch.full((len(rows), 1), bos, dtype=torch.long), ids], dim=1)  # (W, context)
    return ids, starts


def _batches(model, ids: torch.Tensor, progress: bool, desc: str):
    """Yield ``(start_row, log_probs (b, T, V) float32)`` for batches of windows (a streamed model,
    :class:`lmpress.stream.StreamedModel`: the same batches, its blocks read one at a time)."""
    vocab = model.config.vocab_size
    per_row = ids.shape[1] * vocab * 4 * 2
    b = max(1, min(len(ids), LOGIT_BYTES // per_row))
    if getattr(model, "streamed", False):
        yield from model.log_probs(ids, b, progress, desc)
        return
    for s in bar(range(0, len(ids), b), desc=desc, enabled=progress):
        with torch.inference_mode():  # never yield inside: a suspended generator would leave it on
            logp = torch.log_softmax(model(ids[s : s + b], use_cache=False).logits.float(), dim=-1)
        yield s, logp


@dataclass
class Perplexity:
    ppl: float
    nll: float
    tokens: int
    seconds: float


def perplexity(model, stream, *, context=512, bos=None, stride=None, progress=False) -> Perplexity:
    """Token-level perplexity of ``model`` on ``stream`` (1-D token ids), protocol in module doc."""
    ids, starts = windows(stream, context, bos, stride)
    t0 = time.perf_counter()
    total, count = 0.0, 0
    for s, logp in _batches(model, ids, progress, "perplexity"):
        for j in range(logp.shape[0]):
            lp, row, first = logp[j, :-1], ids[s + j, 1:], starts[s + j]
            nll = -lp.gather(-1, row[:, None])[first:, 0]  # (scored,)
            total += nll.double().sum().item()
            count += nll.numel()
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, time.perf_counter() - t0)


@dataclass
class Agreement:
    kl: float  # mean KL(reference || model), nats per token
    top1: float  # fraction of tokens with the same argmax
    tokens: int


def compare(model, reference, stream, *, context=512, bos=None, progress=False) -> Agreement:
    """Per-token KL divergence and top-1 agreement of ``model`` against ``reference``."""
    vocab = [getattr(m.get_output_embeddings(), "out_features", None) if hasattr(m, "get_output_embeddings") else None
             for m in (model, reference)]
    if None not in vocab and vocab[0] != vocab[1]:
        raise InputError(f"the reference model predicts {vocab[1]:,} tokens, the model {vocab[0]:,}: KL needs the same "
                         "vocabulary; give a --reference with the model's tokenizer")
    ids, _ = windows(stream, context, bos)
    kl_sum, agree, count = 0.0, 0, 0
    ref_iter = _batches(reference, ids, False, "")
    for (_, lp), (_, lq) in zip(_batches(model, ids, progress, "KL"), ref_iter):
        lp, lq = lp[:, :-1], lq[:, :-1]  # (b, T-1, V): predictions of the text tokens
        kl = (lq.exp() * (lq - lp)).sum(-1)  # (b, T-1)
        kl_sum += kl.double().sum().item()
        agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
        count += kl.numel()
    return Agreement(kl_sum / count, agree / count, count)


# ---- multiple choice -----------------------------------------------------------------------


@dataclass
class MCResult:
    acc: float  # argmax of summed log-likelihood
    acc_norm: float  # argmax of log-likelihood per character of the choice
    items: int


def choice_logliks(model, tokenizer, prompt: str, choices: list[str]) -> list[float]:
    """log p(choice | prompt) of each choice, summed over its tokens.

    The prompt runs once; its KV cache, repeated per choice, serves one batched forward of the choices
    (right-padded: a causal model's logits at a real position never see the padding after it). The
    logits are the ones a forward of ``prompt + choice`` gives (up to float rounding; tested).
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    p = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    cs = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    width = max(map(len, cs))
    rows = torch.tensor([c + [c[-1]] * (width - len(c)) for c in cs])
    import inspect

    # transformers 5.25 renamed the argument and the output field past_key_values -> cache
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = model(torch.tensor([p]), use_cache=True)
        cache = out[key]
        cache.batch_repeat_interleave(len(cs))
        first = torch.log_softmax(out.logits[0, -1].float(), -1)  # predicts each choice's first token
        logp = torch.log_softmax(model(rows, use_cache=True, **{key: cache}).logits.float(), -1)
    return [first[c[0]].item() + logp[i, : len(c) - 1].gather(-1, torch.tensor(c[1:])[:, None]).sum().item()
            for i, c in enumerate(cs)]


def choice_loglik(model, tokenizer, prompt: str, choice: str) -> float:
    """log p(choice | prompt), summed over the choice's tokens."""
    return choice_logliks(model, tokenizer, prompt, [choice])[0]


def multiple_choice(model, tokenizer, items, *, progress=False) -> MCResult:
    """Zero-shot accuracy. ``items``: dicts with ``prompt``, ``choices`` (list[str]), ``answer`` (int)."""
    hits = hits_norm = 0
    for it in bar(items, desc="multiple choice", enabled=progress):
        ll = choice_logliks(model, tokenizer, it["prompt"].rstrip(), [" " + c.strip() for c in it["choices"]])
        norm = [v / max(1, len(c.strip()) + 1) for v, c in zip(ll, it["choices"])]
        hits += int(max(range(len(ll)), key=ll.__getitem__) == it["answer"])
        hits_norm += int(max(range(len(norm)), key=norm.__getitem__) == it["answer"])
    n = len(items)
    return MCResult(hits / n, hits_norm / n, n)


# ---- size, memory, speed -------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensor_bytes(model) -> int:
    """Bytes of all parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@dataclass
class Speed:
    prefill_tps: float  # prompt tokens per second, batch 1
    decode_tps: float  # generated tokens per second, batch 1, greedy with a KV cache
    prompt_tokens: int
    new_tokens: int


def speed(model, *, prompt_tokens=256, new_tokens=32, repeats=3, vocab_hi=None, compiled=False) -> Speed:
    """Batch-1 prefill and decode throughput; the best of ``repeats`` runs (noisy machines).

    ``compiled``: decode as transformers' fast path does, a static KV cache and the decode step through
    ``torch.compile`` (compiled once per model and shape, before the timed runs; prefill stays eager).
    The timed compiled runs evaluate only the guards that tell compiled graphs apart
    (``skip_guard_eval_unsafe``: the full guards of a 30-layer model cost milliseconds per token); they
    call the step exactly as the warm-up did, which compiled it under the full guards.
    """
    vocab = vocab_hi or model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, prompt_tokens), generator=g)
    if compiled:  # compile outside the timing, for the static cache length of the timed runs
        _timed_decode(model, prompt, 2, compiled, cache_len=prompt_tokens + new_tokens)
    best_p = best_d = float("inf")
    for _ in range(repeats):
        _, t_prefill, t_decode = _timed_decode(model, prompt, new_tokens, compiled, warm=compiled)
        best_p, best_d = min(best_p, t_prefill), min(best_d, t_decode)
    return Speed(prompt_tokens / best_p, new_tokens / best_d, prompt_tokens, new_tokens)


def greedy_decode(model, prompt: torch.Tensor, new_tokens: int, compiled: bool = False) -> torch.Tensor:
    """Greedy continuation of ``prompt`` (1, L) with a KV cache: the new token ids (1, new_tokens)."""
    return _timed_decode(model, prompt, new_tokens, compiled)[0]


def _timed_decode(model, prompt, new_tokens, compiled, cache_len=None, warm=False):
    """(new token ids (1, n), prefill seconds, decode seconds); ``cache_len``: of the static cache
    (compiled path; default prompt + new tokens: each length is a graph of its own); ``warm``: the
    compiled step has run at these shapes already, so only differentiating guards are evaluated."""
    n_prompt = prompt.shape[1]
    step = _compiled_step(model) if compiled else model
    toks = []
    stance = torch.compiler.set_stance(skip_guard_eval_unsafe=True) if warm else contextlib.nullcontext()
    with torch.inference_mode(), stance:
        cache_len = cache_len or n_prompt + new_tokens
        kw = {"cache": _static_cache(model, cache_len), "cache_position": torch.arange(n_prompt)} if compiled else {}
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True, **kw)
        t1 = time.perf_counter()
        cache, tok = _cache(out), out.logits[:, -1:].argmax(-1)
        for i in range(new_tokens):
            toks.append(tok)
            pos = {"cache_position": torch.tensor([n_prompt + i])} if compiled else {}
            out = step(input_ids=tok, cache=cache, use_cache=True, **pos)
            cache, tok = _cache(out), out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
    return torch.cat(toks, 1), t1 - t0, t2 - t1


def _static_cache(model, length: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


def _compiled_step(model):
    """``torch.compile`` of the model's forward, made once per model (kept on the instance)."""
    step = model.__dict__.get("_lmpress_compiled_forward")
    if step is None:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # many models per process
        from .attention import use_grouped_sdpa_
        from .quant.fuse import compile_options

        use_grouped_sdpa_(model)  # no copy of the KV cache per key/value group (what eager SDPA does too)
        step = torch.compile(model.forward, dynamic=False, options=compile_options())
        model.__dict__["_lmpress_compiled_forward"] = step
    return step


def _cache(out):
    """The KV cache of a forward's output (``cache`` in transformers 5, ``past_key_values`` before)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def as_dict(*results) -> dict:
    out = {}
    for r in results:
        out.update(asdict(r))
    return out
