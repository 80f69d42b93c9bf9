"""Does a code change keep a method's output? The same configs applied by two checkouts of lmpress.

    PYTHONPATH=OLD_CHECKOUT python bench/refactor_check.py --out old.json
    python bench/refactor_check.py --out new.json --compare old.json

Runs on the default model and corpus: each config (GPTQ W4 g64, GPTQ W3 g64, Wanda 50%; calibration
forwards in float32, ``--calib-samples`` x 512 tokens), then records a sha256 of every block linear's
(dequantized) weight and the perplexity on the 4,096 evaluation tokens. ``--compare`` says whether
every layer is bit-identical and the perplexities equal. Only names both versions know are used
(``lmpress.recipe.make_config`` / ``apply``), so older checkouts run it too.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time

import torch

ROWS = {"gptq-w4g64": ("gptq", {"bits": 4, "group_size": 64}), "gptq-w3g64": ("gptq", {"bits": 3, "group_size": 64}),
        "wanda-0.5": ("wanda", {"sparsity": 0.5})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", default=None)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=0, help="keep only the first N decoder blocks (0: all); for slow machines")
    args = ap.parse_args()
    torch.set_num_threads(2)
    import lmpress
    from lmpress import arch
    from lmpress import recipe as rc
    from lmpress.data import DataConfig, prepare
    from lmpress.evaluate import perplexity
    from lmpress.io import load_model, resolve_model_path

    base, tok = load_model(resolve_model_path(None))
    calib, stream = prepare(tok, DataConfig(calib_samples=args.calib_samples))
    if args.blocks:
        del arch.blocks(base)[args.blocks:]
        base.config.num_hidden_layers = args.blocks
    res = {"lmpress": lmpress.__file__, "blocks": args.blocks or len(arch.blocks(base)), "calib_samples": args.calib_samples}
    for name, (method, kw) in ROWS.items():
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        rc.apply(m, rc.make_config(method, calib_dtype="float32", **kw), rc.RunContext(calib=calib, progress=False))
        secs = time.perf_counter() - t0
        with torch.no_grad():
            layers = {n: hashlib.sha256(arch.linear_weight(l).detach().float().contiguous().numpy().tobytes()).hexdigest()
                      for n, l in arch.compressible_linears(m).items()}
            ppl = perplexity(m, stream, bos=tok.bos_token_id).ppl
        res[name] = {"perplexity": ppl, "seconds": secs, "layers": layers}
        print(name, f"ppl {ppl:.4f}", f"{secs:.0f} s", flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    if args.compare:
        old = json.load(open(args.compare))
        for name in ROWS:
            same = sum(old[name]["layers"][k] == v for k, v in res[name]["layers"].items())
            print(f"{name}: {same}/{len(res[name]['layers'])} layers bit-identical; perplexity "
                  f"{old[name]['perplexity']:.6f} -> {res[name]['perplexity']:.6f}")


if __name__ == "__main__":
    main()
