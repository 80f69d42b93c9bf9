"""Recipes: an ordered list of method configs, in Python, YAML, or saved with a model.

Each method has one frozen dataclass config (``GPTQConfig``, ``WandaConfig``, ...) with a ``method``
class attribute; the same object is the Python argument, the recipe entry and the metadata saved
with the compressed model. A YAML recipe is a list of mappings::

    - method: gptq
      bits: 4
      group_size: 64
    - method: distill
      tokens: 2000000

Methods are registered here explicitly (:data:`METHODS`: name -> module, config class, function,
family, summary, finishing step), imported on use. Every method function has the signature
``fn(model, cfg, ctx: RunContext) -> dict`` and changes the model in place; the dict it returns
(per-layer figures) goes into the report.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

@dataclass(frozen=True)
class Method:
    """A registry entry: where the method lives, a one-line summary (the CLI's help) and the finishing
    step run right after it (``"module:function"``, called ``fn(model, cfg) -> dict``), so that
    ``lmpress.prune_(model, cfg)`` and a recipe give the same model from one config. The method's
    family (quant, prune, lowrank, distill) is its config's ``family`` class attribute."""

    module: str
    config: str
    fn: str
    summary: str
    finish: str | None = None


_SPARSE = "lmpress.prune.sparse:store_sparse_"
METHODS: dict[str, Method] = {
    "rtn": Method("lmpress.quant.rtn", "RTNConfig", "rtn_", "round-to-nearest weight quantization"),
    "gptq": Method("lmpress.quant.gptq", "GPTQConfig", "gptq_", "GPTQ: quantization with Hessian error feedback"),
    "awq": Method("lmpress.quant.awq", "AWQConfig", "awq_", "AWQ: activation-aware scaling, then rounding"),
    "magnitude": Method("lmpress.prune.unstructured", "MagnitudeConfig", "magnitude_", "unstructured / N:M pruning by weight magnitude", _SPARSE),
    "wanda": Method("lmpress.prune.unstructured", "WandaConfig", "wanda_", "Wanda: pruning by |weight| x input norm", _SPARSE),
    "sparsegpt": Method("lmpress.prune.sparsegpt", "SparseGPTConfig", "sparsegpt_", "SparseGPT: pruning with Hessian updates (with bits: joint pruning + quantization)", _SPARSE),
    "prune-width": Method("lmpress.prune.width", "WidthPruneConfig", "prune_width_", "structured width pruning (heads, MLP channels, hidden)"),
    "prune-depth": Method("lmpress.prune.depth", "DepthPruneConfig", "prune_depth_", "depth pruning (drop whole blocks)"),
    "svd": Method("lmpress.lowrank.svd", "SVDConfig", "svd_", "truncated SVD of each linear"),
    "asvd": Method("lmpress.lowrank.svd", "ASVDConfig", "asvd_", "activation-aware SVD"),
    "svd-llm": Method("lmpress.lowrank.svd", "SVDLLMConfig", "svd_llm_", "SVD-LLM: truncation-aware whitening"),
    "dsformer": Method("lmpress.lowrank.dsformer", "DSFormerConfig", "dsformer_", "DSFormer: dense x sparse factorization"),
    "distill": Method("lmpress.distill.engine", "DistillConfig", "distill_", "distillation toward the original model (also QAT with qat_bits)"),
}


def methods_help() -> str:
    """One line per registered method, for the CLI's help."""
    return "; ".join(f"{n}: {m.summary}" for n, m in METHODS.items())


@dataclass
class RunContext:
    """What a method may need besides the model and its config."""

    calib: Any = None  # (n, L) calibration token ids, or None
    tokenizer: Any = None
    teacher: Any = None  # the uncompressed model, for distillation / error checks
    data: Any = None  # the DataConfig used
    progress: bool = True
    extra: dict = field(default_factory=dict)


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("lmpress"):
            raise InputError(f"{module} is not available in this lmpress build ({e.name} missing)")
        raise


def entry(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _entry(name: str):
    m = entry(name)
    module = _import(m.module)
    return getattr(module, m.config), getattr(module, m.fn)


def family(cfg) -> str:
    return type(cfg).family


def config_class(name: str):
    return _entry(name)[0]


def make_config(name: str, **fields):
    """Build the config of method ``name`` from keyword fields, with clear errors for bad fields."""
    cls = config_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(fields) - known)
    if bad:
        raise InputError(f"method {name!r} has no option(s) {', '.join(bad)}; its options: {', '.join(sorted(known))}")
    for key, value in fields.items():
        _check_type(name, key, value, hints(cls)[key])
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise InputError(f"bad options for {name!r}: {e}")


def hints(cls) -> dict:
    import typing

    return typing.get_type_hints(cls)


_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def _check_type(method: str, key: str, value, hint) -> None:
    """A recipe value of the wrong type (``bits: 4.0``, ``group_size: '32'``) is a clear error, not a
    traceback deep inside the method."""
    import types
    import typing

    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    simple = [t for t in allowed if t in _WORDS]
    if value is None and type(None) in allowed or len(simple) < len([t for t in allowed if t is not type(None)]):
        return  # None where allowed; containers and other types are checked by the config itself
    ok = any(isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))
             or (t is float and isinstance(value, int) and not isinstance(value, bool)) for t in simple)
    if not ok:
        want = " or ".join(_WORDS[t] for t in simple) + (" or null" if type(None) in allowed else "")
        raise InputError(f"method {method!r}: {key} must be {want}, got {value!r}")


def to_dict(cfg) -> dict:
    return {"method": cfg.method, **dataclasses.asdict(cfg)}


def from_dict(d: dict):
    d = dict(d)
    if "method" not in d:
        raise InputError(f"recipe entry {d} has no 'method'")
    return make_config(d.pop("method"), **d)


def load_recipe(path: str | Path) -> list:
    import yaml

    path = Path(path)
    if not path.exists():
        raise InputError(f"no such recipe file: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{path} is not valid YAML: {e}")
    if isinstance(raw, dict) and "recipe" in raw:
        raw = raw["recipe"]
    if not isinstance(raw, list) or not all(isinstance(x, dict) for x in raw):
        raise InputError(f"{path}: a recipe is a YAML list of mappings, each with a 'method' key")
    return [from_dict(x) for x in raw]


def needs_calibration(cfg) -> bool:
    return bool(getattr(cfg, "needs_calibration", False))


def apply(model, cfg, ctx: RunContext) -> dict:
    """Apply one method config to ``model`` in place, then its finishing step; returns its figures.
    Compact sparse layers of an earlier step are turned back into dense ones first (exactly), so
    every method sees the plain layers it expects; the finishing step stores them compactly again."""
    from .counts import forget_stored_dtypes
    from .prune.sparse import densify_

    _, fn = _entry(cfg.method)
    forget_stored_dtypes(model)  # its tensors are now lmpress's, saved as held
    densify_(model)
    info = fn(model, cfg, ctx) or {}
    finish = entry(cfg.method).finish
    if finish:
        mod, _, name = finish.partition(":")
        info = {**info, **(getattr(_import(mod), name)(model, cfg) or {})}
    return info
