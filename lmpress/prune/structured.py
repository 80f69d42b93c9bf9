"""Structured pruning that makes a model physically smaller: width (:mod:`lmpress.prune.width`:
heads, MLP channels, hidden channels) and depth (:mod:`lmpress.prune.depth`: whole decoder blocks).

This module keeps the names it used to define importable from here (the recipe registry, bench
scripts); new code imports from ``width`` and ``depth``.
"""

from .depth import (  # noqa: F401
    DEPTH_IMPORTANCE, DepthPruneConfig, activation_importance, block_influence, blocks_to_drop, drop_blocks_,
    perplexity_importance, prune_depth_,
)
from .shared import lm_loss, non_embedding_params  # noqa: F401
from .width import (  # noqa: F401
    HIDDEN_STEPS, WidthImportance, WidthPlan, WidthPruneConfig, WidthShape, apply_width_plan, candidate_shapes,
    plan_for, prune_width_, prune_width_with, width_importance, width_params,
)
