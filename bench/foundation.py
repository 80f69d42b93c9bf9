"""Foundation benchmark: the default model on the default corpus.

Perplexity at context 512 and 1024, KL of the model against itself (must be 0), evaluation wall
time, prefill/decode speed, and the peak memory of the calibration pipeline walking all blocks with
128 x 512 calibration tokens (measured in a fresh subprocess, with a Hessian per linear input as a
layer-wise method would collect).

    python bench/foundation.py          # writes the 'foundation' section of BENCHMARKS.md
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from common import environment, md_table, measure, write_section  # noqa: E402

PIPELINE = r"""
import json, resource, time, torch
from lmpress import load_model
from lmpress.calib import walk_blocks
from lmpress.data import DataConfig, prepare
torch.set_num_threads(2)
model, tok = load_model()
calib, _ = prepare(tok, DataConfig(), need_eval=False)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def fn(ctx):
    H = {}
    def obs(n):
        def f(x):
            x = x.float()
            H[n] = H.get(n, 0) + x.T @ x
        return f
    ctx.collect({n: obs(n) for n in ctx.linears})
t = time.perf_counter()
walk_blocks(model, calib, fn, progress=False)
print(json.dumps({"calib_shape": list(calib.shape), "rss_before_walk": base,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "walk_seconds": time.perf_counter() - t}))
"""


def main() -> None:
    torch.set_num_threads(2)
    from lmpress import load_model
    from lmpress.data import DataConfig, prepare

    t = time.perf_counter()
    model, tok = load_model()
    load_s = time.perf_counter() - t
    _, stream = prepare(tok, DataConfig(eval_tokens=4096), need_calib=False)
    at = {512: measure(model, tok, stream, reference=model, speed_kw=dict(prompt_tokens=256, new_tokens=32, repeats=3)),
          1024: measure(model, tok, stream, context=1024)}
    rows = [[ctx, f"{m['perplexity']:.3f}", m["eval_tokens"], f"{m['eval_seconds']:.1f}"] for ctx, m in at.items()]
    f512 = at[512]  # KL to itself and speed measured with it
    out = subprocess.run([sys.executable, "-c", PIPELINE], capture_output=True, text=True, check=True)
    pipe = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 1 << 30
    body = f"""## Foundation: default model, default corpus

Command: `python bench/foundation.py`. Model: SmolLM2-135M-Instruct (built-in `smollm2-135m`, fp32,
134.5M parameters). Data: built-in Wikipedia corpus, evaluation stream (every 20th article, first
4,096 tokens), BOS before each window. Machine: {environment()}.

{md_table(["context", "perplexity", "scored tokens", "wall time (s)"], rows)}

| figure | value |
|---|---|
| model load time (safetensors folder) | {load_s:.1f} s |
| KL(model ‖ itself), nats/token | {f512['kl']:.2e} (top-1 agreement {f512['top1']:.4f}) |
| prefill tokens/s, batch 1, 256-token prompt | {f512['prefill_tps']:.0f} |
| decode tokens/s, batch 1, greedy, KV cache | {f512['decode_tps']:.1f} |
| calibration pipeline over all 30 blocks, {pipe['calib_shape'][0]} x {pipe['calib_shape'][1]} tokens, X^T X per linear | {pipe['walk_seconds']:.0f} s |
| peak RSS of that pipeline run (fresh process) | {pipe['peak_rss'] / gib:.2f} GiB (after loading model and data: {pipe['rss_before_walk'] / gib:.2f} GiB) |
"""
    print(body)
    write_section("foundation", body)


if __name__ == "__main__":
    main()
