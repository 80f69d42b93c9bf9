"""One optimizer step of distillation: forward passes, the loss terms of a micro-batch, the update.

One step reads a *global batch* of ``batch_size`` windows (picked by
:func:`lmpress.distill.data.batch_rows` from the step number alone), split over the processes and
then into ``grad_accum`` micro-batches. Each loss term is summed over its tokens (TSLD: its
sequences) and divided by the global count, so the gradient is the same whatever the number of
processes or micro-batches (:mod:`lmpress.distill.parallel` sums the counts and figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import InputError
from . import data as D
from . import losses as L
from .parallel import global_counts, global_means, sync_context

if TYPE_CHECKING:
    from .engine import DistillConfig


# ---- forward passes ---------------------------------------------------------------------------


def _takes(model: nn.Module, name: str) -> bool:
    import inspect

    params = inspect.signature(model.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def forward(model: nn.Module, ids, *, hidden: bool = False, attention: bool = False) -> dict:
    """``{"logits": (B, T, V), "hidden": tuple or None, "attentions": tuple or None}`` of any model:
    a Hugging Face causal LM, or any module returning logits or an object with ``.logits``."""
    kw = {"use_cache": False} if _takes(model, "use_cache") else {}
    if hidden:
        kw["output_hidden_states"] = True
    if attention:
        kw["output_attentions"] = True
    out = model(ids, **kw)
    if isinstance(out, torch.Tensor):
        if hidden or attention:
            raise InputError(f"{type(model).__name__} returns only logits; hidden_loss / attention_weight need a model "
                             "that returns hidden_states / attentions")
        return {"logits": out, "hidden": None, "attentions": None}
    return {"logits": out.logits, "hidden": getattr(out, "hidden_states", None), "attentions": getattr(out, "attentions", None)}


def layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Matched hidden-state indices ``(student j, teacher max(1, round(j * Lt / Ls)))`` for j = 1..Ls
    (index 0 is the embedding output, never matched); the last layers always pair up."""
    return [(j, max(1, round(j * n_teacher / n_student))) for j in range(1, n_student + 1)]


def hint_projection(student, teacher, cfg: DistillConfig):
    """``(pairs, projection or None)`` for the hint losses: the matched layers (:func:`layer_map`) and,
    when the widths differ, a learnt projection of the student's hidden states."""
    if not (cfg.hidden_loss or cfg.attention_weight):
        return None, None
    ns = _n_layers(student)
    nt = _n_layers(teacher)
    pairs = layer_map(ns, nt)
    if not cfg.hidden_loss:
        return pairs, None
    ds, dt = _width(student), _width(teacher)
    return pairs, (L.HiddenProjection(ds, dt, ns) if ds != dt else None)


def _n_layers(model) -> int:
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n is None:
        raise InputError(f"{type(model).__name__} has no config.num_hidden_layers; hidden/attention losses need a Hugging Face model")
    return n


def _width(model) -> int:
    return model.get_input_embeddings().weight.shape[1]


class Trainee(nn.Module):
    """The trained modules: the student and, for hint losses across widths, the projections."""

    def __init__(self, student: nn.Module, proj: nn.Module | None):
        super().__init__()
        self.student, self.proj = student, proj

    def forward(self, ids, hidden: bool = False, attention: bool = False) -> dict:
        out = forward(self.student, ids, hidden=hidden, attention=attention)
        if hidden and self.proj is not None:
            out["hidden"] = [self.proj(i, h) for i, h in enumerate(out["hidden"][1:])]
        elif hidden:
            out["hidden"] = list(out["hidden"][1:])
        return out


# ---- one optimizer step ----------------------------------------------------------------------


@dataclass
class Run:
    """What a training step needs; built once by :func:`distill`."""

    cfg: DistillConfig
    model: nn.Module  # the Trainee, wrapped for DDP/FSDP when distributed
    trainee: Trainee
    teacher: nn.Module | None
    source: Any  # (n, L) windows tensor or a TopKCache
    rank: int = 0
    world: int = 1
    gamma: float | None = None
    pairs: list | None = None  # hidden-state layer pairs

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16)


def fetch(run: Run, rows) -> dict:
    if isinstance(run.source, torch.Tensor):
        return {"ids": run.source[rows]}
    ids, values, indices = run.source.get(rows)
    return {"ids": ids, "values": values, "indices": indices}


def _local_batch(run: Run, step: int) -> tuple[dict, bool]:
    """This process's share of the global batch of ``step``, with its loss mask (b, L-1)."""
    cfg, n = run.cfg, len(run.source)
    rows = D.batch_rows(n, cfg.batch_size, step, cfg.seed)
    per = cfg.batch_size // run.world
    batch = fetch(run, rows[run.rank * per : (run.rank + 1) * per])
    ids = batch["ids"]
    batch["mask"] = torch.ones(ids.shape[0], ids.shape[1] - 1)
    on_policy = D.on_policy_step(step, cfg.on_policy, cfg.seed)
    if on_policy:
        student = run.trainee.student
        was = student.training
        student.eval()
        g = D._generator(cfg.seed, 37, step, run.rank)
        batch["ids"] = D.sample(student, ids[:, : cfg.prompt_len], ids.shape[1] - cfg.prompt_len,
                                temperature=cfg.sample_temperature, generator=g, bf16=cfg.bf16)
        student.train(was)
        batch["mask"][:, : cfg.prompt_len - 1] = 0  # score only the student-written tokens
    return batch, on_policy


