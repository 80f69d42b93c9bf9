"""The distillation engine: train any student ``nn.Module`` to match a teacher, on one process or many.

Recipe entry (``lmpress compress --recipe``)::

    - method: prune-width
      target_params: 0.75
    - method: distill          # prune-then-distill (Minitron, arXiv 2407.14679)
      loss: fkl
      tokens: 2000000

    - method: distill          # quantization-aware distillation, float model as teacher
      loss: cakld              # BitDistiller, arXiv 2402.10631 (or tsld, arXiv 2308.06744)
      qat_bits: 2
      qat_group_size: 64

Python::

    from lmpress.distill import DistillConfig, distill
    res = distill(student, teacher, DistillConfig(loss="tsld", tokens=200_000), windows=ids, eval_stream=stream, bos=1)

Each optimizer step (:mod:`lmpress.distill.step`) reads a global batch of ``batch_size`` windows
of ``seq_len`` tokens, normalised so that the gradient is the same whatever the number of processes
or micro-batches. AdamW, linear warmup then cosine decay to ``min_lr * lr``, gradient clipping. A
student holding :class:`lmpress.distill.qat.FakeQuantLinear` layers is trained through their
straight-through estimator (``qat_bits`` inserts them).

With ``checkpoint_dir`` the run is checkpointed and resumes bit for bit
(:mod:`lmpress.distill.checkpoint`); a checkpoint written for other settings, data, student or
teacher is refused. Under ``torchrun`` the trained modules are wrapped in DDP or FSDP2
(:mod:`lmpress.distill.parallel`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..errors import InputError
from ..quant.grid import BITS
from . import data as D
from . import losses as L
from .checkpoint import identity, load_checkpoint, save_checkpoint
from .parallel import dist_setup, gather_student, wrap  # dist_setup: lmpress.distill.cli imports it from here
from .step import Run, Trainee, fetch, forward, hint_projection, train_step


@dataclass(frozen=True)
class DistillConfig:
    """Distillation settings; the same object is the Python argument and the recipe entry."""

    method: ClassVar[str] = "distill"
    family: ClassVar[str] = "distill"

    loss: str = "fkl"  # fkl rkl jsd tv skl srkl tsld cakld, or ce (plain fine-tuning, no teacher)
    temperature: float = 1.0  # softmax temperature of both models; the loss is scaled by T^2
    label_smoothing: float = 0.0  # smoothing of the teacher distribution toward uniform
    beta: float = 0.5  # jsd mixture weight
    alpha: float = 0.1  # skl / srkl skew
    tsld_tau: float = 10.0  # TSLD token-scale temperature
    gamma: float | None = None  # CAKLD confidence; None: estimated on the first batches
    ce_weight: float = 0.0  # adds ce_weight * next-token cross-entropy on the data
    hidden_loss: str | None = None  # mse | cosine: hint loss on hidden states of matched layers
    hidden_weight: float = 1.0
    attention_weight: float = 0.0  # > 0 adds attention-map KL (runs both models with eager attention)
    tokens: int = 2_000_000  # training budget: steps = ceil(tokens / (batch_size * seq_len))
    batch_size: int = 8  # global windows per optimizer step
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per process per step
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps with linear warmup
    min_lr: float = 0.1  # final learning rate as a fraction of lr (cosine decay)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    data: str = "corpus"  # corpus | teacher (sequence-level KD: teacher-written continuations) | calib (the run's
    # calibration rows, the text the recipe's solvers saw; seq_len must be their length)
    topk: int = 0  # > 0: cache the teacher's top-k log-probs once (topk_cache) and train from it
    topk_cache: str | None = None  # folder of the top-k cache (written when missing)
    prompt_len: int = 32  # prompt tokens kept before teacher / on-policy continuations
    sample_temperature: float = 1.0  # sampling temperature for teacher and on-policy sequences
    on_policy: float = 0.0  # fraction of steps trained on student-sampled continuations
    eval_every: int = 0  # steps between evaluations (perplexity, KL to the teacher); 0: none
    eval_context: int = 512
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # steps between checkpoints (and one at the end); 0: end only
    seed: int = 0
    bf16: bool = False  # bfloat16 autocast for both models' forward (fp32 master weights and loss)
    fsdp: bool = False  # under torchrun: FSDP2 fully_shard instead of DistributedDataParallel
    qat_bits: int | None = None  # fake-quantize the student's block linears before training
    qat_group_size: int = 64
    qat_learn_clip: bool = True
    qat_init_clip: str | None = "mse"
    clip_lr: float | None = None  # learning rate of the QAT clipping ratios (None: lr)
    qat_output: str = "packed"  # after training: "packed" QuantLinear layers (bits in grid.BITS) or "float" nn.Linear
    train: str = "weights"  # weights: every parameter of the student | scales: only the fp16 block scales (and
    # minima) of layers solved on llama.cpp's grids, codes fixed (lmpress.distill.scales)

    @property
    def needs_calibration(self) -> bool:  # data: calib trains on the run's calibration rows
        return self.data == "calib"

    def __post_init__(self):
        if self.loss not in L.LOSS_NAMES + ("ce",):
            raise ValueError(f"loss must be one of {', '.join(L.LOSS_NAMES + ('ce',))}, got {self.loss!r}")
        if self.hidden_loss not in (None, *L.HIDDEN_LOSSES):
            raise ValueError(f"hidden_loss must be one of {', '.join(L.HIDDEN_LOSSES)} or None, got {self.hidden_loss!r}")
        _positive(self, "temperature", "tokens", "batch_size", "seq_len", "grad_accum", "lr", "tsld_tau")
        _unit(self, "label_smoothing", "on_policy", "warmup", "min_lr")
        if not 0 < self.beta < 1 or not 0 <= self.alpha < 1:
            raise ValueError(f"need 0 < beta < 1 and 0 <= alpha < 1, got beta={self.beta}, alpha={self.alpha}")
        if self.gamma is not None and not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must lie in [0, 1], got {self.gamma}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        if self.data not in ("corpus", "teacher", "calib"):
            raise ValueError(f"data must be 'corpus', 'teacher' or 'calib', got {self.data!r}")
        if self.train not in ("weights", "scales"):
            raise ValueError(f"train must be 'weights' or 'scales', got {self.train!r}")
        if self.train == "scales" and self.qat_bits:
            raise ValueError("train='scales' tunes layers already solved on a grid; qat_bits makes new fake-quantized "
                             "ones: use one or the other")
        if (self.on_policy or self.data == "teacher") and not 0 < self.prompt_len < self.seq_len:
            raise ValueError(f"prompt_len must lie between 1 and seq_len - 1, got {self.prompt_len}")
        if self.topk and (self.on_policy or self.hidden_loss or self.attention_weight):
            raise ValueError("a top-k teacher cache holds logits only: it cannot serve on_policy, hidden_loss or attention_weight")
        if self.topk and not self.topk_cache:
            raise ValueError("topk > 0 needs topk_cache, the folder to keep the cached teacher predictions in")
        if self.loss == "ce" and (self.hidden_loss or self.attention_weight or self.on_policy or self.topk):
            raise ValueError("loss='ce' is plain fine-tuning without a teacher: drop hidden/attention/on-policy/top-k options")
        if self.qat_bits is not None and not 1 <= self.qat_bits <= 8:
            raise ValueError(f"qat_bits must be 1-8 or None, got {self.qat_bits}")
        if self.qat_output not in ("packed", "float"):
            raise ValueError(f"qat_output must be 'packed' or 'float', got {self.qat_output!r}")
        if self.qat_bits and self.qat_output == "packed" and self.qat_bits not in BITS:
            raise ValueError(f"packed output holds {BITS} bits, not {self.qat_bits}; use qat_output='float'")


def _positive(cfg, *names):
    for n in names:
        if not getattr(cfg, n) > 0:
            raise ValueError(f"{n} must be > 0, got {getattr(cfg, n)}")


def _unit(cfg, *names):
    for n in names:
        if not 0 <= getattr(cfg, n) <= 1:
            raise ValueError(f"{n} must lie in [0, 1], got {getattr(cfg, n)}")


def total_steps(cfg: DistillConfig) -> int:
    return math.ceil(cfg.tokens / (cfg.batch_size * cfg.seq_len))


# ---- setup: optimizer, schedule, CAKLD gamma --------------------------------------------------


def make_optimizer(model: nn.Module, cfg: DistillConfig):
    """``(AdamW, trainable params)``; QAT clipping ratios get ``clip_lr`` and no weight decay."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    clip = [p for n, p in named if n.endswith(("clip_lo", "clip_hi"))]
    rest = [p for n, p in named if not n.endswith(("clip_lo", "clip_hi"))]
    groups = [{"params": rest}]
    if clip:
        groups.append({"params": clip, "lr": cfg.clip_lr or cfg.lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay), rest + clip


def cosine_schedule(optimizer, cfg: DistillConfig, steps: int):
    """Linear warmup over ``warmup * steps`` steps, then cosine decay from lr to ``min_lr * lr``."""
    warm = int(cfg.warmup * steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, steps - warm))
        return cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def estimate_gamma(run: Run, batches: int = 4) -> float:
    """CAKLD's gamma: the teacher's mean probability of the next token over the first ``batches`` steps' data."""
    total = torch.zeros(2, dtype=torch.float64)
    for step in range(min(batches, total_steps(run.cfg))):
        rows = D.batch_rows(len(run.source), run.cfg.batch_size, step, run.cfg.seed)
        per = run.cfg.batch_size // run.world
        b = fetch(run, rows[run.rank * per : (run.rank + 1) * per])
        targets = b["ids"][:, 1:]
        if "values" in b:
            logp = D.teacher_buckets(b["values"], run.source.vocab)
            nll = D.topk_teacher_nll(logp, b["indices"], targets)
        else:
            with run.autocast():
                nll = L.token_nll(forward(run.teacher, b["ids"])["logits"][:, :-1], targets)
        total += torch.tensor([(-nll).exp().sum().item(), nll.numel()], dtype=torch.float64)
    if run.world > 1:
        torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


