"""Training the stored scales of quantized layers against the teacher, codes fixed.

A quantized layer holds, per group of weights, fp16 fields and everything else as integers, and its
weight is linear in the fields::

    W = d * A + m * B          (each group's fields broadcast over its weights; A, B fixed)

- lmpress's packed grid (:class:`lmpress.quant.qlinear.QuantLinear`, also what compressed-tensors
  folders hold): ``W = s * (q - z)``, the fp16 group scale ``s`` the one field, ``A = q - z``;
- llama.cpp's block grids (:class:`lmpress.quant.qlinear.GGMLLinear`): per block of 32 (or
  super-block of 256) the fp16 ``d`` and ``m`` / ``dmin``, the codes and integer sub-block scales in
  ``A``, ``B`` (:func:`lmpress.quant.ggml.fp16_bases`).

GPTQ chooses the codes and fits the fields layer by layer; here the fields of every layer are trained
together on the distillation loss of the whole model (the end-to-end step-size training of
EfficientQAT's E2E-QP, arXiv 2407.11062): the forward rounds them to fp16 with a straight-through
estimator, so what is trained is what is stored, and :func:`finish_scales_` writes the rounded fields
back into the layer. Each field is trained relative to its solved value (``d = d0 + |d0| a``), so one
learning rate fits every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import arch


def fp16_ste(x: Tensor) -> Tensor:
    """``x`` rounded to float16 forward, identity backward."""
    return x + (x.half().float() - x).detach()


def _fields(layer) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """``(d, m, A, B)`` of a quantized layer: its fp16 fields (out, groups) and their bases (out, in)."""
    from ..quant import ggml
    from ..quant.qlinear import GGMLLinear

    if isinstance(layer, GGMLLinear):
        d, m = ggml.fp16_fields(layer.raw, layer.gtype)
        return (d, m, *ggml.fp16_bases(layer.raw, layer.gtype, (layer.out_features, layer.in_features)))
    from ..quant.pack import dequantize_packed

    ones = torch.ones_like(layer.scales)
    A = dequantize_packed(layer.qweight, ones, layer.zeros, layer.bits, layer.group_size, (layer.out_features, layer.in_features))
    return layer.scales.float(), None, A, None


def _store(layer, d: Tensor, m: Tensor | None) -> None:
    """The fields (rounded to fp16) written into ``layer``."""
    from ..quant import ggml
    from ..quant.qlinear import GGMLLinear

    if isinstance(layer, GGMLLinear):
        layer.raw.copy_(ggml.with_fp16_fields(layer.raw, layer.gtype, d, m))
        layer._cache = None  # its dequantized weight is keyed by the buffer, which stays
    else:
        layer.scales.copy_(d.half())


class TunedScales(nn.Module):
    """A quantized layer whose fp16 group fields are parameters (module docstring)."""

    lmpress_linear = True

    def __init__(self, layer):
        super().__init__()
        self.layer = layer  # kept whole: it gets the trained fields back
        d, m, A, B = _fields(layer)
        self.block = layer.in_features // d.shape[1]
        self.register_buffer("A", A)
        self.register_buffer("d0", d)
        self.d_rel = nn.Parameter(torch.zeros_like(d))
        if m is not None:
            self.register_buffer("B", B)
            self.register_buffer("m0", m)
            self.m_rel = nn.Parameter(torch.zeros_like(m))
        self.register_buffer("unit", d.abs())  # the step of both fields: the block's scale

    def fields(self) -> tuple[Tensor, Tensor | None]:
        """The fields as trained, at the precision stored (fp16)."""
        d = fp16_ste(self.d0 + self.unit * self.d_rel)
        return d, (fp16_ste(self.m0 + self.unit * self.m_rel) if hasattr(self, "m0") else None)

    @property
    def weight(self) -> Tensor:
        d, m = self.fields()
        w = d.repeat_interleave(self.block, 1) * self.A
        return w if m is None else w + m.repeat_interleave(self.block, 1) * self.B

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.float(), self.weight, self.layer.bias).to(x.dtype)


def tune_scales_(model: nn.Module) -> int:
    """Every quantized linear of ``model`` (packed or on a ggml grid; not ternary) becomes a
    :class:`TunedScales`; every other parameter is frozen. Returns how many layers train."""
    from ..quant.qlinear import GGMLLinear, QuantLinear

    names = [n for n, m in model.named_modules()
             if isinstance(m, GGMLLinear) or (isinstance(m, QuantLinear) and not m.ternary)]
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        arch.set_module(model, n, TunedScales(model.get_submodule(n)))
    return len(names)


@torch.no_grad()
def finish_scales_(model: nn.Module) -> int:
    """The trained fields written (fp16) into each layer and the layer put back; a layer whose fields
    did not change keeps its bytes. Returns the number of layers."""
    names = [n for n, m in model.named_modules() if isinstance(m, TunedScales)]
    for n in names:
        t = model.get_submodule(n)
        _store(t.layer, *t.fields())
        arch.set_module(model, n, t.layer)
    return len(names)
