"""Low-rank compression: truncated SVD, ASVD, SVD-LLM and DSFormer's dense basis times sparse coefficients.

* :mod:`lmpress.lowrank.factor`: the math on one weight matrix (pure functions).
* :mod:`lmpress.lowrank.layers`: ``LowRankLinear`` (kind ``lowrank``) and ``DenseSparseLinear``
  (kind ``dsformer``), the layers that replace ``nn.Linear`` and save/load with :mod:`lmpress.formats`.
* :mod:`lmpress.lowrank.svd`: methods ``svd``, ``asvd``, ``svd-llm`` (``svd_``, ``asvd_``, ``svd_llm_``).
* :mod:`lmpress.lowrank.dsformer`: method ``dsformer`` (``dsformer_``).

Use them through a recipe (``lmpress compress --method svd-llm --ratio 0.8``) or directly::

    from lmpress.lowrank.svd import SVDLLMConfig, svd_llm_
    svd_llm_(model, SVDLLMConfig(ratio=0.8), RunContext(calib=calib_ids))
"""
