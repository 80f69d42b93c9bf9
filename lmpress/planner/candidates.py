"""What a plan chooses among: layer groups, their candidates, and the exact bytes of each.

A *group* is the set of linears that must share one choice: per decoder block, the projections that
read the same input and run as one fused kernel (q/k/v; gate/up), and each other linear alone (o,
down); plus the output head. A *candidate* is one setting of lmpress's grid
(:mod:`lmpress.quant.grid`: 2/3/4/8 bits x group size) or keeping the layer in float.

Bytes are those lmpress stores (:class:`lmpress.quant.qlinear.QuantLinear`): packed codes
``out * in * bits / 8``, fp16 scales and zeros ``2 * 2 * out * in / group_size``, a float32 bias;
a float layer stores its weight at its own dtype. A tied output head shares the (float) input
embedding, so keeping it float costs nothing more, while quantizing it unties it and adds its bytes
(lmpress keeps embeddings in float).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import arch
from ..quant.grid import BITS, GridSpec

# linears that read one input and run fused: they share one choice (ModelOpt, vLLM do the same)
FUSED = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"query_key_value"}, {"w1", "w3"})


@dataclass(frozen=True)
class Candidate:
    """One setting: ``bits`` on lmpress's grid with ``group_size`` columns per scale (-1: per output
    channel), or one of llama.cpp's block types ``gguf`` (``bits`` its code width, ``group_size`` its
    block), or ``bits=None``: keep the layer in float."""

    bits: int | None
    group_size: int = -1
    gguf: str | None = None

    @property
    def label(self) -> str:
        if self.bits is None:
            return "float"
        if self.gguf:
            return self.gguf
        return f"w{self.bits}" + ("pc" if self.group_size == -1 else f"g{self.group_size}")

    def spec(self, sym: bool = False) -> GridSpec | str | None:
        """The grid to round to: a GridSpec, a ggml type name, or None (float)."""
        if self.bits is None:
            return None
        return self.gguf or GridSpec(self.bits, self.group_size, sym)


FLOAT = Candidate(None)


@dataclass(frozen=True)
class Group:
    """Layers that share one choice. ``kind``: qkv, o, gate_up, down, ... or head; ``block``: the
    decoder block index (None for the head). ``bytes[i]``: stored bytes under ``candidates[i]``."""

    name: str
    kind: str
    block: int | None
    layers: tuple[str, ...]  # full module names
    shapes: tuple[tuple[int, int], ...]  # (out, in) of each layer
    candidates: tuple[Candidate, ...]
    bytes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return sum(o * i for o, i in self.shapes)


def quant_bytes(out: int, cols: int, cand: Candidate, *, bias: bool, float_size: int) -> int:
    """Exact stored bytes of one (out, in) linear under ``cand`` (see the module docstring)."""
    b = 4 * out if bias else 0
    if cand.bits is None:
        return out * cols * float_size + (out * float_size if bias else 0)
    if cand.gguf:  # ggml blocks: type_size bytes per block of weights (the file's F32 bias besides)
        from ..quant.ggml import row_bytes

        return out * row_bytes(cand.gguf, cols) + b
    g = cols if cand.group_size == -1 else cand.group_size
    return out * cols * cand.bits // 8 + 2 * 2 * out * (cols // g) + b


def grid_candidates(bits=BITS, group_sizes=(32, 64, -1)) -> tuple[Candidate, ...]:
    return tuple(Candidate(b, g) for b in bits for g in group_sizes)


# llama.cpp's block types a GGUF plan chooses among by default (fallbacks of the K types included)
GGUF_TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "IQ4_NL", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")


def gguf_candidates(types=GGUF_TYPES) -> tuple[Candidate, ...]:
    """One candidate per ggml block type (code width, block), for a GGUF plan."""
    from ..quant import ggml

    return tuple(Candidate(bt.bits, bt.block, bt.name) for bt in map(ggml.block_type, types))


def _fits(cand: Candidate, shapes) -> bool:
    from ..quant.pack import _IN_MULTIPLE

    if cand.bits is None:
        return True
    if cand.gguf:  # the type itself, not llama.cpp's fallback (which is a candidate of its own)
        return all(i % cand.group_size == 0 for _, i in shapes)
    return all((cand.group_size == -1 or i % cand.group_size == 0) and i % _IN_MULTIPLE[cand.bits] == 0
               for _, i in shapes)


def _kind(suffixes: list[str]) -> str:
    return "_".join(s.split(".")[-1].removesuffix("_proj") for s in suffixes)


def _block_groups(block) -> list[list[str]]:
    """Names (relative to the block) of each group, in module order."""
    names = list(arch.block_linears(block))
    groups: list[list[str]] = []
    for n in names:
        fused = next((f for f in FUSED if n.split(".")[-1] in f), None)
        home = next((g for g in groups if fused and g[0].split(".")[-1] in fused
                     and g[0].rpartition(".")[0] == n.rpartition(".")[0]), None)
        if home is not None:
            home.append(n)
        else:
            groups.append([n])
    return groups


def _make_group(name, kind, block, layers, mods, cands, tied_head=False) -> Group:
    shapes = tuple(tuple(arch.linear_weight(m).shape) for m in mods)
    ok = tuple(c for c in cands if _fits(c, shapes))
    nbytes = []
    for c in ok:
        if tied_head and c.bits is None:
            nbytes.append(0)  # shares the float input embedding
            continue
        nbytes.append(sum(quant_bytes(o, i, c, bias=getattr(m, "bias", None) is not None,
                                      float_size=arch.linear_weight(m).element_size())
                          for (o, i), m in zip(shapes, mods)))
    return Group(name, kind, block, tuple(layers), shapes, ok, tuple(nbytes))


def layer_groups(model, candidates: tuple[Candidate, ...], head_bits=(4, 8), head_group_size: int = 64,
                 keep_float: bool = True) -> list[Group]:
    """Every group of ``model`` with the candidates that fit its shapes (and float, unless not
    ``keep_float``). The head's candidates are float and ``head_bits`` at ``head_group_size`` (the
    recipe's ``head_bits``)."""
    spec = arch.spec_for(model)
    out = []
    for i, block in enumerate(arch.blocks(model)):
        mods = arch.block_linears(block)
        for names in _block_groups(block):
            full = [f"{spec.blocks}.{i}.{n}" for n in names]
            out.append(_make_group(f"{spec.blocks}.{i}.{_kind(names)}", _kind(names), i, full,
                                   [mods[n] for n in names], (FLOAT, *candidates) if keep_float else candidates))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head_bits and arch.is_dense_linear(head):
        hname = next(n for n, m in model.named_modules() if m is head)
        tied = head.weight is model.get_input_embeddings().weight
        hc = (FLOAT, *(Candidate(b, head_group_size) for b in head_bits))
        out.append(_make_group(hname, "head", None, [hname], [head], hc, tied_head=tied))
    return out


def fixed_bytes(model, groups: list[Group]) -> int:
    """Bytes of everything no group changes (embeddings, norms, ...): the model's tensor bytes less
    each group's float bytes."""
    from ..evaluate import tensor_bytes

    return tensor_bytes(model) - sum(g.bytes[g.candidates.index(FLOAT)] for g in groups)
