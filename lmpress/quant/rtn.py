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
    """Quantize every block linear of ``model`` in place with round-to-nearest, block by block (a
    streamed model's blocks are read and written in turn, :func:`lmpress.calib.each_block`)."""
    from ..calib import each_block

    errs = {}
    plan = cfg_plan(model, cfg, imatrix=False)

    def per_block(prefix, block):
        for n, m in arch.block_linears(block).items():
            name = f"{prefix}.{n}"
            err = _rtn_layer(model, name, m, cfg, plan)
            if err is not None:
                errs[name] = err

    each_block(model, per_block, progress="rtn" if getattr(ctx, "progress", False) else False)
    if cfg.head_bits:
        quantize_head_(model, type(cfg.grid())(cfg.head_bits, cfg.group_size, cfg.sym))
    if plan is not None:
        ggml_embeddings_(model, plan)
    return {"relative_weight_error_mean": sum(errs.values()) / max(1, len(errs)), "layers": len(errs)}


def _rtn_layer(model, name: str, layer, cfg: RTNConfig, plan: dict | None) -> float | None:
    """Replace one linear by its round-to-nearest quantization; its relative weight error (None: kept float)."""
    w = arch.linear_weight(layer).detach().float()
    if plan is not None:  # llama.cpp's grid: its round-to-nearest, or the (unweighted) scale search
        bq = (ggml.fit if cfg.clip_search else ggml.quantize)(w, plan[name])
        arch.set_module(model, name, GGMLLinear.from_blocks(bq, getattr(layer, "bias", None)))
        return (torch.linalg.norm(ggml.dequantize(bq) - w) / torch.linalg.norm(w)).item()
    spec = cfg.layer_grid(name)
    if spec is None:
        return None
    s, z = choose_params(w, spec, cfg.clip_search)
    q = quantize_codes(w, s, z, spec)
    replace_linear(model, name, q, s, z, spec)
    return (torch.linalg.norm(dequantize(q, s, z) - w) / torch.linalg.norm(w)).item()