# ---- the training loop ---------------------------------------------------------------------------


def _check_models(student, teacher, cfg: DistillConfig, cached: bool) -> None:
    if cfg.loss == "ce":
        return
    if teacher is None and not cached:
        raise InputError(f"loss {cfg.loss!r} needs a teacher model; give one, or use loss='ce' for plain fine-tuning")
    if teacher is not None and hasattr(student, "get_output_embeddings") and hasattr(teacher, "get_output_embeddings"):
        vs, vt = D._vocab(student), D._vocab(teacher)
        if vs != vt:
            raise InputError(f"student vocabulary ({vs}) differs from the teacher's ({vt}); distillation needs the same tokenizer")


def _check_cache(student, cache) -> None:
    if cache is not None and hasattr(student, "get_output_embeddings") and D._vocab(student) != cache.vocab:
        raise InputError(f"student vocabulary ({D._vocab(student)}) differs from the cached teacher's ({cache.vocab})")


def _set_eager(models, on: bool) -> list:
    """Switch models to eager attention (needed for attention maps); returns their previous settings."""
    prev = []
    for m in models:
        prev.append(m.config._attn_implementation)
        if on:
            m.set_attn_implementation("eager")
    return prev


def _evaluate(run: Run, eval_stream, bos, step: int) -> dict:
    from ..evaluate import compare, perplexity

    student = run.trainee.student
    was = student.training
    student.eval()
    # the outer inference_mode restores the grad mode on exit, whatever the evaluators leave set
    with torch.inference_mode(), run.autocast():
        ppl = perplexity(student, eval_stream, context=run.cfg.eval_context, bos=bos)
        agr = compare(student, run.teacher, eval_stream, context=run.cfg.eval_context, bos=bos) if run.teacher is not None else None
    student.train(was)
    out = {"step": step, "perplexity": ppl.ppl}
    if agr is not None:
        out.update(kl=agr.kl, top1=agr.top1)
    return out


