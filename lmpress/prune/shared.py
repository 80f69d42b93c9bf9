"""What width and depth pruning share: the parameter count their budgets refer to, and the
calibration loss that ranks their candidates (width: shapes; depth: blocks skipped one at a time)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside the token embeddings and the output head."""
    from ..counts import param_counts

    c = param_counts(model)
    return c.linear + c.other


def lm_loss(model: nn.Module, ids: Tensor, batch: int = 2) -> float:
    """Mean next-token cross-entropy of ``model`` on ``ids`` (n, L)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(ids), batch):
            x = ids[s : s + batch]
            logits = model(x, use_cache=False).logits[:, :-1].float()  # (b, T-1, V)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            count += x[:, 1:].numel()
    return total / count
