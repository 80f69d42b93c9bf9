"""Fields shared by the unstructured and N:M pruning methods (magnitude, Wanda, SparseGPT), validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..calib import PASS_BATCH, resolve_calib_dtype
from . import masks

ALLOCATIONS = ("uniform", "owl", "sensitivity")


@dataclass(frozen=True)
class PruneConfig:
    """Common options of magnitude, Wanda and SparseGPT.

    sparsity: fraction of weights zeroed; default 0.5, or ``1 - N/M`` with a pattern.
    pattern: ``"N:M"``: keep N of every M consecutive inputs of a row.
    A ``scope`` field (magnitude, Wanda) compares scores within each ``"row"`` or the whole ``"layer"``.
    """

    family: ClassVar[str] = "prune"
    method: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    sparsity: float | None = None
    pattern: str | None = None

    def __post_init__(self):
        nm = masks.parse_pattern(self.pattern)
        if self.sparsity is None:
            object.__setattr__(self, "sparsity", 1 - nm[0] / nm[1] if nm else 0.5)
        masks.check_sparsity(self.sparsity)
        if nm and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(f"sparsity {self.sparsity} contradicts pattern {self.pattern} (which means "
                             f"{1 - nm[0] / nm[1]:g}); give one of them")
        if getattr(self, "scope", "row") not in masks.SCOPES:
            raise ValueError(f"scope {self.scope!r} must be one of {masks.SCOPES}")


@dataclass(frozen=True)
class CalibratedPruneConfig(PruneConfig):
    """:class:`PruneConfig` plus the options of the methods that read calibration data (Wanda, SparseGPT).

    allocation: ``"uniform"``, ``"owl"`` (outlier-weighted, arXiv 2310.05065) or ``"sensitivity"``
        (per-block output error): one sparsity per block, averaging ``sparsity``.
    owl_lambda: owl / sensitivity: block sparsities spread over target +- lambda.
    owl_m: OWL: a score is an outlier above owl_m x the layer mean.
    sequential: groups of linears in a block see the pruned groups before them (slower).
    batch_size: calibration rows per forward.
    calib_dtype: dtype of the block forwards in the calibration passes ("float32": full precision).
    """

    needs_calibration: ClassVar[bool] = True
    allocation: str = "uniform"
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    sequential: bool = False
    batch_size: int = PASS_BATCH  # rows per block-pass batch (lmpress.calib)
    calib_dtype: str = "auto"  # resolved when the config is made: bfloat16 on CPUs with bf16 units, else float32

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "calib_dtype", resolve_calib_dtype(self.calib_dtype))  # the recipe saves the resolved value
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size {self.batch_size!r} must be a positive integer (calibration rows per forward)")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation {self.allocation!r} must be one of {ALLOCATIONS}")
        if self.allocation != "uniform":
            if self.pattern is not None:
                raise ValueError(f"{self.allocation} allocation gives each block its own sparsity, which an N:M "
                                 "pattern cannot; drop one of them")
            masks.owl_sparsities(torch.zeros(2), self.sparsity, self.owl_lambda)  # validates lambda
            if self.owl_m <= 1:
                raise ValueError(f"owl_m {self.owl_m} must be > 1 (outliers are scores above owl_m x the mean)")
