"""Pruning: unstructured and N:M sparsity (magnitude, Wanda, SparseGPT), structured width and depth
pruning, and the compact storage of sparse layers.

Modules: ``masks`` (pure score / mask functions), ``unstructured`` (magnitude, Wanda), ``sparsegpt``,
``structured`` (heads, MLP channels, hidden channels, blocks), ``sparse`` (``SparseLinear``).
"""
