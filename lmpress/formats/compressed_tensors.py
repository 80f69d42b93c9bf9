"""The compressed-tensors checkpoint format (``pack-quantized``): what transformers, vLLM and
lm-evaluation-harness load, and what llm-compressor writes.

A quantized linear ``name`` with ``b``-bit weights, groups of ``g`` consecutive input columns
(``G = in / g`` groups; per channel ``G = 1``) is stored in ``model.safetensors`` as

* ``name.weight_packed`` int32 ``(out, ceil(in * b / 32))``: the signed codes ``c = q - 2**(b-1)``,
  offset back to unsigned ``q`` and packed densely, least significant bits first, along the
  input dimension: code ``k`` of a row sits at bits ``b*k .. b*k + b - 1`` of the row's bit
  stream, whose 32-bit words are consecutive (3-bit codes straddle word boundaries);
* ``name.weight_scale`` float ``(out, G)``;
* ``name.weight_zero_point`` int32 ``(ceil(out * b / 32), G)``, asymmetric grids only: the signed
  zero points ``z - 2**(b-1)`` packed the same way along the *output* dimension;
* ``name.weight_shape`` int64 ``(2,)`` = ``(out, in)``;

and the weight is ``(c - z_c) * s = (q - z) * s``: lmpress's codes and zeros (``lmpress/quant/pack.py``)
offset by ``2**(b-1)`` on both sides, so they map exactly. lmpress's packed rows are the same
little-endian bit stream, so ``weight_packed`` is ``qweight``'s bytes read as 32-bit words.
Symmetric grids (``z = 2**(b-1)``, ``z_c = 0``) store no zero point. ``config.json`` gets a
``quantization_config`` with one config group per distinct grid::

    "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
        "quantization_status": "compressed", "ignore": ["lm_head", ...],
        "config_groups": {"group_0": {"targets": ["model.layers.0.mlp.down_proj", ...], ...},
            "group_1": {"targets": ["Linear"], "format": "pack-quantized",
                "weights": {"num_bits": 4, "type": "int", "symmetric": false, "strategy": "group",
                            "group_size": 64, "actorder": "weight", "dynamic": false}, ...}}}

The largest group targets the class ``Linear`` and comes last; the others name their layers (an
exact name wins over a class target in compressed-tensors and vLLM), and every linear kept in float
is in ``ignore``. Every group is ``pack-quantized``, so the global format is too (compressed-tensors'
``mixed-precision`` means groups stored in *different* formats). 3-bit codes are packed densely as
compressed-tensors >= 0.20 does (older releases padded each word); 2/4/8 bits are the same in every
release. Pruned layers are written as dense weights with exact zeros.

transformers (5.x, with compressed-tensors 0.20) builds its layers in the compressed layout and
decompresses the whole model on its first forward pass (a forward pre-hook), to the scales' dtype,
which is the model's float dtype (float32 here, so lmpress's fp16 scales stay exact); with
``CompressedTensorsConfig(dequantize=True)`` it dequantizes each layer while loading. See
:func:`transformers_caveat` for the folders it cannot load yet.

Example::

    if (why := compressed_tensors.unsupported(model)) is None:
        compressed_tensors.write(model, folder, {"recipe": [...]})
    model = compressed_tensors.read(folder, json.loads((folder / "config.json").read_text()))
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import arch
from ..errors import InputError
from ..prune.sparse import SparseLinear
from ..quant import pack
from ..quant.grid import BITS
from ..quant.qlinear import QuantLinear

FORMAT = "pack-quantized"
FORMAT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this module writes
EXACT_SCALE_DTYPES = (torch.float16, torch.float32, torch.float64)  # hold lmpress's fp16 scales exactly
_PARAM_NAMES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


# ---- packing: pure functions on codes ---------------------------------------------------------
def pack_words(q: Tensor, bits: int) -> Tensor:
    """Unsigned codes ``q`` (rows, n) in [0, 2**bits) -> int32 (rows, ceil(n * bits / 32)), packed
    densely, least significant bits first."""
    rows, n = q.shape
    padded = torch.zeros(rows, math.ceil(n / 32) * 32, dtype=torch.uint8)  # 32 codes fill `bits` words
    padded[:, :n] = q
    return bytes_to_words(pack.pack(padded, bits))[:, : math.ceil(n * bits / 32)]


def unpack_words(words: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_words`: int32 (rows, ceil(n * bits / 32)) -> codes (rows, n), uint8 for
    the bit widths lmpress packs (the words' little-endian bytes are :func:`pack.pack`'s bytes of the
    codes padded to a multiple of 32: read as such, with no 64-bit temporaries), int64 otherwise."""
    rows = words.shape[0]
    expected = (rows, math.ceil(n * bits / 32))
    if words.dtype != torch.int32 or tuple(words.shape) != expected:
        raise InputError(
            f"packed {bits}-bit codes of {n} columns must be int32 of shape {expected}; got {words.dtype} "
            f"{tuple(words.shape)} (compressed-tensors < 0.20 padded 3/5/6/7-bit words: re-export it with >= 0.20)"
        )
    if bits in BITS and sys.byteorder == "little":
        width = math.ceil(n / 32) * 32
        b = words.contiguous().view(torch.uint8)  # (rows, 4 * words)
        full = width * bits // 8
        if b.shape[1] < full:
            b = torch.cat([b, torch.zeros(rows, full - b.shape[1], dtype=torch.uint8)], 1)
        return pack.unpack(b[:, :full].contiguous(), bits, (rows, width))[:, :n]
    u = words.long() & 0xFFFFFFFF  # (rows, words) as unsigned
    pair = u | (torch.cat([u[:, 1:], torch.zeros_like(u[:, :1])], 1) << 32)  # each word with the next one above it
    start = torch.arange(n) * bits  # (n,) first bit of each code
    return (pair[:, start // 32] >> (start % 32)) & (2**bits - 1)  # (rows, n); bits above 62 are masked off


def bytes_to_words(b: Tensor) -> Tensor:
    """uint8 (rows, k) -> int32 (rows, ceil(k / 4)) little-endian words (zero-padded)."""
    rows, k = b.shape
    padded = torch.zeros(rows, math.ceil(k / 4) * 4, dtype=torch.int64)
    padded[:, :k] = b
    w = (padded.view(rows, -1, 4) << torch.tensor([0, 8, 16, 24])).sum(-1)  # (rows, words) in [0, 2**32)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


# ---- what the format can express --------------------------------------------------------------
def unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot be written as compressed-tensors, or None."""
    return _unsupported(model, _reference(model))


def _unsupported(model: nn.Module, ref: dict[str, nn.Module]) -> str | None:
    return next((why for name, m in model.named_modules() if (why := _why_not(name, m, ref.get(name)))), None)


def _why_not(name: str, m: nn.Module, built: nn.Module | None) -> str | None:
    """Why layer ``m`` cannot be written where transformers builds ``built``, or None."""
    kind = getattr(m, "kind", None)
    own = "save in lmpress's own format"
    if kind in ("lowrank", "dsformer"):
        what = "a low-rank" if kind == "lowrank" else "a DSFormer dense+sparse"
        return f"{name} is {what} layer (kind {kind!r}); compressed-tensors stores only dense or quantized weights: {own}"
    if kind is None:
        return None
    if not isinstance(m, (QuantLinear, SparseLinear)) and kind != "linear":  # "linear": a reshaped nn.Linear
        return f"{name} is a {type(m).__name__} (kind {kind!r}), which compressed-tensors cannot express: {own}"
    conv = arch.is_conv1d(built)
    shape = tuple(built.weight.shape[::-1] if conv else built.weight.shape) if built is not None else None
    if shape != (m.out_features, m.in_features):
        return (f"{name} has {m.out_features}x{m.in_features} weights but the config builds {shape} (non-uniform "
                f"structured pruning): {own}")
    if isinstance(m, QuantLinear) and not isinstance(built, nn.Linear):
        return (f"{name} is quantized but transformers builds it as {type(built).__name__}, and compressed-tensors "
                f"quantizes only nn.Linear layers (GPT-2's Conv1D is not one): {own}")
    return None


def _reference(model: nn.Module) -> dict[str, nn.Module]:
    """The modules transformers builds from ``model``'s config (on the meta device), by name."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return dict(AutoModelForCausalLM.from_config(config).named_modules())


# ---- writing -------------------------------------------------------------------------------------
def write(model: nn.Module, folder: Path, metadata: dict) -> None:
    """Write ``config.json`` and ``model.safetensors`` of ``model`` into the existing empty ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    ref = _reference(model)
    why = _unsupported(model, ref)
    if why:
        raise InputError(f"cannot write compressed-tensors: {why}")
    settings = layer_settings(model, metadata)
    write_config(model.config, folder, settings, float_linears(ref, settings), metadata)
    state = checkpoint_state(model, ref)
    save_file(dict(sorted(state.items())), str(folder / "model.safetensors"), metadata={"format": "pt"})


def layer_settings(model: nn.Module, metadata: dict, prefix: str = "", head: str | None = None) -> dict[str, dict]:
    """``{full name: weights arguments}`` of the QuantLinear layers in ``model`` (a whole model, or
    the block at ``prefix`` of a streamed one: then ``head`` is not in it)."""
    order = _actorder(metadata)  # GPTQ's; the head is quantized with RTN
    if hasattr(model, "get_output_embeddings"):
        head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), head)
    return {prefix + n: weight_args(m, None if prefix + n == head else order)
            for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def write_config(config, folder: Path, settings: dict[str, dict], ignore: list[str], metadata: dict) -> None:
    """``config.json``: the model's config, its ``quantization_config`` and lmpress's metadata."""
    config.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if settings:
        cfg["quantization_config"] = quantization_config(settings, ignore)
    cfg["lmpress"] = {**metadata, "format": "compressed-tensors"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def float_linears(ref: dict[str, nn.Module], quant) -> list[str]:
    return sorted(n for n, m in ref.items() if isinstance(m, nn.Linear) and n not in quant)


def _actorder(metadata: dict) -> str | None:
    """GPTQ's act-order with static groups is compressed-tensors' ``actorder: weight``."""
    gptq = [e for e in metadata.get("recipe", []) if isinstance(e, dict) and e.get("method") == "gptq"]
    return "weight" if any(e.get("act_order") for e in gptq) else None


def weight_args(m: QuantLinear, actorder: str | None) -> dict:
    """The ``weights`` quantization arguments of a QuantLinear, as compressed-tensors spells them."""
    channel = m.group_size == m.in_features
    return {"num_bits": m.bits, "type": "int", "symmetric": _symmetric(m), "dynamic": False,
            "strategy": "channel" if channel else "group", "group_size": None if channel else m.group_size,
            "actorder": actorder}


def _symmetric(m: QuantLinear) -> bool:
    return bool((m.zeros == 2 ** (m.bits - 1)).all())


def quantization_config(settings: dict[str, dict], ignore: list[str]) -> dict:
    """The ``quantization_config`` of ``config.json`` from each quantized layer's weights arguments
    (:func:`weight_args`): one group per distinct setting, the largest targeting ``Linear`` and
    listed last (compressed-tensors tries targets in the groups' order), the others their layers by name."""
    keys = {n: json.dumps(s, sort_keys=True) for n, s in settings.items()}
    counts = Counter(keys.values())
    order = sorted(counts, key=lambda k: (counts[k], k))  # the largest last
    groups = {}
    for i, key in enumerate(order):
        names = sorted(n for n in keys if keys[n] == key)
        groups[f"group_{i}"] = {"targets": ["Linear"] if i == len(order) - 1 else names, "weights": json.loads(key),
                                "input_activations": None, "output_activations": None, "format": FORMAT}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}, "version": FORMAT_VERSION}


def transformers_caveat(quantization_config: dict) -> str | None:
    """What keeps transformers 5.x with compressed-tensors 0.20 from loading a folder written with
    this ``quantization_config`` by a plain ``from_pretrained`` (upstream bugs, pinned in the tests),
    or None. vLLM reads these folders its own way."""
    groups = list(quantization_config.get("config_groups", {}).values())
    if all(g["weights"]["symmetric"] for g in groups):
        return None
    if len(groups) == 1:
        return ("asymmetric zero points: load it in transformers with "
                "quantization_config=CompressedTensorsConfig(dequantize=True) (a plain from_pretrained reports them mismatched)")
    return ("asymmetric zero points in a folder of several settings: transformers cannot load it (a plain from_pretrained "
            "reports the zero points mismatched, dequantize=True applies one setting to every layer); quantize with sym=True")


def compressed_tensors_of(m: QuantLinear, scale_dtype: torch.dtype) -> dict[str, Tensor]:
    """``weight_packed``, ``weight_scale``, ``weight_zero_point`` (asymmetric), ``weight_shape``."""
    out = {"weight_packed": bytes_to_words(m.qweight)[:, : math.ceil(m.in_features * m.bits / 32)],
           "weight_scale": m.scales.to(scale_dtype), "weight_shape": torch.tensor([m.out_features, m.in_features])}
    if not _symmetric(m):
        out["weight_zero_point"] = pack_words(m.zeros.to(torch.uint8).T, m.bits).T.contiguous()  # packed along out
    return out


def checkpoint_state(model: nn.Module, ref: dict[str, nn.Module], *, prefix: str = "",
                     scale_dtype: torch.dtype | None = None, skip: str | None = None) -> dict[str, Tensor]:
    """Every tensor transformers loads, by checkpoint name: quantized layers in the format's tensors,
    sparse layers dense, the rest as they are; a tied tensor once (under its first name).
    ``model`` may be one block of a streamed model, named from ``prefix``; ``skip``: leave out the
    tensors under this prefix (a streamed model's blocks, written already). ``scale_dtype``: the
    scales' dtype (default: the embedding's where it holds fp16 exactly, else float32)."""
    if scale_dtype is None:
        emb = model.get_input_embeddings().weight.dtype
        scale_dtype = emb if emb in EXACT_SCALE_DTYPES else torch.float32
    special = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, SparseLinear))}
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        owner = k.rpartition(".")[0]
        if owner in special and not k.endswith(".bias") or skip and k.startswith(skip):
            continue
        if v.data_ptr() in seen and v.numel():
            continue  # tied to a tensor already written
        seen.add(v.data_ptr())
        state[prefix + k] = v.detach().contiguous()
    for name, m in special.items():
        if skip and name.startswith(skip):
            continue
        if isinstance(m, QuantLinear):
            state.update({f"{prefix}{name}.{k}": v for k, v in compressed_tensors_of(m, scale_dtype).items()})
        else:
            W = m.dense_weight().to(m.values.dtype)  # (out, in), exact zeros
            state[f"{prefix}{name}.weight"] = W.T.contiguous() if arch.is_conv1d(ref.get(prefix + name)) else W
    return state


