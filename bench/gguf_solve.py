"""lmpress's methods solved on llama.cpp's grids: KL to the float model of RTN / GPTQ / AWQ per GGUF type.

    python bench/gguf_solve.py                          # every row, prints JSON lines
    python bench/gguf_solve.py --only Q4_0:gptq Q4_0:rtn --results /tmp/r.json
    python bench/gguf_solve.py --write --results /tmp/r.json   # the 'gguf_solve' section from finished rows

Default model (SmolLM2-135M-Instruct), default corpus: the same calibration tokens (``--calib-samples``
x ``--calib-len`` from the calibration split) for every method, lmpress's evaluation protocol (4,096
evaluation tokens, context 512), KL and top-1 against the float model; the in-memory solved model is
what the written .gguf file holds (tests/test_gguf_solve.py checks the logits), and the file is written
to measure its bytes. Each TYPE is a llama-quantize type: every tensor gets the type llama.cpp's rule
gives it (lmpress.quant.gguf_mix; calibrated methods as with an importance matrix), so lmpress's file
and llama.cpp's own file of a TYPE store the same types. ``rtn`` is llama.cpp's round-to-nearest with
no importance matrix (ggml.quantize), ``rtn+search`` the unweighted scale search, ``gptq`` GPTQ with
the diag(H)-weighted scale search and act-order, ``awq`` AWQ then the activation-weighted search.
Variants for the ablation: ``gptq-noact`` (natural order, parameters chosen when the sweep reaches each
block), ``gptq-damp0.1``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import environment, md_table, write_section  # noqa: E402

# bench/kernels.py would shadow the `kernels` package transformers probes for: bench/ leaves the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]

TYPES = ["Q4_0", "IQ4_NL", "Q4_K_M", "Q3_K_M"]
METHODS = {"rtn": ("rtn", {}), "rtn+search": ("rtn", {"clip_search": True}), "gptq": ("gptq", {}),
           "awq": ("awq", {}), "gptq-noact": ("gptq", {"act_order": False}), "gptq-damp0.1": ("gptq", {"damp": 0.1})}
DEFAULT_ROWS = [f"{t}:{m}" for t in TYPES for m in ("rtn", "gptq", "awq")]
LLAMA_CPP = {"Q4_0": 0.202, "IQ4_NL": 0.111, "Q4_K_M": 0.034}  # issue 15's table: llama.cpp + imatrix, same protocol


def run_row(model, tok, calib, stream, gtype: str, name: str) -> dict:
    from lmpress.api import evaluate
    from lmpress.io import save_model
    from lmpress.recipe import RunContext, apply, make_config, to_dict

    method, extra = METHODS[name]
    student = copy.deepcopy(model)
    cfg = make_config(method, gguf=gtype, **extra)
    t0 = time.perf_counter()
    apply(student, cfg, RunContext(calib=calib, tokenizer=tok, progress=False))
    seconds = time.perf_counter() - t0
    res = evaluate(student, tok, stream=stream, reference=model, measure_speed=False, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = save_model(student, Path(tmp) / "m.gguf", tokenizer=tok, format=f"gguf:{gtype}", recipe=[cfg])
        file_bytes = out.stat().st_size
    return {"row": f"{gtype}:{name}", "type": gtype, "method": name, "recipe": to_dict(cfg), "seconds": seconds,
            "kl": res["kl"], "top1": res["top1"], "perplexity": res["perplexity"], "file_bytes": file_bytes,
            "environment": environment()}


def table(rows: list[dict], args) -> str:
    body = [f"Command: `python bench/gguf_solve.py --only ... --calib-samples {args.calib_samples} --calib-len "
            f"{args.calib_len} --eval-tokens {args.eval_tokens}`; then `--write`. Default model, default corpus, "
            "lmpress's protocol (context 512), KL and top-1 to the float model. llama.cpp's figures are issue 15's "
            "(llama.cpp + importance matrix, same protocol, measured 2026-12-01), not re-measured here. "
            "Other agents' jobs shared the 2 cores, so seconds are noisy.", ""]
    out = []
    for r in rows:
        ref = LLAMA_CPP.get(r["type"])
        ratio = f"{r['kl'] / ref:.2f}" if ref else "-"
        out.append([r["type"], r["method"], f"{r['kl']:.4f}", f"{r['top1']:.3f}", f"{r['perplexity']:.2f}",
                    f"{r['file_bytes'] / 1e6:.1f}", ref if ref else "-", ratio, f"{r['seconds']:.0f}"])
    body.append(md_table(["type", "lmpress method", "KL", "top-1", "perplexity", "file MB", "llama.cpp+imatrix KL",
                          "KL / llama.cpp", "solve s"], out))
    body.append("")
    body.append(f"Environment: {rows[-1]['environment']}" if rows else "")
    return "\n".join(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=DEFAULT_ROWS, help="rows TYPE:METHOD")
    ap.add_argument("--results", default=None, help="JSON file of finished rows (appended)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section from --results and stop")
    args = ap.parse_args()
    done = json.loads(Path(args.results).read_text()) if args.results and Path(args.results).exists() else []
    if args.write:
        write_section("gguf_solve", "## Methods solved on llama.cpp's grids (bench/gguf_solve.py)\n\n" + table(done, args))
        return
    import lmpress
    from lmpress.data import DataConfig, prepare

    model, tok = lmpress.load_model()
    calib, stream = prepare(tok, DataConfig(calib_samples=args.calib_samples, calib_len=args.calib_len,
                                            eval_tokens=args.eval_tokens))
    for row in args.only:
        gtype, name = row.split(":")
        r = run_row(model, tok, calib, stream, gtype, name)
        print(json.dumps(r), flush=True)
        done = [d for d in done if d["row"] != r["row"]] + [r]
        if args.results:
            Path(args.results).write_text(json.dumps(done, indent=1))


if __name__ == "__main__":
    main()
