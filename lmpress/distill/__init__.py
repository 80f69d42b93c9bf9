"""Knowledge distillation: a teacher-student engine for recovering pruned and quantized models.

* :mod:`lmpress.distill.losses` -- the loss library (pure functions on logits / hidden states).
* :mod:`lmpress.distill.data` -- corpus windows, teacher-written and on-policy sequences, the
  cached teacher top-k and its loss.
* :mod:`lmpress.distill.engine` -- :class:`DistillConfig`, :func:`distill` (the training loop) and
  the recipe entry :func:`distill_`;
  :mod:`lmpress.distill.step` -- forward passes and one optimizer step;
  :mod:`lmpress.distill.checkpoint` -- checkpoints, resume, and the identity a checkpoint is valid for;
  :mod:`lmpress.distill.parallel` -- DDP/FSDP and global sums under torchrun.
* :mod:`lmpress.distill.qat` -- :class:`FakeQuantLinear` (straight-through estimator) for
  quantization-aware distillation.

Importing this package is cheap; the names below load their module on first use.
"""

from __future__ import annotations

import importlib

_API = {
    "DistillConfig": "lmpress.distill.engine",
    "distill": "lmpress.distill.engine",
    "distill_": "lmpress.distill.engine",
    "training_data": "lmpress.distill.engine",
    "FakeQuantLinear": "lmpress.distill.qat",
    "to_fake_quant_": "lmpress.distill.qat",
    "fake_quant_weights": "lmpress.distill.qat",
    "materialize_fake_quant_": "lmpress.distill.qat",
    "pack_fake_quant_": "lmpress.distill.qat",
    "cache_teacher_topk": "lmpress.distill.data",
    "TopKCache": "lmpress.distill.data",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'lmpress.distill' has no attribute {name!r}")