# ---- reading ---------------------------------------------------------------------------------------
def is_compressed_tensors(raw_config: dict) -> bool:
    """Whether a ``config.json`` (as a dict) describes a compressed-tensors checkpoint."""
    qc = raw_config.get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors" or raw_config.get("lmpress", {}).get("format") == "compressed-tensors"


def read(path: Path, raw_config: dict) -> nn.Module:
    """Load a compressed-tensors ``pack-quantized`` folder (lmpress's or llm-compressor's).

    Layers whose layout lmpress packs exactly (2/3/4/8 bits, contiguous groups, fp16-exact scales)
    become :class:`QuantLinear`; other quantized weights are dequantized exactly to float32 in
    their float layer. ``model.lmpress_load_note`` says which.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    groups, ignore = _check_config(raw_config.get("quantization_config") or {}, path)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}  # shards too
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary) computed
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    packed = sorted(k.removesuffix(".weight_packed") for k in state if k.endswith(".weight_packed"))
    check_untied_head(model, packed, path)
    kinds = Counter()
    for name in packed:
        module = model.get_submodule(name)
        layer = {k: state.pop(f"{name}.{k}") for k in _PARAM_NAMES if f"{name}.{k}" in state}
        built, kind = build_layer(layer, _scheme_for(name, module, groups, ignore, path), module, state.get(f"{name}.bias"))
        if isinstance(built, Tensor):
            state[f"{name}.weight"] = built
        else:
            arch.set_module(model, name, built)
        kinds[kind] += 1
    _load_rest(model, state, path)
    model.lmpress_load_note = "compressed-tensors: " + ", ".join(f"{n} layers as {k}" for k, n in sorted(kinds.items()))
    model.lmpress_recipe = raw_config.get("lmpress", {}).get("recipe", [])
    return model.eval()


def check_untied_head(model: nn.Module, packed: list[str], path: Path) -> None:
    """A packed output head must not be tied to the (float) input embedding."""
    head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    if head in packed and getattr(model.config, "tie_word_embeddings", False):
        raise InputError(f"{path}: {head} is quantized but tied to the input embedding; set tie_word_embeddings: false")


def _check_config(qc: dict, path: Path) -> tuple[list[dict], list[str]]:
    """The config groups (weights arguments + targets) and the ignore list, or a clear refusal."""
    if not qc:
        return [], []  # lmpress's compressed-tensors folder of a pruned-only model: dense weights
    fmt = qc.get("format")
    groups = list((qc.get("config_groups") or {}).values())
    formats = {g.get("format") or fmt for g in groups}
    bad = sorted(map(str, (({fmt} - {"mixed-precision"}) | formats) - {FORMAT}))
    if bad:
        raise InputError(f"{path}: compressed-tensors format {', '.join(bad)} is not one lmpress reads; it reads "
                         f"{FORMAT!r} (integer weight-only quantization, as llm-compressor's W4A16/W8A16 write)")
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if qc.get(key):
            raise InputError(f"{path}: compressed-tensors {key} is set; lmpress reads weight-only quantization without it")
    for g in groups:
        if not isinstance(g, dict) or g.get("input_activations") or g.get("output_activations"):
            raise InputError(f"{path}: config group {g} quantizes activations (or is a preset name); lmpress reads "
                             "weight-only schemes given in full")
        w = g.get("weights") or {}
        if w.get("type", "int") != "int" or not 1 <= w.get("num_bits", 8) <= 8 or w.get("dynamic"):
            raise InputError(f"{path}: weights {w} are not static 1-8 bit integers; lmpress reads {FORMAT!r} int weights")
        if w.get("strategy") not in ("group", "channel", "tensor"):
            raise InputError(f"{path}: weight strategy {w.get('strategy')!r} is not one lmpress reads (group, channel, tensor)")
    return groups, list(qc.get("ignore") or [])


def _matches(name: str, module: nn.Module, target: str) -> bool:
    """compressed-tensors' target rule: ``re:`` regex on the name, an exact name, or a class name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target in {c.__name__ for c in type(module).__mro__}


