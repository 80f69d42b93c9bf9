"""Fields shared by every weight quantization method, and per-layer overrides."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from ..errors import InputError
from .grid import GridSpec


@dataclass(frozen=True)
class QuantConfig:
    """Common options of RTN, GPTQ and AWQ.

    bits: 2, 3, 4 or 8. group_size: columns per scale/zero (-1: per output channel).
    sym: symmetric grid (no zero point search). ternary: weights in {-s, 0, s}.
    clip_search: search a per-group clipping factor minimising the (activation-weighted) error.
    overrides: per-layer rules, first match wins, e.g.
        ``({"pattern": r"down_proj", "bits": 8}, {"pattern": r"layers\\.0\\.", "skip": True})``.
    head_bits: also quantize the output head (untied from the embedding) to this many bits with RTN
        (None: leave it in float). Saves decode time: the head is the largest matrix of small models.
    """

    family: ClassVar[str] = "quant"
    method: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    bits: int = 4
    group_size: int = 64
    sym: bool = False
    ternary: bool = False
    clip_search: bool = False
    overrides: tuple = ()
    head_bits: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "overrides", tuple(dict(o) for o in self.overrides))
        for o in self.overrides:
            if "pattern" not in o:
                raise InputError(f"override {o} needs a 'pattern' (a regex on layer names)")
            unknown = set(o) - {"pattern", "bits", "group_size", "sym", "skip", "ternary"}
            if unknown:
                raise InputError(f"override {o} has unknown keys {sorted(unknown)}; allowed: bits, group_size, sym, ternary, skip")
            re.compile(o["pattern"])
        self.grid()  # validates bits / group size
        if self.head_bits is not None:
            GridSpec(self.head_bits, self.group_size, self.sym)

    def grid(self) -> GridSpec:
        return GridSpec(self.bits, self.group_size, self.sym, self.ternary)

    def layer_grid(self, name: str) -> GridSpec | None:
        """The grid for layer ``name``, or None when an override skips it."""
        for o in self.overrides:
            if re.search(o["pattern"], name):
                if o.get("skip"):
                    return None
                return GridSpec(o.get("bits", self.bits), o.get("group_size", self.group_size),
                                o.get("sym", self.sym), o.get("ternary", self.ternary))
        return self.grid()
