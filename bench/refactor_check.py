"""Does a code change keep a method's output? The same configs applied by two checkouts of lmpress.

    PYTHONPATH=OLD_CHECKOUT python bench/refactor_check.py --out old.json
    python bench/refactor_check.py --out new.json --compare old.json

Runs on the default model and corpus: each config (GPTQ W4 g64, GPTQ W3 g64, Wanda 50%; calibration
forwards in float32, ``--calib-samples`` x 512 tokens), then records a sha256 of every block linear's
(dequantized) weight (-0.0 counted as 0.0) and the perplexity on the 4,096 evaluation tokens. ``--compare`` says whether
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
    ap.add_argument("--write", action="store_true", help="with --compare: write the 'refactor-check' section of BENCHMARKS.md")
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
            layers = {n: hashlib.sha256((arch.linear_weight(l).detach().float() + 0.0).contiguous().numpy().tobytes()).hexdigest()
                      for n, l in arch.compressible_linears(m).items()}
            ppl = perplexity(m, stream, bos=tok.bos_token_id).ppl
        res[name] = {"perplexity": ppl, "seconds": secs, "layers": layers}
        print(name, f"ppl {ppl:.4f}", f"{secs:.0f} s", flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    if args.compare:
        old = json.load(open(args.compare))
        rows = []
        for name in ROWS:
            same = sum(old[name]["layers"][k] == v for k, v in res[name]["layers"].items())
            rows.append([name, f"{same}/{len(res[name]['layers'])}", f"{old[name]['perplexity']:.6f}",
                         f"{res[name]['perplexity']:.6f}"])
            print(f"{name}: {rows[-1][1]} layers bit-identical; perplexity {rows[-1][2]} -> {rows[-1][3]}")
        if args.write:
            from common import environment, md_table, write_section

            write_section("refactor-check", (
                "## Refactor check: the same configs through two checkouts\n\n"
                f"Command: `PYTHONPATH=OLD python bench/refactor_check.py --out old.json --blocks {res['blocks']} "
                f"--calib-samples {args.calib_samples}`, then `python bench/refactor_check.py --out new.json --compare "
                f"old.json --blocks {res['blocks']} --calib-samples {args.calib_samples} --write`. OLD: {old['lmpress']} "
                f"(commit 278a84f, before issue 12's cleanup). Model: SmolLM2-135M-Instruct cut to its first "
                f"{res['blocks']} blocks (the perplexity of a cut model is large; only equality matters), "
                f"{args.calib_samples} x 512 calibration tokens, float32 calibration forwards, 4,096 evaluation tokens. "
                "Machine: " + environment() + " (AVX2 only: the documented bf16 rows would take tens of minutes each).\n\n"
                + md_table(["config", "block linears bit-identical", "perplexity before", "perplexity after"], rows)))


if __name__ == "__main__":
    main()
