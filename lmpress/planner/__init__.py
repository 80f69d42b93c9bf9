"""``lmpress plan`` (``lmpress.plan``): an accuracy budget and a size target in, the best compressed model out.

See :func:`lmpress.planner.run.plan` and docs/plan.md. Submodules: candidates (groups, candidates,
exact bytes), sensitivity (the two estimators, measured recipes), solve (the exact allocation),
confirm (the recipe), report (OUT's files), config (budget, target, PlanConfig).
"""
