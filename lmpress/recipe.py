"""Recipes: an ordered list of method configs, in Python, YAML, or saved with a model.

Each method has one frozen dataclass config (``GPTQConfig``, ``WandaConfig``, ...) with a ``method``
class attribute; the same object is the Python argument, the recipe entry and the metadata saved
with the compressed model. A YAML recipe is a list of mappings::

    - method: gptq
      bits: 4
      group_size: 64
    - method: distill
      tokens: 2000000

Methods are registered here explicitly (name -> module, config class, function), imported on use.
Every method function has the signature ``fn(model, cfg, ctx: RunContext) -> dict`` and changes the
model in place; the dict it returns (per-layer figures) goes into the report.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

# method name -> (module, config class, function)
METHODS: dict[str, tuple[str, str, str]] = {
    "rtn": ("lmpress.quant.rtn", "RTNConfig", "rtn_"),
    "gptq": ("lmpress.quant.gptq", "GPTQConfig", "gptq_"),
    "awq": ("lmpress.quant.awq", "AWQConfig", "awq_"),
    "magnitude": ("lmpress.prune.unstructured", "MagnitudeConfig", "magnitude_"),
    "wanda": ("lmpress.prune.unstructured", "WandaConfig", "wanda_"),
    "sparsegpt": ("lmpress.prune.sparsegpt", "SparseGPTConfig", "sparsegpt_"),
    "prune-width": ("lmpress.prune.structured", "WidthPruneConfig", "prune_width_"),
    "prune-depth": ("lmpress.prune.structured", "DepthPruneConfig", "prune_depth_"),
    "svd": ("lmpress.lowrank.svd", "SVDConfig", "svd_"),
    "asvd": ("lmpress.lowrank.svd", "ASVDConfig", "asvd_"),
    "svd-llm": ("lmpress.lowrank.svd", "SVDLLMConfig", "svd_llm_"),
    "dsformer": ("lmpress.lowrank.dsformer", "DSFormerConfig", "dsformer_"),
    "distill": ("lmpress.distill.engine", "DistillConfig", "distill_"),
}


@dataclass
class RunContext:
    """What a method may need besides the model and its config."""

    calib: Any = None  # (n, L) calibration token ids, or None
    tokenizer: Any = None
    teacher: Any = None  # the uncompressed model, for distillation / error checks
    data: Any = None  # the DataConfig used
    progress: bool = True
    extra: dict = field(default_factory=dict)


def _entry(name: str):
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    mod, cls, fn = METHODS[name]
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("lmpress"):
            raise InputError(f"method {name!r} is not available in this lmpress build ({e.name} missing)")
        raise
    return getattr(module, cls), getattr(module, fn)


def config_class(name: str):
    return _entry(name)[0]


def make_config(name: str, **fields):
    """Build the config of method ``name`` from keyword fields, with clear errors for bad fields."""
    cls = config_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(fields) - known)
    if bad:
        raise InputError(f"method {name!r} has no option(s) {', '.join(bad)}; its options: {', '.join(sorted(known))}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise InputError(f"bad options for {name!r}: {e}")


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
    """Apply one method config to ``model`` in place."""
    _, fn = _entry(cfg.method)
    return fn(model, cfg, ctx) or {}
