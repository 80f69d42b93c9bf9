"""Fake-quantized linear layers for quantization-aware training (QAT) with a straight-through estimator.

Quantizer (the project's asymmetric grid, :mod:`lmpress.quant.grid`): a weight ``W`` (out, in) is
cut into groups of ``group_size`` consecutive columns per row; each group gets a min-max grid that
contains 0::

    w_max = c_hi * max(max(W_g), 0),  w_min = c_lo * min(min(W_g), 0)   # c: clipping ratios in (0, 1]
    s = fp16((w_max - w_min) / (2**bits - 1)),  z = round(-w_min / s)
    q = clamp(round(W / s) + z, 0, 2**bits - 1),  W_hat = (q - z) * s

With ``c_lo = c_hi = 1`` this is the project's round-to-nearest (RTN) grid; scales are rounded to
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

CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 ... 0.5, for init_clip="mse"
FP16_TINY = 1e-7  # smallest scale, still non-zero in float16


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (x.round() - x).detach()


def _groups(W: Tensor, group_size: int) -> Tensor:
    """(out, in) -> (out, in // g, g)"""
    out, cols = W.shape
    g = cols if group_size == -1 else group_size
    if cols % g:
        raise InputError(f"group size {group_size} does not divide the {cols} input columns; pick a divisor of {cols} or -1")
    return W.reshape(out, cols // g, g)


def quant_params(W: Tensor, bits: int, group_size: int, c_lo=None, c_hi=None):
    """``(s, z)`` per group (out, in // g) of the asymmetric grid; differentiable in ``c_lo``, ``c_hi``."""
    Wg = _groups(W.detach(), group_size)  # the grid's statistics are constants for the STE
    w_max, w_min = Wg.amax(-1).clamp(min=0), Wg.amin(-1).clamp(max=0)  # (out, G)
    if c_hi is not None:
        w_max, w_min = w_max * c_hi.clamp(0.01, 1.0), w_min * c_lo.clamp(0.01, 1.0)
    qmax = 2**bits - 1
    s = ((w_max - w_min) / qmax).clamp_min(FP16_TINY)
    s = s + (s.half().float() - s).detach()  # stored as float16; straight-through
    z = round_ste(-w_min / s).clamp(0, qmax)
    return s, z


def fake_quantize(W: Tensor, bits: int, group_size: int, c_lo=None, c_hi=None) -> Tensor:
    """``W_hat = (clamp(round(W / s) + z, 0, 2**bits - 1) - z) * s`` with a straight-through round. (out, in)"""
    s, z = quant_params(W, bits, group_size, c_lo, c_hi)
    Wg = _groups(W, group_size)  # (out, G, g)
    q = (round_ste(Wg / s[..., None]) + z[..., None]).clamp(0, 2**bits - 1)
    return ((q - z[..., None]) * s[..., None]).reshape(W.shape)


@torch.no_grad()
def quantize_codes(W: Tensor, bits: int, group_size: int, c_lo=None, c_hi=None):
    """``(q int (out, in), s (out, G), z (out, G))`` with ``W_hat = (q - z) * s`` per group."""
    s, z = quant_params(W, bits, group_size, c_lo, c_hi)
    Wg = _groups(W, group_size)
    q = (torch.round(Wg / s[..., None]) + z[..., None]).clamp(0, 2**bits - 1)
    return q.reshape(W.shape).to(torch.uint8 if bits <= 8 else torch.int32), s, z


@torch.no_grad()
def mse_clip_ratios(W: Tensor, bits: int, group_size: int, grid=CLIP_GRID) -> Tensor:
    """Per-group clipping ratio from ``grid`` minimising ``|W_g - W_hat_g|^2`` (activation-free
    AutoClip-style search, AWQ arXiv 2306.00978 / BitDistiller). (out, G)"""
    Wg = _groups(W, group_size)
    best_err = torch.full(Wg.shape[:2], float("inf"))
    best = torch.ones(Wg.shape[:2])
    for c in grid:
        ratio = torch.full(Wg.shape[:2], c)
        err = (fake_quantize(W, bits, group_size, ratio, ratio) - W).reshape(Wg.shape).pow(2).sum(-1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, ratio, best)
    return best


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
        if not 1 <= bits <= 8:
            raise InputError(f"fake quantization takes 1 to 8 bits, got {bits}")
        self.bits, self.group_size = bits, group_size
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float())
        groups = _groups(self.weight.detach(), group_size).shape[:2]
        c = torch.ones(groups) if clip is None else clip.detach().clone().float()
        if learn_clip:
            self.clip_lo, self.clip_hi = nn.Parameter(c.clone()), nn.Parameter(c.clone())
        else:
            self.register_buffer("clip_lo", c.clone())
            self.register_buffer("clip_hi", c.clone())

    def dequantized(self) -> Tensor:
        """``W_hat`` (out, in), differentiable (straight-through) in the weight and clip ratios."""
        return fake_quantize(self.weight, self.bits, self.group_size, self.clip_lo, self.clip_hi)

    def codes(self):
        """``(q, s, z)`` of the current weight; ``(q - z) * s`` equals :meth:`dequantized`."""
        return quantize_codes(self.weight, self.bits, self.group_size, self.clip_lo, self.clip_hi)

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
    ratio at the weight-MSE-optimal value of :data:`CLIP_GRID` (else 1.0, i.e. RTN min-max).
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
        clip = mse_clip_ratios(W, bits, group_size) if init_clip == "mse" else None
        fq = FakeQuantLinear(W, getattr(lin, "bias", None), bits, group_size, learn_clip=learn_clip, clip=clip,
                             conv1d=type(lin).__name__ == "Conv1D")
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
    with the same codes, scales and zeros (bits 2, 3, 4 or 8); returns the count."""
    from ..quant.grid import GridSpec
    from ..quant.qlinear import QuantLinear

    layers = fake_quant_layers(model)
    for name, m in layers.items():
        q, s, z = m.codes()
        g = m.in_features if m.group_size == -1 else m.group_size
        arch.set_module(model, name, QuantLinear.from_codes(q, s, z, GridSpec(m.bits, g), bias=m.bias))
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
