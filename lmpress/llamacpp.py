"""A GGUF file measured inside llama.cpp itself (through llama-cpp-python), by lmpress's protocol.

``lmpress eval model.gguf --engine llama.cpp`` runs the file in the engine its users run, and reports
beside lmpress's own figures (the file dequantized to float and run in PyTorch):

- perplexity on exactly the windows :func:`lmpress.evaluate.perplexity` scores (the same token ids,
  windows of ``context - 1`` text tokens after BOS, the same scored positions), from llama.cpp's logits
  of every position (``logits_all``); the math is :mod:`lmpress.evaluate`'s own, run on
  :class:`LlamaCppLM`, which answers its one call (``lm(ids).logits``) from llama.cpp;
- KL(reference || llama.cpp) and top-1 agreement per token against ``reference`` (lmpress's float forward
  of the reference model, :func:`lmpress.evaluate.compare`);
- batch-1 prefill and decode tokens/s as llama.cpp's own timers count them (``llama_perf_context``:
  the time inside ``llama_decode``, no Python).

llama.cpp rounds activations to 8 bits in its quantized matmuls and keeps the KV cache in fp16, so its
figures differ slightly from the dequantized float model's even for the same weights.

Optional: ``pip install 'lmpress[llamacpp]'`` (llama-cpp-python compiles llama.cpp from source).

    >>> lm = LlamaCppLM.open("model.Q4_K.gguf", context=512)
    >>> evaluate.perplexity(lm, stream, context=512, bos=tok.bos_token_id)
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch

from .errors import InputError

EXTRA = "pip install 'lmpress[llamacpp]'"


def require():
    """The ``llama_cpp`` module, or an InputError that names the extra to install."""
    try:
        import llama_cpp
    except ImportError as e:
        raise InputError(f"--engine llama.cpp needs llama-cpp-python, which is not installed ({e}); install it with "
                         f"{EXTRA} (it compiles llama.cpp: a few minutes, once)") from None
    return llama_cpp


def check_gguf(path) -> Path:
    """``path`` as a GGUF file llama.cpp can be given, checked before any work."""
    path = Path(str(path)).expanduser()
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise InputError(f"--engine llama.cpp runs a .gguf file; {str(path)!r} is not one "
                         "(write one with lmpress compress ... --format gguf:TYPE)")
    return path


def threads() -> int:
    """Threads for llama.cpp: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def open_llama(path, *, n_ctx: int, logits_all: bool, n_threads: int | None = None):
    """A ``llama_cpp.Llama`` on ``path``: one sequence of up to ``n_ctx`` tokens evaluated as one batch."""
    llama_cpp = require()
    path = check_gguf(path)
    n = n_threads or threads()
    try:
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                               n_threads=n, n_threads_batch=n, verbose=False)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise InputError(f"llama.cpp cannot load {path} ({e}); the file is damaged or of an architecture or type "
                         "this llama.cpp does not know") from None


class LlamaCppLM:
    """llama.cpp behind the one call lmpress's evaluation makes of a model: ``lm(ids).logits``.

    ``ids`` (B, T) token ids -> ``logits`` (B, T, V) float32, each row evaluated from an empty KV cache
    (as a fresh forward of a Hugging Face model is)."""

    def __init__(self, llm):
        self.llm = llm
        self.config = SimpleNamespace(vocab_size=llm.n_vocab())

    @classmethod
    def open(cls, path, *, context: int, n_threads: int | None = None) -> "LlamaCppLM":
        return cls(open_llama(path, n_ctx=context, logits_all=True, n_threads=n_threads))

    def __call__(self, ids: torch.Tensor, **_) -> SimpleNamespace:
        rows = []
        for row in ids.tolist():  # (T,)
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(self.llm.scores[: len(row)].copy()))  # (T, V)
        return SimpleNamespace(logits=torch.stack(rows))  # (B, T, V)

    def close(self) -> None:
        self.llm.close()


def check_vocab(lm: LlamaCppLM, reference) -> None:
    """KL needs the reference to predict the same tokens as the GGUF file."""
    ref = reference.get_output_embeddings().out_features
    if ref != lm.config.vocab_size:
        raise InputError(f"the reference model predicts {ref:,} tokens, the GGUF file {lm.config.vocab_size:,}: KL "
                         "needs the same vocabulary; give a --reference with the file's tokenizer")


def speed(path, *, prompt_tokens=256, new_tokens=32, repeats=3, n_threads=None):
    """Batch-1 prefill and greedy decode throughput of ``path`` in llama.cpp, from llama.cpp's own timers
    (``llama_perf_context``); the prompt is :func:`lmpress.evaluate.speed`'s (seeded random ids); best of
    ``repeats``. Returns :class:`lmpress.evaluate.Speed`."""
    import numpy as np

    from .evaluate import Speed

    llama_cpp = require()
    llm = open_llama(path, n_ctx=prompt_tokens + new_tokens, logits_all=False, n_threads=n_threads)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, llm.n_vocab(), (prompt_tokens,), generator=g).tolist()
    best_p = best_d = 0.0
    try:
        for _ in range(repeats):
            llm.reset()
            llama_cpp.llama_perf_context_reset(llm.ctx)
            llm.eval(prompt)
            for _ in range(new_tokens):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
                llm.eval([int(logits.argmax())])
            perf = llama_cpp.llama_perf_context(llm.ctx)
            best_p = max(best_p, 1e3 * perf.n_p_eval / perf.t_p_eval_ms)
            best_d = max(best_d, 1e3 * perf.n_eval / perf.t_eval_ms)
    finally:
        llm.close()
    return Speed(best_p, best_d, prompt_tokens, new_tokens)


def evaluate_gguf(path, stream, *, context=512, bos=None, reference=None, measure_speed=True, n_threads=None,
                  progress=False) -> dict:
    """Perplexity (and KL, top-1 against ``reference``) of the GGUF file ``path`` run in llama.cpp, on
    lmpress's windows of ``stream``; with ``measure_speed`` also prefill and decode tokens/s in llama.cpp.
    Keys as :func:`lmpress.evaluate` names them, plus ``engine`` and ``threads``."""
    from .evaluate import as_dict, compare, perplexity

    require()
    path = check_gguf(path)
    lm = LlamaCppLM.open(path, context=context, n_threads=n_threads)
    try:
        if reference is not None:
            check_vocab(lm, reference)
        ppl = perplexity(lm, stream, context=context, bos=bos, progress=progress)
        res = {"engine": "llama.cpp", "threads": n_threads or threads(), "context": context, "perplexity": ppl.ppl,
               "nll": ppl.nll, "eval_tokens": ppl.tokens, "eval_seconds": ppl.seconds, "disk_bytes": path.stat().st_size}
        if reference is not None:
            agr = compare(lm, reference, stream, context=context, bos=bos, progress=progress)
            res.update(kl=agr.kl, top1=agr.top1)
    finally:
        lm.close()
    if measure_speed:
        res.update(as_dict(speed(path, n_threads=n_threads)))
    return res
