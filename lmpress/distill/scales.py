"""Training the stored scales of solved llama.cpp-grid layers against the teacher, codes fixed.

A layer solved on a ggml block grid (:class:`lmpress.quant.qlinear.GGMLLinear`) holds, per block of
32 (or super-block of 256) weights, fp16 fields ``d`` (and ``m`` / ``dmin``) and everything else as
integers (codes, sub-block scales). The weight llama.cpp reads is linear in the fp16 fields::

    W = d * A + m * B          (each block's fields broadcast over its weights; A, B fixed)

(:func:`lmpress.quant.ggml.fp16_bases`). GPTQ chooses the codes and refits the fields layer by layer;
here the fields of every layer are trained together on the distillation loss of the whole model (the
end-to-end step-size training of EfficientQAT's E2E-QP, arXiv 2407.11062, on llama.cpp's grids):
the forward rounds them to fp16 with a straight-through estimator, so what is trained is what is
stored, and :func:`finish_scales_` writes the rounded fields back into the layer's bytes. Each field
is trained relative to its solved value (``d = d0 + |d0| a``), so one learning rate fits every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import arch


def fp16_ste(x: Tensor) -> Tensor:
    """``x`` rounded to float16 forward, identity backward."""
    return x + (x.half().float() - x).detach()


class TunedScales(nn.Module):
    """A :class:`GGMLLinear` whose fp16 block fields are parameters (module docstring)."""

    lmpress_linear = True

    def __init__(self, layer):
        from ..quant import ggml

        super().__init__()
        self.layer = layer  # kept whole: its bytes get the trained fields back
        shape = (layer.out_features, layer.in_features)
        d, m = ggml.fp16_fields(layer.raw, layer.gtype)
        A, B = ggml.fp16_bases(layer.raw, layer.gtype, shape)
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
    """Every ggml-grid linear of ``model`` becomes a :class:`TunedScales`; every other parameter is
    frozen. Returns how many layers train."""
    from ..quant.qlinear import GGMLLinear

    names = [n for n, m in model.named_modules() if isinstance(m, GGMLLinear)]
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        arch.set_module(model, n, TunedScales(model.get_submodule(n)))
    return len(names)


@torch.no_grad()
def finish_scales_(model: nn.Module) -> int:
    """The trained fields written (fp16) into each layer's bytes and the :class:`GGMLLinear` put back;
    a layer whose fields did not change keeps its bytes. Returns the number of layers."""
    from ..quant import ggml

    names = [n for n, m in model.named_modules() if isinstance(m, TunedScales)]
    for n in names:
        t = model.get_submodule(n)
        d, m = t.fields()
        t.layer.raw.copy_(ggml.with_fp16_fields(t.layer.raw, t.layer.gtype, d, m))
        t.layer._cache = None  # its dequantized weight is keyed by the buffer, which stays
        arch.set_module(model, n, t.layer)
    return len(names)
