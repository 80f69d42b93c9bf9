"""Distillation checkpoints: the full training state, written atomically, and its identity.

``checkpoint_dir/checkpoint.pt`` (written to a temporary file, then renamed) holds the student (and
hidden-state projections), optimizer, scheduler, torch RNG state, the step (the data position), the
loss history and the run's identity: the settings that shape the trajectory
(:data:`TRAJECTORY_FIELDS`), a digest of the training windows and fingerprints of the student's and
the teacher's initial weights. A run pointed at a folder holding a checkpoint of the same identity
resumes from it and reproduces the uninterrupted run's losses bit for bit; any other identity is a
clear :class:`lmpress.errors.InputError`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from ..io import write_failure

if TYPE_CHECKING:
    from .step import Run


TRAJECTORY_FIELDS = ("loss", "temperature", "label_smoothing", "beta", "alpha", "tsld_tau", "gamma", "ce_weight",
                     "hidden_loss", "hidden_weight", "attention_weight", "tokens", "batch_size", "seq_len", "lr",
                     "weight_decay", "warmup", "min_lr", "grad_clip", "on_policy", "prompt_len",
                     "sample_temperature", "seed", "bf16", "qat_bits", "qat_group_size", "qat_learn_clip",
                     "qat_init_clip", "clip_lr", "data", "topk")


VERSION = 2  # 2: the identity holds the models' fingerprints


def data_digest(source) -> str:
    """sha256 of the training windows (n, L) (of a top-k cache: its windows)."""
    ids = source if isinstance(source, torch.Tensor) else source.windows()
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module | None) -> str:
    """sha256 over every state-dict tensor's name, dtype, shape and bytes (all of them: hashing runs at
    about 1.4 GB/s here, ~0.5 s for a 135M-parameter float32 model); ``"none"`` without a model."""
    if model is None:
        return "none"
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def identity(source, trainee: torch.nn.Module, teacher: torch.nn.Module | None) -> dict:
    """What a checkpoint is valid for, besides the settings: the training data and the initial weights
    of the trained modules (student and projections) and of the teacher. Call it before training."""
    return {"data": data_digest(source), "student": weights_fingerprint(trainee), "teacher": weights_fingerprint(teacher)}


_MISMATCH = {"data": "other training data", "student": "another student (its initial weights differ)",
             "teacher": "another teacher (its weights differ)"}


def _check_identity(path: Path, ck: dict, run: Run, ident: dict) -> None:
    """A clear error unless checkpoint ``ck`` was written for this run's settings, data and models."""
    fix = f"use another checkpoint_dir (--checkpoint-dir) or delete {path.parent} to start over"
    if ck.get("version", 1) < VERSION:
        raise InputError(f"checkpoint {path} was written by an older lmpress that did not record the models it "
                         f"trained, so resuming it cannot be checked; {fix}")
    want = {k: getattr(run.cfg, k) for k in TRAJECTORY_FIELDS}
    diff = sorted(k for k in want if ck["config"].get(k) != want[k])
    if diff:
        raise InputError(f"checkpoint {path} was written with other settings ({', '.join(diff)}); "
                         "use another checkpoint_dir or the same settings")
    for key, what in _MISMATCH.items():
        if ck.get(key) != ident[key]:
            raise InputError(f"checkpoint {path} was written for {what}; {fix}")


def _state(run: Run, optimizer):
    """Full (unsharded) model and optimizer state; under FSDP only rank 0 gets them."""
    if run.world > 1 and run.cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(run.model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return run.trainee.state_dict(), optimizer.state_dict()


def save_checkpoint(path: Path, run: Run, optimizer, scheduler, step: int, extra: dict) -> None:
    """Write the training state atomically (temporary file, then rename); rank 0 writes. ``extra`` holds
    the history and the run's :func:`identity`."""
    model_sd, optim_sd = _state(run, optimizer)
    if run.rank != 0:
        return
    ck = {"version": VERSION, "step": step, "model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
          "rng": torch.get_rng_state(), "gamma": run.gamma, "world": run.world,
          "config": {k: getattr(run.cfg, k) for k in TRAJECTORY_FIELDS}, **extra}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ck, tmp)
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, Ctrl-C, SIGTERM: no temporary file left to fill the disk
        tmp.unlink(missing_ok=True)
        reason = write_failure(e, path.parent)
        if reason:
            raise InputError(f"could not save checkpoint {path} ({reason}); free space or use another "
                             "--checkpoint-dir; the last complete checkpoint is kept") from None
        raise


def load_checkpoint(path: Path, run: Run, optimizer, scheduler, ident: dict) -> dict:
    """Restore the state saved by :func:`save_checkpoint` after checking that it was written for this
    run (settings, data and models: ``ident`` from :func:`identity`); returns the checkpoint dict."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise InputError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); delete it to start over")
    _check_identity(path, ck, run, ident)
    if run.world > 1 and run.cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(run.model, optimizer, model_state_dict=ck["model"], optim_state_dict=ck["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        run.trainee.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["rng"])
    run.gamma = ck["gamma"]
    return ck
