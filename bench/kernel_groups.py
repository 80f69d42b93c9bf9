"""Fused qmatmul kernel, batch 1: per-channel scales (group = in_features) vs groups of 64, per product.

    python bench/kernel_groups.py

Shapes of the default model's MLP (1536 x 576 and 576 x 1536), int4 and int8, best of 5 x 300 calls."""

import time

import torch

from lmpress.quant import kernels, pack

torch.set_num_threads(2)
torch.manual_seed(0)
def bench(bits, G, N=1536, K=576, reps=300):
    q = torch.randint(0, 2**bits, (N, K))
    packed = pack.pack(q, bits)
    ng = K // G
    s = torch.rand(N, ng).half(); z = torch.full((N, ng), 2.0**(bits-1)).half()
    x = torch.randn(1, K)
    for _ in range(20): kernels.qmatmul(x, packed, s, z, bits, G, N)
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps): kernels.qmatmul(x, packed, s, z, bits, G, N)
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e6
for bits in (4, 8):
    for (N, K) in ((1536, 576), (576, 1536)):
        print(bits, (N, K), "g64 %.1f us" % bench(bits, 64, N, K), "perchan %.1f us" % bench(bits, K, N, K))
