"""Where a batch-1 decode step of a model goes: matrix products vs everything else (torch.profiler).

    python bench/profile_decode.py [MODEL]      # default: the built-in model

Prints the self CPU time per token, the share of aten::mm / addmm / bmm, the aten calls per token
and the top operators (256-token prompt, 4 warm-up then 8 profiled decode steps, 2 threads).
"""
import torch
from torch.profiler import profile, ProfilerActivity
from lmpress import load_model
torch.set_num_threads(2)
import sys
m, tok = load_model(sys.argv[1] if len(sys.argv) > 1 else None)
ids = torch.randint(3, 40000, (1, 256))
with torch.inference_mode():
    out = m(ids, use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    t = out.logits[:, -1:].argmax(-1)
    for _ in range(4):
        out = m(t, cache=cache, use_cache=True); t = out.logits[:, -1:].argmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(8):
            out = m(t, cache=cache, use_cache=True); t = out.logits[:, -1:].argmax(-1)
ev = prof.key_averages()
total = sum(e.self_cpu_time_total for e in ev)
mm = sum(e.self_cpu_time_total for e in ev if e.key in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm"))
n_ops = sum(e.count for e in ev if e.key.startswith("aten::"))
print(f"per token: {total/8/1000:.1f} ms self CPU, matmul ops {mm/8/1000:.1f} ms ({100*mm/total:.0f}%), aten calls {n_ops/8:.0f}")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
