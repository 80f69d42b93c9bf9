"""lmpress: compress Transformer language models (quantization, pruning, distillation, low-rank),
measured honestly.

Importing ``lmpress`` is cheap: the API below is loaded on first use.
"""

from __future__ import annotations

import importlib
import sys
import types

from .recipe import METHODS as _methods  # a plain table: importing it is cheap

__version__ = "0.1.0"

_API = {
    "load_model": "lmpress.io",
    "open_model": "lmpress.api",
    "save_model": "lmpress.io",
    "evaluate": "lmpress.api",
    "describe": "lmpress.api",
    "compress": "lmpress.api",
    "apply_": "lmpress.api",
    "quantize_": "lmpress.api",
    "prune_": "lmpress.api",
    "factorize_": "lmpress.api",
    "export": "lmpress.io",
    "distill": "lmpress.distill.engine",
    "plan": "lmpress.planner.run",
    "PlanConfig": "lmpress.planner.config",
    "DataConfig": "lmpress.data",
    "prepare": "lmpress.data",
    "walk_blocks": "lmpress.calib",
    "LmpressError": "lmpress.errors",
    "InputError": "lmpress.errors",
}


# every method's config class (GPTQConfig, WandaConfig, ...) -> its module, from the method registry
_CONFIGS = {m.config: m.module for m in _methods.values()}
__all__ = sorted([*_API, *_CONFIGS])


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name in _CONFIGS:
        return getattr(importlib.import_module(_CONFIGS[name]), name)
    raise AttributeError(f"module 'lmpress' has no attribute {name!r}")


_SHADOWED = {"evaluate", "distill"}  # API functions named like a submodule (lmpress/evaluate.py, lmpress/distill/)


class _Package(types.ModuleType):
    """Importing the submodule ``lmpress.evaluate`` sets the package attribute ``evaluate`` to that
    module, so ``lmpress.evaluate(model, tok)`` would work or fail depending on what was imported
    before. The API names in :data:`_SHADOWED` are looked up first: ``lmpress.evaluate`` is always the
    function (the submodule stays ``sys.modules["lmpress.evaluate"]`` and ``from lmpress.evaluate import ...``)."""

    def __getattribute__(self, name: str):
        if name in _SHADOWED:
            return __getattr__(name)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _Package
