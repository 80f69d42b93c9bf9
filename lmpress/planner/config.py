"""What a plan is asked for: an accuracy budget, a size target, and how to measure (one frozen config)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import InputError
from ..quant.grid import BITS
from .candidates import GGUF_TYPES


@dataclass(frozen=True)
class Budget:
    """An accuracy budget: ``kl`` (mean KL to the original, nats/token, at most ``value``) or ``ppl``
    (perplexity at most ``value`` times the original's with ``relative``, else ``value`` more)."""

    kind: str
    value: float
    relative: bool = False

    def limit_ppl(self, ppl0: float) -> float:
        return ppl0 * (1 + self.value) if self.relative else ppl0 + self.value

    def met(self, measured: dict, ppl0: float) -> bool:
        if self.kind == "kl":
            return measured["kl"] <= self.value
        return measured["perplexity"] <= self.limit_ppl(ppl0)

    def kl_guess(self, ppl0: float) -> float:
        """The predicted-KL limit to try first: the budget itself, or for perplexity log(ppl / ppl0)
        (a mean KL of d nats raises the mean NLL by about d when the model's errors are small)."""
        return self.value if self.kind == "kl" else math.log(self.limit_ppl(ppl0) / ppl0)

    def __str__(self) -> str:
        if self.kind == "kl":
            return f"kl={self.value:g}"
        return f"ppl=+{self.value * 100:g}%" if self.relative else f"ppl=+{self.value:g}"


@dataclass(frozen=True)
class Target:
    """A size target: ``bits`` (average stored bits per weight of the block linears, scales and zeros
    included) or ``size`` (bytes of all tensors of the model)."""

    kind: str
    value: float

    def __str__(self) -> str:
        return f"bits={self.value:g}" if self.kind == "bits" else f"size={self.value / 1e6:g}MB"


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(text) -> Budget:
    if isinstance(text, Budget):
        return text
    m = re.fullmatch(r"\s*(kl|ppl)\s*=\s*(\+?)([0-9.eE+-]+)\s*(%?)\s*", str(text))
    try:
        if m:
            v = float(m.group(3)) / (100 if m.group(4) else 1)
            if m.group(1) == "kl" and not m.group(2) and not m.group(4) and v > 0:
                return Budget("kl", v)
            if m.group(1) == "ppl" and m.group(2) and v > 0:
                return Budget("ppl", v, relative=bool(m.group(4)))
    except ValueError:
        pass
    raise InputError(f"bad budget {text!r}: give kl=0.05 (mean KL to the original, nats per token, > 0), "
                     "ppl=+5% (perplexity at most 5% above the original's) or ppl=+0.5 (at most 0.5 above)")


def parse_target(text) -> Target:
    if isinstance(text, Target):
        return text
    m = re.fullmatch(r"\s*(bits|size)\s*=\s*([0-9.eE+-]+)\s*([a-zA-Z]*)\s*", str(text))
    try:
        if m and m.group(1) == "bits" and not m.group(3):
            v = float(m.group(2))
            if min(BITS) <= v <= 32:
                return Target("bits", v)
        if m and m.group(1) == "size" and m.group(3).lower() in _UNITS:
            v = float(m.group(2)) * _UNITS[m.group(3).lower()]
            if v > 0:
                return Target("size", v)
    except ValueError:
        pass
    raise InputError(f"bad target {text!r}: give bits=4.5 (average stored bits per weight of the block linears, "
                     f"{min(BITS)} to 32) or size=100MB (all tensors; units B, KB, MB, GB, KiB, MiB, GiB)")


@dataclass(frozen=True)
class PlanConfig:
    """How a plan measures and searches.

    bits, group_sizes: the grid candidates of each block group (plus float); head_bits: the output
        head's candidates (at group size 64, plus float).
    holdout_rows x holdout_len: the held-out calibration slice (tokens after the GPTQ calibration rows)
        on which whole recipes are measured; fisher_rows: its first rows used by the fisher estimator;
        kl_rows x kl_len: the part used by the kl estimator (it re-runs the model once per candidate).
    estimator: ``auto`` (measure both, use the one whose predictions rank the measured recipes best),
        ``fisher`` or ``kl`` (measure and use that one only).
    recipes: random mixed recipes measured (with every uniform one) to rank and scale the estimators.
    rounds: confirmation rounds at most (compress for real, evaluate, tighten when the budget is missed).
    sym: symmetric grid. cache_dir: where measured sensitivities are kept (None: ~/.cache/lmpress/plan).
    gguf: plan a GGUF file instead (a llama-quantize file type, e.g. ``Q4_K_M``: its rule gives the
        embedding's and output head's types): each block group chooses among the ggml block types
        ``gguf_types`` (those whose block divides its rows), solved by GPTQ on that type's grid; no float.
    """

    bits: tuple = BITS
    group_sizes: tuple = (32, 64, -1)
    head_bits: tuple = (4, 8)
    holdout_rows: int = 4
    holdout_len: int = 512
    fisher_rows: int = 2
    kl_rows: int = 1
    kl_len: int = 128
    estimator: str = "auto"
    recipes: int = 12
    rounds: int = 3
    sym: bool = False
    seed: int = 0
    cache_dir: str | None = None
    gguf: str | None = None
    gguf_types: tuple = GGUF_TYPES

    def __post_init__(self):
        object.__setattr__(self, "bits", tuple(self.bits))
        object.__setattr__(self, "group_sizes", tuple(self.group_sizes))
        object.__setattr__(self, "head_bits", tuple(self.head_bits or ()))
        object.__setattr__(self, "gguf_types", tuple(self.gguf_types or ()))
        if self.gguf is not None:
            from ..quant import ggml, gguf_mix

            object.__setattr__(self, "gguf", gguf_mix.ftype(self.gguf))
            bad = [t for t in self.gguf_types if t not in ggml.TYPES]
            if bad or not self.gguf_types:
                raise InputError(f"plan gguf_types must be ggml block types among {', '.join(ggml.TYPES)}, got {bad or 'none'}")
        bad = [b for b in self.bits + self.head_bits if b not in BITS]
        if bad or not self.bits:
            raise InputError(f"plan bits must be among {BITS} (what lmpress stores packed), got {bad or 'none'}")
        if self.estimator not in ("auto", "fisher", "kl"):
            raise InputError(f"estimator must be auto, fisher or kl, got {self.estimator!r}")
        for name in ("holdout_rows", "holdout_len", "fisher_rows", "kl_rows", "kl_len", "rounds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"plan {name} must be a whole number of at least 1, got {v!r}")
        if self.fisher_rows > self.holdout_rows or self.kl_rows > self.holdout_rows or self.kl_len > self.holdout_len:
            raise InputError("fisher_rows and kl_rows x kl_len must fit in the held-out slice (holdout_rows x holdout_len)")
