"""Perplexity of one pruning method under config variants, on a chosen calibration draw (exploration).

    flock /tmp/lmpress-heavy.lock python bench/prune_variants.py METHOD SEED "key=value,..." ["key=value,..." ...]
    e.g. python bench/prune_variants.py sparsegpt 1 "sparsity=0.5,sequential=false" "sparsity=0.5,sequential=true"

Default model and corpus, 64 x 512 calibration tokens shuffled with SEED (as ``bench/prune.py --calib-seed``),
perplexity at context 512 of the pruned model in memory (no save / reload), and the method's wall time.
Used to choose SparseGPT's ``sequential`` default; prints one line per variant.
"""
import copy, sys, time, torch
from pathlib import Path
from lmpress import load_model, recipe as rc
from lmpress.data import DataConfig, prepare
sys.path.insert(0, str(Path(__file__).parent))
from common import measure  # noqa: E402
torch.set_num_threads(2)
method, seed = sys.argv[1], int(sys.argv[2])
base, tok = load_model()
calib, stream = prepare(tok, DataConfig(calib_samples=64, seed=seed))
for spec in sys.argv[3:]:
    kw = dict(kv.split("=") for kv in spec.split(",")) if spec else {}
    kw = {k: (v == "true" if v in ("true", "false") else v) for k, v in kw.items()}
    if "sparsity" in kw: kw["sparsity"] = float(kw["sparsity"])
    m = copy.deepcopy(base)
    cfg = rc.make_config(method, **kw)
    t0 = time.perf_counter()
    rc.apply(m, cfg, rc.RunContext(calib=calib, progress=False))
    s = time.perf_counter() - t0
    p = measure(m, tok, stream)["perplexity"]
    print(method, seed, spec, f"ppl={p:.3f} seconds={s:.0f}", flush=True)