def _postfix(pbar, rec: dict, tok_s: float) -> None:
    if hasattr(pbar, "set_postfix"):
        pbar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tok_s:.0f}")


def distill(student: nn.Module, teacher: nn.Module | None, cfg: DistillConfig, *, windows=None, cache=None,
            eval_stream=None, bos=None, progress: bool = True, callback=None) -> dict:
    """Train ``student`` in place toward ``teacher`` on ``windows`` (n, L) or a top-k ``cache``.

    ``eval_stream`` (1-D token ids) with ``cfg.eval_every`` gives perplexity and KL to the teacher
    at step 0, every ``eval_every`` steps and at the end. ``callback(record)`` is called after every
    step (after its checkpoint). Returns the figures and the per-step history.
    """
    from .qat import to_fake_quant_
    from .scales import tune_scales_

    _check_models(student, teacher, cfg, cache is not None)
    _check_cache(student, cache)
    source = cache if cache is not None else windows
    if source is None or len(source) == 0:
        raise InputError("no training data: give windows (n, seq_len token ids) or a top-k cache")
    seq_len = source.shape[1] if isinstance(source, torch.Tensor) else source.seq_len
    if seq_len != cfg.seq_len:
        raise InputError(f"the training windows have {seq_len} tokens, the config asks for seq_len={cfg.seq_len}")
    rank, world = dist_setup()
    if cfg.batch_size % (world * cfg.grad_accum):
        raise InputError(f"batch_size {cfg.batch_size} must be a multiple of processes x grad_accum = {world} x {cfg.grad_accum}")
    torch.manual_seed(cfg.seed)
    if cfg.qat_bits:
        to_fake_quant_(student, cfg.qat_bits, cfg.qat_group_size, learn_clip=cfg.qat_learn_clip, init_clip=cfg.qat_init_clip)
    if cfg.train == "scales" and not tune_scales_(student):
        raise InputError("train: scales trains the stored scales of layers solved on llama.cpp's grids, and this model "
                         "has none: put the step after a gptq / awq / rtn step with --format gguf:TYPE")
    pairs, proj = hint_projection(student, teacher, cfg)
    prev_attn = _set_eager([student, teacher], True) if cfg.attention_weight else None
    if teacher is not None:
        teacher.eval()
    student.train()
    trainee = Trainee(student, proj)
    ident = identity(source, trainee, teacher) if cfg.checkpoint_dir else None  # the initial, unwrapped weights
    run = Run(cfg, wrap(trainee, cfg, world), trainee, teacher, source, rank, world, cfg.gamma, pairs)
    try:
        with torch.inference_mode(False), torch.enable_grad():  # whatever grad mode the caller left set
            res = _train(run, eval_stream, bos, progress, callback, ident)
        if world > 1 and cfg.fsdp:
            res["student_state"] = gather_student(run)
        return res
    finally:
        student.eval()
        if prev_attn is not None:
            for m, impl in zip([student, teacher], prev_attn):
                m.set_attn_implementation(impl)


