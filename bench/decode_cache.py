"""Decode speed-up of a pruned model over the original with transformers' dynamic vs static KV cache.

    flock /tmp/lmpress-heavy.lock python bench/decode_cache.py [PRUNED_MODEL]
    (default: /tmp/lmpress-bench-prune/models/width-0.75, written by bench/prune.py)

Batch 1, 256-token prompt, 32 new tokens, 2 threads; 5 rounds, each the best of 3 decodes per model and
cache kind, interleaved; prints ms/token per round and the median ratio for each cache kind.
"""
import statistics, sys, time
import torch
from transformers import StaticCache
from lmpress import load_model
torch.set_num_threads(2)
orig, _ = load_model()
w75, _ = load_model(sys.argv[1] if len(sys.argv) > 1 else "/tmp/lmpress-bench-prune/models/width-0.75")
P, N = 256, 32
prompt = torch.randint(3, 40000, (1, P), generator=torch.Generator().manual_seed(0))
def dec(model, kind):
    with torch.inference_mode():
        if kind == "static":
            cache = StaticCache(config=model.config, max_cache_len=P + N)
            out = model(prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(P))
        else:
            out = model(prompt, use_cache=True); cache = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for i in range(N):
            kw = {"cache_position": torch.tensor([P + i])} if kind == "static" else {}
            out = model(tok, past_key_values=cache, use_cache=True, **kw)
            tok = out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t0) / N * 1000
for kind in ("dynamic", "static"):
    dec(orig, kind); dec(w75, kind)
ratios = {"dynamic": [], "static": []}
for r in range(5):
    for kind in ("dynamic", "static"):
        a = min(dec(orig, kind) for _ in range(3)); b = min(dec(w75, kind) for _ in range(3))
        ratios[kind].append(a / b)
        print(r, kind, f"orig {a:.1f} ms  w75 {b:.1f} ms  ratio {a/b:.3f}", flush=True)
for k, v in ratios.items(): print(k, "median", f"{statistics.median(v):.3f}")
