"""Fake-quantized linear layers for quantization-aware training (QAT) with a straight-through estimator.

Quantizer (the project's asymmetric grid, :mod:`lmpress.quant.grid`): a weight ``W`` (out, in) is
cut into groups of ``group_size`` consecutive columns per row; each group gets a min-max grid that
contains 0::

    w_max = c_hi * max(max(W_g), 0),  w_min = c_lo * min(min(W_g), 0)   # c: clipping ratios in (0, 1]
    s = fp16((w_max - w_min) / (2**bits - 1)),  z = round(-w_min / s)
    q = clamp(round(W / s) + z, 0, 2**bits - 1),  W_hat = (q - z) * s

The math is the grid's own (``grid_params``, ``fake_quantize``, ``quantize_codes``, called with a
straight-through ``round_fn``), so with ``c_lo = c_hi = 1`` this is exactly the project's
round-to-nearest (RTN) grid; scales are rounded to
float16 as the packed format stores them, so :func:`pack_fake_quant_` turns the trained layers
into :class:`lmpress.quant.qlinear.QuantLinear` layers that compute exactly ``W_hat``. During training the forward pass
uses ``W_hat``; the backward pass treats ``round`` as the identity (straight-through estimator,
Bengio et al., arXiv 1308.3432), so ``dL/dW = dL/dW_hat`` inside the clipping range and 0 outside
it, and the clipping ratios, when learnable, get the gradient through ``s`` and ``z`` (learnable
weight clipping, OmniQuant, arXiv 2308.13137; BitDistiller's asymmetric clipping, arXiv 2402.10631).

Example::

    to_fake_quant_(student, bits=2, group_size=64, learn_clip=True, init_clip="mse")
    distill(student, teacher, DistillConfig(loss="cakld"), ...)   # trains W and the clip ratios
    weights = fake_quant_weights(student)       # {name: W_hat (out, in)} on the 2-bit grid
    pack_fake_quant_(student)                   # bit-packed QuantLinear layers (lmpress.quant), or
    materialize_fake_quant_(student)            # back to nn.Linear holding W_hat
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import arch
from ..errors import InputError
from ..quant.grid import GridSpec, fake_quantize, grid_params, mse_clip_factors, quantize_codes

# init_clip="mse": grid.mse_clip's search (clip factors 1, 0.9875, ...) carried on from RTN's 0.75 down to
# 0.5, since a 2-bit grid's weight-error optimum lies lower (Gaussian weights, group 64: 8% less error)
INIT_CLIP_SEARCH = dict(steps=40, max_shrink=0.5)
CLIP_RANGE = (0.01, 1.0)  # learnt clipping ratios are clamped into this range


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (x.round() - x).detach()


class FakeQuantLinear(nn.Module):
    """A linear layer whose forward uses its fake-quantized weight ``W_hat`` (module docstring).

    ``weight`` (out, in) is the latent float weight the optimizer updates; ``clip_lo`` and
    ``clip_hi`` (out, in // g) are the clipping ratios, parameters when ``learn_clip`` else buffers.
    ``conv1d`` records that the layer replaced a GPT-2 ``Conv1D`` (weight stored transposed), so
    :func:`materialize_fake_quant_` can give the original layer type back.
    """

    lmpress_linear = True  # lmpress.arch treats it as a linear layer

    def __init__(self, weight: Tensor, bias: Tensor | None, bits: int, group_size: int, *,
                 learn_clip: bool = False, clip: Tensor | None = None, conv1d: bool = False):
        super().__init__()
        self.conv1d = conv1d
        self.spec = GridSpec(bits, group_size, fake=True)  # checks bits (1-8) and that group_size divides in
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float())
        groups = (self.out_features, self.in_features // self.spec.groups(self.in_features))
        c = torch.ones(groups) if clip is None else clip.detach().clone().float()
        if learn_clip:
            self.clip_lo, self.clip_hi = nn.Parameter(c.clone()), nn.Parameter(c.clone())
        else:
            self.register_buffer("clip_lo", c.clone())
            self.register_buffer("clip_hi", c.clone())

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def group_size(self) -> int:
        return self.spec.group_size

    def params(self) -> tuple[Tensor, Tensor]:
        """``(s, z)`` (out, G), differentiable (straight-through) in the clip ratios; the weight's
        min and max are constants of the step."""
        c_lo, c_hi = self.clip_lo.clamp(*CLIP_RANGE), self.clip_hi.clamp(*CLIP_RANGE)
        return grid_params(self.weight.detach(), self.spec, c_lo, c_hi, round_fn=round_ste)

    def dequantized(self) -> Tensor:
        """``W_hat`` (out, in), differentiable (straight-through) in the weight and clip ratios."""
        s, z = self.params()
        return fake_quantize(self.weight, s, z, self.spec, round_fn=round_ste)

    @torch.no_grad()
    def codes(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(q uint8 (out, in), s, z (out, G))`` of the current weight; ``(q - z) * s`` equals :meth:`dequantized`."""
        s, z = self.params()
        return quantize_codes(self.weight, s, z, self.spec), s, z

    def logical_numel(self) -> int:
        return self.weight.numel() + (0 if self.bias is None else self.bias.numel())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        learn = isinstance(self.clip_hi, nn.Parameter)
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, learn_clip={learn}"


def to_fake_quant_(model: nn.Module, bits: int, group_size: int, *, learn_clip: bool = False,
                   init_clip: str | None = None) -> dict[str, FakeQuantLinear]:
    """Replace every linear layer inside the decoder blocks by a :class:`FakeQuantLinear` in place.

    Embeddings and the output head stay in float. ``init_clip="mse"`` starts each group's clipping
    ratio at the weight-MSE-optimal value of grid.mse_clip's search (:data:`INIT_CLIP_SEARCH`; else
    1.0, i.e. RTN min-max).
    Returns the new layers by name.

    Already-quantized layers (``QuantLinear`` from GPTQ / AWQ / RTN) start from their dequantized
    weights: with ``init_clip=None`` and the same bits and group size, the min-max grid of those
    weights is the quantizer's own grid, so training starts exactly at the post-training model
    (recipe ``gptq`` then ``distill`` with ``qat_init_clip: null``).
    """
    if init_clip not in (None, "mse"):
        raise InputError(f"init_clip must be None or 'mse', got {init_clip!r}")
    new = {}
    for name, lin in arch.compressible_linears(model).items():
        if isinstance(lin, FakeQuantLinear):
            continue
        W = arch.linear_weight(lin).detach().float()  # (out, in)
        clip = mse_clip_factors(W, GridSpec(bits, group_size, fake=True), **INIT_CLIP_SEARCH) if init_clip == "mse" else None
        fq = FakeQuantLinear(W, getattr(lin, "bias", None), bits, group_size, learn_clip=learn_clip, clip=clip,
                             conv1d=arch.is_conv1d(lin))
        arch.set_module(model, name, fq)
        new[name] = fq
    if not new:
        raise InputError(f"{type(model).__name__} has no linear layers inside decoder blocks to fake-quantize")
    return new


def fake_quant_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


@torch.no_grad()
def fake_quant_weights(model: nn.Module) -> dict[str, Tensor]:
    """``{name: W_hat (out, in)}``: the dequantized float weights of every fake-quantized layer,
    on the quantization grid, for the quantization code to pack."""
    return {n: m.dequantized().detach().clone() for n, m in fake_quant_layers(model).items()}


@torch.no_grad()
def pack_fake_quant_(model: nn.Module) -> int:
    """Replace each :class:`FakeQuantLinear` by a bit-packed :class:`lmpress.quant.qlinear.QuantLinear`
    with the same codes, scales and zeros (bits in :data:`lmpress.quant.grid.BITS`); returns the count."""
    from ..quant.qlinear import QuantLinear

    layers = fake_quant_layers(model)
    for name, m in layers.items():
        q, s, z = m.codes()
        spec = GridSpec(m.bits, m.spec.groups(m.in_features))  # a packable grid: checks bits against grid.BITS
        arch.set_module(model, name, QuantLinear.from_codes(q, s, z, spec, bias=m.bias))
    return len(layers)


@torch.no_grad()
def materialize_fake_quant_(model: nn.Module) -> int:
    """Replace each :class:`FakeQuantLinear` by an ``nn.Linear`` (GPT-2: ``Conv1D``) holding ``W_hat``;
    returns the count."""
    layers = fake_quant_layers(model)
    for name, m in layers.items():
        if m.conv1d:
            from transformers.pytorch_utils import Conv1D

            lin = Conv1D(m.out_features, m.in_features)
        else:
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        arch.set_linear_weight(lin, m.dequantized())
        if m.bias is not None:
            lin.bias.copy_(m.bias)
        arch.set_module(model, name, lin)
    return len(layers)