def _train(run: Run, eval_stream, bos, progress: bool, callback, ident: dict | None) -> dict:
    from ..progress import bar

    cfg = run.cfg
    optimizer, params = make_optimizer(run.model, cfg)
    steps = total_steps(cfg)
    scheduler = cosine_schedule(optimizer, cfg, steps)
    ck_path = Path(cfg.checkpoint_dir) / "checkpoint.pt" if cfg.checkpoint_dir else None
    history, evals, start = [], [], 0
    if ck_path is not None and ck_path.exists():
        ck = load_checkpoint(ck_path, run, optimizer, scheduler, ident)
        start, history, evals = ck["step"], ck["history"], ck["evals"]
    if cfg.loss == "cakld" and run.gamma is None:
        run.gamma = estimate_gamma(run)
    evaluating = eval_stream is not None and cfg.eval_every > 0 and (run.rank == 0 or cfg.fsdp)
    if evaluating and start == 0:
        evals.append(_evaluate(run, eval_stream, bos, 0))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    train_s, t_start = 0.0, time.perf_counter()
    pbar = bar(range(start, steps), desc="distill", total=steps - start, enabled=progress and run.rank == 0)
    for step in pbar:
        t0 = time.perf_counter()
        rec = train_step(run, step, optimizer, scheduler, params)
        train_s += time.perf_counter() - t0
        rec["tokens"] = (step + 1) * tokens_per_step
        history.append(rec)
        _postfix(pbar, rec, (step + 1 - start) * tokens_per_step / train_s)
        done = step + 1
        if evaluating and (done % cfg.eval_every == 0 or done == steps):
            evals.append(_evaluate(run, eval_stream, bos, done))
        if ck_path is not None and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == steps):
            save_checkpoint(ck_path, run, optimizer, scheduler, done, {"history": history, "evals": evals, **ident})
        if callback is not None:
            callback(rec)
    run_tokens = (steps - start) * tokens_per_step
    n_rows = len(run.source)
    return {
        "steps": steps, "resumed_from": start, "tokens": steps * tokens_per_step,
        "epochs": steps * cfg.batch_size / n_rows, "train_rows": n_rows,
        "train_seconds": train_s, "wall_seconds": time.perf_counter() - t_start,
        "tokens_per_s": run_tokens / train_s if train_s else None,
        "loss_first": history[0]["loss"] if history else None, "loss_last": history[-1]["loss"] if history else None,
        "on_policy_steps": sum(r["on_policy"] for r in history), "gamma": run.gamma,
        "processes": run.world, "history": history, "evals": evals,
    }