def _scheme_for(name: str, module: nn.Module, groups: list[dict], ignore: list[str], path: Path) -> dict:
    """The weights arguments of the group targeting ``name``: exact names first, then regexes, then classes."""
    ranked = []
    for g in groups:
        for t in g["targets"]:
            if _matches(name, module, t):
                rank = 0 if t == name else 1 if t.startswith("re:") else 2
                ranked.append((rank, t, g["weights"]))
    if not ranked or any(_matches(name, module, t) for t in ignore):
        raise InputError(f"{path}: {name} has packed weights but no config group targets it; the config is inconsistent")
    return min(ranked, key=lambda r: r[:2])[2]


def build_layer(layer: dict[str, Tensor], args: dict, module: nn.Module, bias: Tensor | None):
    """``(QuantLinear, kind)`` holding one packed layer exactly, or ``(float32 weight, kind)`` where
    lmpress's QuantLinear cannot hold it (:func:`_why_float`): its exact dequantized weight. A packed shape
    other than the model's layer is refused (the checkpoint does not belong to this config)."""
    _check_shape_matches(layer, module)
    why = _why_float(layer, args, module)
    if why:
        return dequantize_layer(layer, args), f"float {type(module).__name__} with the exact dequantized weights ({why})"
    return _layer(layer, args, bias), f"QuantLinear {args['num_bits']}-bit"


