"""bfloat16 vs float32 matrix-product speed on this CPU (why ``calib_dtype=auto`` picks float32 without bf16 units).

    python bench/bf16_matmul.py

Times (8192 x 576) @ (576 x 1536), a calibration-sized product of the default model, on 2 threads,
and prints GFLOP/s for each dtype, their ratio, torch's CPU capability and oneDNN's bf16 check.
"""

import time

import torch


def gflops(dtype, reps: int) -> float:
    a, b = torch.randn(8192, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    a @ b  # warm up
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps * 2 * 8192 * 576 * 1536 / (time.perf_counter() - t0) / 1e9


if __name__ == "__main__":
    torch.set_num_threads(2)
    f32, bf16 = gflops(torch.float32, 10), gflops(torch.bfloat16, 3)
    print(f"float32 {f32:.1f} GFLOP/s, bfloat16 {bf16:.1f} GFLOP/s ({f32 / bf16:.0f}x), "
          f"capability {torch.backends.cpu.get_cpu_capability()}, "
          f"oneDNN bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