# ---- the recipe entry ------------------------------------------------------------------------------


def training_data(cfg: DistillConfig, teacher, tokenizer, corpus=None, *, progress: bool = True):
    """``(windows, cache)`` for ``cfg``: corpus windows (or teacher-written ones), or a top-k cache
    (written to ``cfg.topk_cache`` on first use)."""
    if cfg.topk and cfg.topk_cache and (Path(cfg.topk_cache) / "meta.json").exists():
        cache = D.TopKCache(cfg.topk_cache)
        if (cache.k, cache.seq_len, cache.temperature) != (cfg.topk, cfg.seq_len, cfg.temperature):
            raise InputError(f"{cfg.topk_cache} holds top-{cache.k} at seq_len {cache.seq_len}, temperature "
                             f"{cache.temperature}; the config asks for top-{cfg.topk}, {cfg.seq_len}, {cfg.temperature}")
        return None, cache
    rows = total_steps(cfg) * cfg.batch_size  # one epoch when the corpus holds enough text
    windows = D.corpus_windows(tokenizer, corpus, seq_len=cfg.seq_len, max_rows=rows, seed=cfg.seed)
    if cfg.data == "teacher":
        windows = D.teacher_sequences(teacher, windows, prompt_len=cfg.prompt_len, temperature=cfg.sample_temperature,
                                      seed=cfg.seed, bf16=cfg.bf16, progress=progress)
    if cfg.topk:
        path = D.cache_teacher_topk(teacher, windows, cfg.topk_cache, k=cfg.topk, temperature=cfg.temperature,
                                    bf16=cfg.bf16, progress=progress)
        return None, D.TopKCache(path)
    return windows, None


def calibration_windows(cfg: DistillConfig, calib):
    """The run's calibration rows as training windows (``data: calib``)."""
    if calib is None:
        raise InputError("data: calib trains on the calibration rows of the run, and it has none: put the distill step "
                         "after a calibrated step (gptq, awq, ...) or use data: corpus")
    if calib.shape[1] != cfg.seq_len:
        raise InputError(f"data: calib gives rows of {calib.shape[1]} tokens (--calib-len), the distill step asks "
                         f"seq_len={cfg.seq_len}: make them the same")
    return calib


def finish_fake_quant_(model, cfg: DistillConfig) -> int:
    """After training: fake-quantized layers become packed ``QuantLinear`` layers (``qat_output="packed"``)
    or ``nn.Linear`` layers holding the dequantized weights (``"float"``); layers whose scales trained
    get them back in their bytes (``train="scales"``); returns their count."""
    from .qat import materialize_fake_quant_, pack_fake_quant_
    from .scales import finish_scales_

    if cfg.train == "scales":
        return finish_scales_(model)
    return pack_fake_quant_(model) if cfg.qat_output == "packed" else materialize_fake_quant_(model)


def distill_(model, cfg: DistillConfig, ctx) -> dict:
    """Recipe entry: distill ``model`` toward ``ctx.teacher`` (the uncompressed model) on the
    corpus of ``ctx.data``; fake-quantized layers are packed (or made float) at the end, see
    :func:`finish_fake_quant_`. Returns the figures (history included)."""
    from ..data import DataConfig, prepare

    if ctx.teacher is None and cfg.loss != "ce":
        raise InputError("the distill stage needs the teacher (the original model) in the run context")
    if ctx.tokenizer is None:
        raise InputError("the distill stage needs the tokenizer to build its training windows")
    data = ctx.data or DataConfig()
    if cfg.data == "calib":
        windows, cache = calibration_windows(cfg, ctx.calib), None
    else:
        windows, cache = training_data(cfg, ctx.teacher, ctx.tokenizer, data.corpus, progress=ctx.progress)
    stream = prepare(ctx.tokenizer, data, need_calib=False)[1] if cfg.eval_every else None
    res = distill(model, ctx.teacher, cfg, windows=windows, cache=cache, eval_stream=stream,
                  bos=ctx.tokenizer.bos_token_id, progress=ctx.progress)
    if "student_state" not in res:  # FSDP under torchrun left it sharded: the caller rebuilds it whole first
        res["fake_quant_layers"] = finish_fake_quant_(model, cfg)
    return res
