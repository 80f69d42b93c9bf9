"""A linear layer with bit-packed weights: int2/int3/int4/int8 codes plus fp16 scales and zeros.

Batch-1 decode runs the fused dequantize-and-multiply kernel (``kernels.qmatmul``); many rows
(prefill) dequantize once and use a dense matmul. The plain dequantize path is the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels, pack
from .grid import GridSpec


class QuantLinear(nn.Module):
    kind = "quant"
    lmpress_linear = True

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 ternary: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.ternary = bits, group_size, ternary
        rows, cols = pack.packed_shape((out_features, in_features), bits)
        ng = in_features // group_size
        self.register_buffer("qweight", torch.empty(rows, cols, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, ng, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.empty(out_features, ng, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: GridSpec, bias=None) -> "QuantLinear":
        """Build from codes q (out, in), scales and zeros (out, G)."""
        out_f, in_f = q.shape
        m = cls(in_f, out_f, spec.bits, in_f // s.shape[1], bias is not None, spec.ternary)
        m.qweight.copy_(pack.pack(q, spec.bits))
        m.scales.copy_(s.to(torch.float16))
        m.zeros.copy_(z.to(torch.float16))
        if bias is not None:
            m.bias.data.copy_(bias.detach().float())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:  # the kernel computes in float32
            return self.forward(x.float()).to(x.dtype)
        return kernels.qmatmul(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                               self.out_features, self.bias)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (out, in) this layer computes with (reference path)."""
        return pack.dequantize_packed(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                      (self.out_features, self.in_features))

    @property
    def weight(self) -> torch.Tensor:
        # Read-only float view for code that inspects weights (e.g. tying checks, evaluation).
        return self.dequantized()

    def meta(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "bias": self.bias is not None, "ternary": self.ternary}

    @classmethod
    def empty(cls, meta: dict) -> "QuantLinear":
        return cls(meta["in_features"], meta["out_features"], meta["bits"], meta["group_size"], meta["bias"],
                   meta.get("ternary", False), device="meta")

    def logical_numel(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def replace_linear(model: nn.Module, name: str, q, s, z, spec: GridSpec) -> QuantLinear:
    """Swap the linear layer ``name`` of ``model`` for a packed QuantLinear with these codes."""
    from .. import arch

    old = model.get_submodule(name)
    new = QuantLinear.from_codes(q, s, z, spec, bias=getattr(old, "bias", None))
    arch.set_module(model, name, new)
    return new


def quantize_head_(model: nn.Module, spec: GridSpec) -> None:
    """Quantize the output head with RTN, untying it from the input embedding (which stays float)."""
    from .. import arch
    from .grid import grid_params, quantize_codes

    head = model.get_output_embeddings()
    names = {m: n for n, m in model.named_modules()}
    w = arch.linear_weight(head).detach()
    s, z = grid_params(w, spec)
    replace_linear(model, names[head], quantize_codes(w, s, z, spec), s, z, spec)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