def _split(batch: dict, parts: int) -> list[dict]:
    chunks = {k: v.chunk(parts) for k, v in batch.items()}
    return [{k: chunks[k][i] for k in batch} for i in range(len(chunks["ids"]))]


def _kd_sum(run: Run, mb: dict, s_logits, t_out, targets):
    """Summed distillation loss of one micro-batch (logit part)."""
    cfg, mask = run.cfg, mb["mask"]
    kw = dict(beta=cfg.beta, alpha=cfg.alpha, gamma=run.gamma, tau=cfg.tsld_tau, temperature=cfg.temperature, reduction="sum")
    if "values" in mb:
        return D.topk_loss(cfg.loss, s_logits, mb["values"], mb["indices"], mask, targets=targets,
                           label_smoothing=cfg.label_smoothing, **kw)
    t_logits = t_out["logits"][:, :-1]
    logp, logq = L.log_probs(s_logits, t_logits, cfg.temperature, cfg.label_smoothing)
    nll = L.token_nll(t_logits, targets) if cfg.loss == "tsld" else None
    return L.divergence_loss(cfg.loss, logp, logq, mask, teacher_nll=nll, **kw)


def _feature_sums(run: Run, mb: dict, s_out, t_out) -> dict:
    cfg, mask, out = run.cfg, mb["mask"], {}
    if cfg.hidden_loss:
        fn = L.HIDDEN_LOSSES[cfg.hidden_loss]
        terms = [fn(s_out["hidden"][j - 1][:, :-1], t_out["hidden"][t][:, :-1], mask, reduction="sum") for j, t in run.pairs]
        out["hidden"] = sum(terms) / len(terms)
    if cfg.attention_weight:
        terms = [L.attention_kl(s_out["attentions"][j - 1][:, :, :-1], t_out["attentions"][t - 1][:, :, :-1], mask,
                                reduction="sum") for j, t in run.pairs]
        out["attention"] = sum(terms) / len(terms)
    return out


def micro_loss_sums(run: Run, mb: dict) -> dict:
    """Loss terms of one micro-batch, each summed over its tokens (kd under TSLD: over sequences)."""
    cfg = run.cfg
    hidden, attn = bool(cfg.hidden_loss), bool(cfg.attention_weight)
    ids = mb["ids"]
    targets = ids[:, 1:]  # (b, L-1)
    with run.autocast():
        s_out = run.model(ids, hidden=hidden, attention=attn)
    s_logits = s_out["logits"][:, :-1]
    sums = {}
    if cfg.loss == "ce" or cfg.ce_weight:
        sums["ce"] = L.cross_entropy(s_logits, targets, mb["mask"], reduction="sum")
    if cfg.loss == "ce":
        return sums
    t_out = None
    if "values" not in mb:
        with torch.no_grad(), run.autocast():
            t_out = forward(run.teacher, ids, hidden=hidden, attention=attn)
    sums["kd"] = _kd_sum(run, mb, s_logits, t_out, targets)
    sums.update(_feature_sums(run, mb, s_out, t_out))
    return sums


def _weights(cfg: DistillConfig) -> dict:
    if cfg.loss == "ce":
        return {"ce": 1.0}
    return {"kd": 1.0, "ce": cfg.ce_weight, "hidden": cfg.hidden_weight, "attention": cfg.attention_weight}


def train_step(run: Run, step: int, optimizer, scheduler, params) -> dict:
    """One optimizer step over the global batch of ``step``; returns its figures (global means)."""
    cfg = run.cfg
    batch, on_policy = _local_batch(run, step)
    n_tok, n_seq = global_counts(run, batch)
    denom = {"kd": n_seq if cfg.loss == "tsld" else n_tok}
    weights = _weights(cfg)
    micro = _split(batch, cfg.grad_accum)
    totals: dict[str, float] = {}
    for i, mb in enumerate(micro):
        with sync_context(run, i == len(micro) - 1):
            sums = micro_loss_sums(run, mb)
            loss = sum(weights[k] * v / denom.get(k, n_tok) for k, v in sums.items())
            (loss * run.world).backward()  # DDP/FSDP average gradients over processes
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + v.detach().double().item()
    figures = global_means(run, totals, denom, n_tok)
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    figures["loss"] = sum(weights[k] * v for k, v in figures.items())
    return {"step": step, **figures, "grad_norm": float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm),
            "lr": lr, "on_policy": on_policy}
