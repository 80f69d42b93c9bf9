"""Round-to-nearest weight quantization: each weight to its nearest grid point, no calibration.

Recipe::

    - method: rtn
      bits: 4
      group_size: 64
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import arch
from .config import QuantConfig
from .grid import choose_params, dequantize, quantize_codes
from . import ggml
from .gguf_mix import cfg_plan
from .qlinear import GGMLLinear, ggml_embeddings_, quantize_head_, replace_linear


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    method: ClassVar[str] = "rtn"


def rtn_(model, cfg: RTNConfig, ctx=None) -> dict:
    """Quantize every block linear of ``model`` in place with round-to-nearest."""
    from ..progress import bar

    errs = {}
    layers = arch.compressible_linears(model)
    plan = cfg_plan(model, cfg, imatrix=False)
    for name in bar(list(layers), desc="rtn", enabled=getattr(ctx, "progress", False)):
        if plan is not None:  # llama.cpp's grid: its round-to-nearest, or the (unweighted) scale search
            w = arch.linear_weight(layers[name]).detach().float()
            bq = (ggml.fit if cfg.clip_search else ggml.quantize)(w, plan[name])
            errs[name] = (torch.linalg.norm(ggml.dequantize(bq) - w) / torch.linalg.norm(w)).item()
            arch.set_module(model, name, GGMLLinear.from_blocks(bq, getattr(layers[name], "bias", None)))
            continue
        spec = cfg.layer_grid(name)
        if spec is None:
            continue
        w = arch.linear_weight(layers[name]).detach().float()
        s, z = choose_params(w, spec, cfg.clip_search)
        q = quantize_codes(w, s, z, spec)
        errs[name] = (torch.linalg.norm(dequantize(q, s, z) - w) / torch.linalg.norm(w)).item()
        replace_linear(model, name, q, s, z, spec)
    if cfg.head_bits:
        quantize_head_(model, type(cfg.grid())(cfg.head_bits, cfg.group_size, cfg.sym))
    if plan is not None:
        ggml_embeddings_(model, plan)
    return {"relative_weight_error_mean": sum(errs.values()) / max(1, len(errs)), "layers": len(errs)}
