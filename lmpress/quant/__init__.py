"""Weight-only quantization: grids, RTN, GPTQ, AWQ, packed storage and fast kernels."""
