"""Distributed training helpers (torch.distributed, gloo): process group, DDP / FSDP2 wrapping, global sums.

Under ``torchrun`` (``WORLD_SIZE > 1``) :func:`dist_setup` initialises the gloo process group and
:func:`wrap` puts the trained modules in ``DistributedDataParallel`` (or FSDP2 ``fully_shard``
with ``fsdp=True``). On one process every helper is a no-op.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import InputError

if TYPE_CHECKING:
    from .engine import DistillConfig
    from .step import Run, Trainee


def dist_setup() -> tuple[int, int]:
    """``(rank, world)``; initialises the gloo process group when launched by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap(trainee: Trainee, cfg: DistillConfig, world: int) -> nn.Module:
    if world == 1:
        return trainee
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        from .. import arch

        try:
            for block in arch.blocks(trainee.student):
                fully_shard(block)
        except InputError:
            pass  # a student without recognisable blocks is sharded as one unit
        fully_shard(trainee)
        return trainee
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(trainee)


def gather_student(run: Run) -> dict:
    """The full (unsharded) student state dict on every process, after FSDP training (a collective:
    every process calls it); the student itself stays sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True))
    return {k[len("student."):]: v for k, v in full.items() if k.startswith("student.")}


def sync_context(run: Run, last: bool):
    """Gradient synchronisation only on the last micro-batch of a step."""
    if run.world == 1:
        return nullcontext()
    if run.cfg.fsdp:
        run.model.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if last else run.model.no_sync()


def global_counts(run: Run, batch: dict) -> tuple[float, float]:
    """Global (tokens, sequences) that the loss terms are normalised by."""
    m = batch["mask"]
    c = torch.tensor([m.sum().item(), (m.sum(-1) > 0).sum().item()], dtype=torch.float64)
    if run.world > 1:
        torch.distributed.all_reduce(c)
    return c[0].item(), c[1].item()


def global_means(run: Run, totals: dict, denom: dict, n_tok: float) -> dict:
    """Each loss term's sum over all processes, divided by its global count."""
    keys = sorted(totals)
    t = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
    if run.world > 1:
        torch.distributed.all_reduce(t)
    return {k: t[i].item() / denom.get(k, n_tok) for i, k in enumerate(keys)}
