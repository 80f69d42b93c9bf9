"""Where a batch-1 decode step goes, per op class (torch.profiler): matrix products vs everything else.

    python bench/profile_decode.py                               # float model, eager
    python bench/profile_decode.py --rtn 4 64 --head-bits 8 --compiled --prompt 256

Default model (or MODEL), optionally RTN-quantized; a prompt of --prompt random ids, 4 warm-up then
8 profiled decode steps, 2 threads. Eager decodes with transformers' dynamic cache, --compiled as
``lmpress.evaluate.speed(compiled=True)`` does (static KV cache, the step through torch.compile).
Prints the wall time per token, the self CPU time per op class and per token, the aten calls per
token and the top operators.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.pop(0)  # bench/: its kernels.py would shadow the ``kernels`` package transformers looks for

CLASSES = {  # op class -> profiler keys (prefixes)
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "lmpress::"),
    "attention": ("aten::scaled_dot_product", "aten::_scaled_dot_product"),
    "KV cache": ("aten::index_copy", "aten::cat", "aten::index_put", "aten::slice_scatter"),
    "compiled region (Inductor kernels, wrapper)": ("Torch-Compiled Region", "CompiledFunction", "## Call CompiledFxGraph",
                                                    "cpp_fused", "TorchDynamo"),
}


def op_class(key: str) -> str:
    for name, prefixes in CLASSES.items():
        if key.startswith(prefixes):
            return name
    return "other aten (norms, rope, elementwise, views, copies)" if key.startswith("aten::") else "other"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--rtn", type=int, nargs=2, metavar=("BITS", "GROUP"), help="RTN-quantize first")
    ap.add_argument("--head-bits", type=int)
    ap.add_argument("--compiled", action="store_true")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import importlib

    from lmpress import load_model
    from lmpress.quant.rtn import RTNConfig, rtn_

    evaluate = importlib.import_module("lmpress.evaluate")  # the module (lmpress.evaluate is the API function)

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    if args.rtn:
        rtn_(model, RTNConfig(bits=args.rtn[0], group_size=args.rtn[1], head_bits=args.head_bits))
    n_prompt, total = args.prompt, args.prompt + max(32, 4 + args.steps + 1)  # static cache: as speed() with 32 new tokens
    ids = torch.randint(3, 40000, (1, n_prompt), generator=torch.Generator().manual_seed(0))
    step = evaluate._compiled_step(model) if args.compiled else model
    with torch.inference_mode():
        kw = {"cache": evaluate._static_cache(model, total), "cache_position": torch.arange(n_prompt)} if args.compiled else {}
        out = model(ids, use_cache=True, **kw)
        cache, tok, pos = evaluate._cache(out), out.logits[:, -1:].argmax(-1), n_prompt

        def one():
            nonlocal cache, tok, pos
            kw = {"cache_position": torch.tensor([pos])} if args.compiled else {}
            out = step(input_ids=tok, cache=cache, use_cache=True, **kw)
            cache, tok, pos = evaluate._cache(out), out.logits[:, -1:].argmax(-1), pos + 1

        for _ in range(4):
            one()
        # as speed()'s timed runs: after the warm-up only the guards that tell compiled graphs apart
        stance = torch.compiler.set_stance(skip_guard_eval_unsafe=True) if args.compiled else contextlib.nullcontext()
        t0 = time.perf_counter()
        with stance, profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                one()
        wall = (time.perf_counter() - t0) / args.steps
    report(prof, args.steps, wall, args)


def report(prof, steps: int, wall: float, args) -> None:
    ev = prof.key_averages()
    per_class, calls = defaultdict(float), 0
    for e in ev:
        per_class[op_class(e.key)] += e.self_cpu_time_total
        calls += e.count if e.key.startswith("aten::") else 0
    total = sum(per_class.values())
    what = f"{'RTN W%d g%d' % tuple(args.rtn) if args.rtn else 'float'}{f' + {args.head_bits}-bit head' if args.head_bits else ''}"
    print(f"{what}, {'compiled' if args.compiled else 'eager'}, prompt {args.prompt}: {wall * 1000:.1f} ms/token wall "
          f"(under the profiler), {total / steps / 1000:.1f} ms self CPU, {calls / steps:.0f} aten calls per token")
    for name, t in sorted(per_class.items(), key=lambda kv: -kv[1]):
        print(f"  {name:48s} {t / steps / 1000:7.2f} ms/token  {100 * t / total:4.0f}%")
    print(ev.table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
