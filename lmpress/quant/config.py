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
    gguf: solve on llama.cpp's block grids instead, for a GGUF file (``lmpress compress ...
        --format gguf:TYPE`` sets it): a llama-quantize type name (Q4_0, IQ4_NL, Q4_K_M, Q3_K_S, ...;
        Q4_K is Q4_K_M as in llama-quantize), each tensor in the type llama.cpp's rule gives it
        (:mod:`lmpress.quant.gguf_mix`); bits, group_size, sym and overrides then do not apply.
    gguf_embed, gguf_output: the type of the token embedding / output head (llama-quantize's
        --token-embedding-type / --output-tensor-type); None: llama.cpp's rule (Q8_0 or Q6_K).
        With ``gguf``, ``overrides`` give matching matrices another ggml type instead of the rule's
        (llama-quantize's --tensor-type; a mix llama.cpp has no name for, e.g. a plan's allocation):
        ``({"pattern": r"layers\\.(0|29)\\.mlp\\.down_proj", "gguf": "Q6_K"},)``; a type whose block
        does not divide the rows falls back as in llama.cpp.
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
    gguf: str | None = None
    gguf_embed: str | None = None
    gguf_output: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "overrides", tuple(dict(o) for o in self.overrides))
        for o in self.overrides:
            if "pattern" not in o:
                raise InputError(f"override {o} needs a 'pattern' (a regex on layer names)")
            unknown = set(o) - {"pattern", "bits", "group_size", "sym", "skip", "ternary", "gguf"}
            if unknown:
                raise InputError(f"override {o} has unknown keys {sorted(unknown)}; allowed: bits, group_size, sym, ternary, skip, gguf")
            re.compile(o["pattern"])
        self.grid()  # validates bits / group size
        if self.head_bits is not None:
            GridSpec(self.head_bits, self.group_size, self.sym)
        self._check_gguf()

    def _check_gguf(self) -> None:
        """A GGUF type excludes the options of lmpress's own grid that would contradict it."""
        from . import ggml, gguf_mix

        typed = [o for o in self.overrides if "gguf" in o]
        if self.gguf is None:
            if self.gguf_embed or self.gguf_output or typed:
                raise InputError("gguf_embed / gguf_output / an override's gguf type need gguf (e.g. --format gguf:Q4_K_M)")
            return
        for o in typed:
            if o["gguf"] not in ggml.TYPES:
                raise InputError(f"override {o}: {o['gguf']!r} is not a ggml block type; choose one of {', '.join(ggml.TYPES)}")
        base = ggml.TYPES[gguf_mix.FTYPES[gguf_mix.ftype(self.gguf)]]
        for f in ("gguf_embed", "gguf_output"):
            v = getattr(self, f)
            if v is not None and v not in ggml.TYPES and v not in ("F16", "F32"):
                raise InputError(f"{f} {v!r} is not a ggml type; choose one of {', '.join(ggml.TYPES)}, F16, F32")
        clash = [f"bits={self.bits}"] if self.bits not in (4, base.bits) else []
        clash += [f"group_size={self.group_size}"] if self.group_size not in (64, base.block, base.sub) else []
        clash += [k for k in ("ternary", "head_bits") if getattr(self, k)]
        clash += ["overrides without a gguf type"] if len(typed) < len(self.overrides) or any(set(o) - {"pattern", "gguf"} for o in typed) else []
        if clash:
            raise InputError(f"gguf={self.gguf} fixes the grid of every tensor, but {', '.join(clash)} asks another; "
                             f"drop {', '.join(c.split('=')[0] for c in clash)} (or choose another GGUF type)")

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
