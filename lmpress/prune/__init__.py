"""Pruning: unstructured and N:M sparsity (magnitude, Wanda, SparseGPT), structured width and depth
pruning, and the compact storage of sparse layers.

Modules: ``masks`` (pure score / mask functions), ``config`` (the fields magnitude, Wanda and
SparseGPT share), ``unstructured`` (magnitude, Wanda), ``sparsegpt``, ``width`` (heads, MLP channels,
hidden channels), ``depth`` (blocks), ``shared`` (what width and depth share), ``structured`` (width
and depth names under their old path), ``sparse`` (``SparseLinear``).
"""