def _check_shape_matches(layer: dict[str, Tensor], module: nn.Module) -> None:
    shape = tuple(int(d) for d in layer["weight_shape"])
    want = (getattr(module, "out_features", None), getattr(module, "in_features", None))
    if None not in want and shape != want:
        raise InputError(f"a packed layer's weight_shape {shape} is not the model's {type(module).__name__} {want}: "
                         "the weights do not belong to this config.json; re-export the folder")


def empty_layer(layer: dict[str, Tensor], args: dict, module: nn.Module) -> nn.Module | None:
    """The layer :func:`build_layer` makes, on the meta device (shapes and storage, no values), from the
    packed layer's scales, shape and g_idx (its codes are not needed); None when it stays a float layer."""
    _check_shape_matches(layer, module)
    if _why_float(layer, args, module):
        return None
    out, cols = (int(d) for d in layer["weight_shape"])
    groups = _scales(layer).shape[1]
    return QuantLinear.empty({"in_features": cols, "out_features": out, "bits": args["num_bits"],
                              "group_size": cols // groups, "bias": getattr(module, "bias", None) is not None})


def _scales(layer: dict[str, Tensor]) -> Tensor:
    """The stored scales as (out, G), or (1, G) for one scale per tensor."""
    out = int(layer["weight_shape"][0])
    return layer["weight_scale"].reshape(out if layer["weight_scale"].numel() >= out else 1, -1)


def scales_zeros(layer: dict[str, Tensor], args: dict) -> tuple[Tensor, Tensor]:
    """Scales s and unsigned zeros z (out, G) of one packed layer."""
    bits = args["num_bits"]
    out = int(layer["weight_shape"][0])
    s = _scales(layer).expand(out, -1)
    zp = layer.get("weight_zero_point")
    if args.get("symmetric", True) or zp is None:
        z = torch.full(s.shape, 2 ** (bits - 1), dtype=torch.int64)
    elif zp.dtype == torch.int32 and zp.shape[0] != out:
        z = unpack_words(zp.T.contiguous(), bits, out).T  # packed along the output dimension
    else:
        z = zp.reshape(s.shape).long() + 2 ** (bits - 1)  # older releases stored plain int8 zero points
    return s, z.expand(s.shape)


def codes_of(layer: dict[str, Tensor], args: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Unsigned codes q (out, in), scales s and unsigned zeros z (out, G) of one packed layer."""
    cols = int(layer["weight_shape"][1])
    return (unpack_words(layer["weight_packed"], args["num_bits"], cols), *scales_zeros(layer, args))


def packed_bytes(words: Tensor, bits: int, n: int) -> Tensor | None:
    """:func:`pack.pack`'s bytes (rows, n * bits / 8) of the codes in ``words`` (int32, as
    :func:`pack_words` writes them), read in place of the words: their little-endian bytes are the
    dense codes, least significant bits first. None where that does not hold byte for byte (a row
    that ends inside a byte, a big-endian host)."""
    if bits not in BITS or n * bits % 8 or sys.byteorder != "little" or 4 * words.shape[1] < n * bits // 8:
        return None
    return words.contiguous().view(torch.uint8)[:, : n * bits // 8]


def dequantize_layer(layer: dict[str, Tensor], args: dict) -> Tensor:
    """The exact float32 weight (out, in) of one packed layer: ``(q - z) * s`` per group."""
    q, s, z = codes_of(layer, args)
    out, cols = q.shape
    g_idx = layer.get("weight_g_idx")
    if g_idx is None:
        g_idx = torch.arange(cols) // (cols // s.shape[1])  # contiguous groups
    g_idx = g_idx.long()
    return (q - z[:, g_idx]).float() * s[:, g_idx].float()


def _why_float(layer: dict[str, Tensor], args: dict, module: nn.Module) -> str | None:
    """Why lmpress's QuantLinear cannot hold this packed layer exactly, or None when it can."""
    bits = args["num_bits"]
    out, cols = (int(d) for d in layer["weight_shape"])
    scale = layer["weight_scale"]
    if not isinstance(module, nn.Linear):
        return f"a quantized {type(module).__name__}"
    if bits not in BITS:
        return f"{bits}-bit codes, which lmpress does not pack"
    if "weight_g_idx" in layer:
        return "groups permuted by g_idx"
    try:
        pack.packed_shape((out, cols), bits)
    except InputError:
        return f"in_features {cols} that lmpress's {bits}-bit packing cannot hold"
    if not torch.isfinite(scale).all() or not torch.equal(scale.half().float(), scale.float()):
        return f"{str(scale.dtype).removeprefix('torch.')} scales that fp16 cannot hold exactly"
    return None


def _layer(layer: dict[str, Tensor], args: dict, bias: Tensor | None) -> QuantLinear:
    """The QuantLinear holding exactly this packed layer (for which :func:`_why_float` is None): the
    packed bytes are taken as they are where they are lmpress's (:func:`packed_bytes`; no codes are
    unpacked, so a layer needs no more memory than its bytes), else unpacked and packed again."""
    from ..quant.grid import GridSpec

    bits = args["num_bits"]
    shape = tuple(int(d) for d in layer["weight_shape"])
    s, z = scales_zeros(layer, args)
    raw = packed_bytes(layer["weight_packed"], bits, shape[1])
    q = None
    if raw is None or tuple(raw.shape) != pack.packed_shape(shape, bits) or (bits == 2 and bool((z == 1).all())):
        q = unpack_words(layer["weight_packed"], bits, shape[1])  # also what tells a ternary layer
    ternary = q is not None and bits == 2 and bool((z == 1).all()) and int(q.max()) <= 2
    spec = GridSpec(bits, shape[1] // s.shape[1], ternary=ternary)
    bias = None if bias is None else bias.float()
    if q is not None:
        return QuantLinear.from_codes(q.to(torch.uint8), s.float(), z.float(), spec, bias=bias)
    return QuantLinear.from_packed(raw, shape, s.float(), z.float(), spec, bias=bias)


def _load_rest(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Assign the remaining float tensors (as float32), tie, and check nothing is missing."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise InputError(f"{path}: tensors {unexpected[:3]} match no layer of {type(model).__name__}; "
                         "the checkpoint's names differ from transformers' (a renamed or fused layout lmpress does not map)")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise InputError(f"{path}: tensors missing from model.safetensors: {missing[:3]}; the save is incomplete")
