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
        return cls.from_packed(pack.pack(q, spec.bits), tuple(q.shape), s, z, spec, bias)

    @classmethod
    def from_packed(cls, packed: torch.Tensor, shape: tuple[int, int], s: torch.Tensor, z: torch.Tensor, spec: GridSpec,
                    bias=None) -> "QuantLinear":
        """Build from codes already packed (:func:`pack.pack`'s bytes) of a weight of ``shape`` (out, in)."""
        out_f, in_f = shape
        m = cls(in_f, out_f, spec.bits, in_f // s.shape[1], bias is not None, spec.ternary)
        m.qweight.copy_(packed)
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


def _ggml_values(raw: torch.Tensor, gtype: str, shape: tuple[int, int]) -> torch.Tensor:
    """The float32 weight (out, in) that llama.cpp reads from the ggml bytes ``raw`` (out, row bytes)."""
    import gguf

    if raw.is_meta:
        return torch.empty(shape, device="meta")
    w = gguf.quants.dequantize(raw.cpu().numpy(), gguf.GGMLQuantizationType[gtype])
    return torch.from_numpy(w.reshape(shape).astype("float32", copy=False))


class GGMLLinear(nn.Module):
    """A linear layer solved on one of llama.cpp's block grids: its ggml bytes (``raw``, uint8
    (out, row bytes), exactly what a GGUF file holds) and the type name. It computes with the
    dequantized weight (cached), which the GGUF writer never re-rounds: it writes ``raw``."""

    kind = "ggml"
    lmpress_linear = True

    def __init__(self, in_features: int, out_features: int, gtype: str, bias: bool, device=None):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        super().__init__()
        self.in_features, self.out_features, self.gtype = in_features, out_features, gtype
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[gtype]]
        self.register_buffer("raw", torch.empty(out_features, in_features // block * size, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self._cache: tuple[int, torch.Tensor] | None = None

    @classmethod
    def from_blocks(cls, bq, bias=None) -> "GGMLLinear":
        """From a solved :class:`lmpress.quant.ggml.BlockQuant`."""
        from . import ggml

        out_f, in_f = bq.q.shape
        m = cls(in_f, out_f, bq.gtype, bias is not None)
        m.raw.copy_(torch.from_numpy(ggml.encode(bq)))
        if bias is not None:
            m.bias.data.copy_(bias.detach().float())
        return m

    def dequantized(self) -> torch.Tensor:
        key = self.raw.data_ptr()
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, _ggml_values(self.raw, self.gtype, (self.out_features, self.in_features)))
        return self._cache[1]

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.float(), self.dequantized().to(x.device), self.bias).to(x.dtype)

    def meta(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "gtype": self.gtype,
                "bias": self.bias is not None}

    @classmethod
    def empty(cls, meta: dict) -> "GGMLLinear":
        return cls(meta["in_features"], meta["out_features"], meta["gtype"], meta["bias"], device="meta")

    def logical_numel(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, gtype={self.gtype}"


class GGMLEmbedding(nn.Embedding):
    """A token embedding on a ggml grid: ``weight`` holds the dequantized values (so a tied output
    head shares them), ``raw`` the ggml bytes the GGUF writer stores."""

    kind = "ggml_embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, gtype: str, padding_idx=None, device=None):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device)
        self.gtype = gtype
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[gtype]]
        self.register_buffer("raw", torch.empty(num_embeddings, embedding_dim // block * size, dtype=torch.uint8, device=device))

    @classmethod
    def from_blocks(cls, bq, padding_idx=None) -> "GGMLEmbedding":
        from . import ggml

        n, dim = bq.q.shape
        m = cls(n, dim, bq.gtype, padding_idx)
        with torch.no_grad():
            m.raw.copy_(torch.from_numpy(ggml.encode(bq)))
            m.weight.copy_(_ggml_values(m.raw, bq.gtype, (n, dim)))
        m.weight.requires_grad_(False)
        return m

    def meta(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "gtype": self.gtype,
                "padding_idx": self.padding_idx}

    @classmethod
    def empty(cls, meta: dict) -> "GGMLEmbedding":
        return cls(meta["num_embeddings"], meta["embedding_dim"], meta["gtype"], meta["padding_idx"], device="meta")

    def logical_numel(self) -> int:
        return self.num_embeddings * self.embedding_dim


def ggml_embeddings_(model: nn.Module, types: dict[str, str]) -> None:
    """Put the token embedding and the output head of ``model`` on ggml grids, ``types`` mapping
    ``token_embd.weight`` / ``output.weight`` to a type (llama.cpp's round-to-nearest, as its own
    quantizer stores them); a tied head keeps sharing the embedding's (dequantized) weight."""
    from .. import arch
    from . import ggml

    emb = model.get_input_embeddings()
    names = {m: n for n, m in model.named_modules()}
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb.weight
    t = types.get("token_embd.weight")
    if t in ggml.TYPES:
        new = GGMLEmbedding.from_blocks(ggml.quantize(emb.weight.detach().float(), t), emb.padding_idx)
        arch.set_module(model, names[emb], new)
        if tied:
            model.get_output_embeddings().weight = new.weight
    head = model.get_output_embeddings()
    t = types.get("output.weight")
    if not tied and head is not None and t in ggml.TYPES:
        w = arch.linear_weight(head).detach().float()
        arch.set_module(model, names[head], GGMLLinear.from_blocks(ggml.quantize(w, t), getattr(head, "bias", None)))
