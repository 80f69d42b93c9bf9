"""Low-rank benchmark: plain SVD vs ASVD vs SVD-LLM vs DSFormer at equal stored bytes.

Default model and corpus; keep-ratios of the block linears' parameters (bytes, for DSFormer: basis,
values and indices) 0.9, 0.8 and 0.6. For each: perplexity at context 512, KL and top-1 agreement
to the original, linear parameters, bytes of the block linears, bytes on disk, decode tokens/s
(batch 1, ratio to the dense model measured in the same run) and compression wall time.

    flock /tmp/lmpress-heavy.lock python bench/lowrank.py                # writes the 'lowrank' section
    python bench/lowrank.py --calib 16 --ratios 0.8 --methods svd-llm --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, md_table, measure, measure_saved, save, write_section  # noqa: E402

METHODS = ("svd", "asvd", "svd-llm", "dsformer")


def linear_bytes(row: dict) -> float:
    """Bytes of the block linears as stored, from evaluate's figures (logical weights x stored bits / 8)."""
    return row["params_linear"] * row["linear_bits_per_weight"] / 8


def run(args) -> None:
    torch.set_num_threads(2)
    from lmpress import recipe as rc
    from lmpress.data import DataConfig, prepare
    from lmpress.io import load_model, resolve_model_path

    model, tok = load_model()
    data = DataConfig(calib_samples=args.calib, calib_len=512, eval_tokens=4096)
    calib, stream = prepare(tok, data)
    speed_kw = dict(prompt_tokens=64, new_tokens=32, repeats=args.repeats)  # the documented decode protocol
    base = measure(model, tok, stream, model_path=resolve_model_path(None), speed_kw=speed_kw)
    ctx = rc.RunContext(calib=calib, tokenizer=tok, teacher=model, data=data, progress=args.progress)
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="lmpress-lowrank-"))
    t_all = time.perf_counter()
    only = {"asvd": args.asvd_at, "dsformer": args.dsformer_at}
    runs = [(r, m, {}) for r in args.ratios for m in args.methods if m not in only or r in only[m]]
    runs += [(r, "svd-llm", {"allocation": "uniform"}) for r in args.uniform_at]
    for ratio, method, extra in runs:
        if method == "dsformer":
            extra = {"iters": args.iters}
        cfg = rc.make_config(method, ratio=ratio, **extra)
        label = method + (" (uniform ranks)" if extra.get("allocation") == "uniform" else "")
        student = copy.deepcopy(model)
        t0 = time.perf_counter()
        info = rc.apply(student, cfg, ctx)
        secs = time.perf_counter() - t0
        out = save(student, tmp / f"{method}-{ratio}", tok, [rc.to_dict(cfg)])
        again, m = measure_saved(out, tok, stream, model, speed_kw=speed_kw)  # what a user gets back
        m.update(seconds=secs, kept=info["kept_fraction"], err=info["mean_rel_error"])
        results[(label, ratio)] = m
        print(label, ratio, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}, flush=True)
        if method == "svd-llm" and not extra and ratio in args.distill_at:
            results[(f"svd-llm + distillation ({args.distill_tokens:,} tokens)", ratio)] = distill_row(again, model, tok, stream, speed_kw, args)
        shutil.rmtree(out, ignore_errors=True)
        del student, again
        if args.write and len(results) < len(runs):  # a partial table survives an interrupted run
            write_section("lowrank", report(args, base, results, calib.shape, time.perf_counter() - t_all,
                                            f"PARTIAL: {len(results)} of {len(runs)} runs done; the run was still going."))
    shutil.rmtree(tmp, ignore_errors=True)
    body = report(args, base, results, calib.shape, time.perf_counter() - t_all)
    print(body)
    if args.write:
        write_section("lowrank", body)


def distill_row(student, teacher, tok, stream, speed_kw, args) -> dict:
    """Recovery of a factorized model by distillation from the original (forward KL, the engine of
    lmpress.distill): the factors are plain linears (DSFormer: basis and values), so they train."""
    from lmpress.distill.data import corpus_windows
    from lmpress.distill.engine import DistillConfig, distill

    cfg = DistillConfig(loss="fkl", tokens=args.distill_tokens, batch_size=4, seq_len=256, lr=args.distill_lr, bf16=True, seed=0)
    windows = corpus_windows(tok, None, seq_len=cfg.seq_len, max_rows=-(-cfg.tokens // cfg.seq_len), seed=0)
    t0 = time.perf_counter()
    res = distill(student, teacher, cfg, windows=windows, progress=args.progress)
    secs = time.perf_counter() - t0
    m = measure(student, tok, stream, reference=teacher, speed_kw=speed_kw)
    m.update(seconds=secs, tokens_per_s=res["tokens_per_s"])
    print("distilled", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}, flush=True)
    return m


def report(args, base, results, calib_shape, wall, note: str = "") -> str:
    mb = 1e6
    header = ["ratio", "method", "perplexity", "Δppl", "KL", "top-1", "linear params", "linear MB",
              "disk MB", "decode tok/s (x dense)", "compress s"]
    rows = [["1.0", "dense", f"{base['perplexity']:.2f}", "0", "0", "1", f"{base['params_linear'] / 1e6:.1f}M",
             f"{linear_bytes(base) / mb:.1f}", f"{base['disk_bytes'] / mb:.1f}", f"{base['decode_tps']:.1f} (1.00)", "-"]]
    for (method, ratio), m in sorted(results.items(), key=lambda kv: -kv[0][1]):
        rows.append([ratio, method, f"{m['perplexity']:,.2f}", f"{m['perplexity'] - base['perplexity']:+,.2f}", f"{m['kl']:.3f}", f"{m['top1']:.3f}",
                     f"{m['params_linear'] / 1e6:.1f}M", f"{linear_bytes(m) / mb:.1f}", f"{m['disk_bytes'] / mb:.1f}" if m["disk_bytes"] else "-",
                     f"{m['decode_tps']:.1f} ({m['decode_tps'] / base['decode_tps']:.2f})", f"{m['seconds']:.0f}"])
    verdicts = targets(base, results)
    return f"""## Low-rank: SVD, ASVD, SVD-LLM, DSFormer

Command: `flock /tmp/lmpress-heavy.lock python bench/lowrank.py{' ' + ' '.join(args.argv) if args.argv else ''}`.
Model: SmolLM2-135M-Instruct (built-in, fp32). Data: built-in Wikipedia corpus; calibration
{calib_shape[0]} x {calib_shape[1]} tokens; evaluation 4,088 tokens at context 512 (8 windows, BOS each).
Machine: {environment()}. Whole run: {wall / 60:.1f} min.

`ratio` is the fraction of the blocks' linear-layer parameters kept ({base['params_linear'] / 1e6:.1f}M dense); for DSFormer
it is the fraction of their stored bytes (basis + coefficient values + uint8/int16 indices), so each
row of a ratio stores the same bytes. Per-layer ranks (and DSFormer byte budgets) come from the
`energy` allocation (whitened spectra for ASVD/SVD-LLM/DSFormer, one extra calibration pass per
method, shared across ratios), except the rows marked "uniform ranks" (same fraction in every layer). DSFormer: density s/k = 0.5, {args.iters} alternating iterations. KL is
KL(original ‖ compressed) in nats per token. Decode: batch 1, 64-token prompt, 32 new tokens, best of {args.repeats};
DSFormer layers multiply by a cached dense coefficient matrix (sparse products were slower on this CPU).
Distillation rows: the SVD-LLM model of that ratio trained toward the original (forward KL, AdamW, learning
rate {args.distill_lr:g}, batch 4 x 256 tokens from the calibration documents, bf16 autocast); "compress s"
is the training time alone.
"linear MB" is the block linears as stored; "disk MB" is the whole saved folder (embeddings included).

{md_table(header, rows)}

{verdicts}
{note}
"""


def targets(base, results) -> str:
    lines = ["Targets of the issue:"]
    d = {k: v["perplexity"] - base["perplexity"] for k, v in results.items()}
    if ("svd", 0.8) in d:
        for aware in ("asvd", "svd-llm"):
            if (aware, 0.8) in d:
                frac = d[(aware, 0.8)] / d[("svd", 0.8)] if d[("svd", 0.8)] > 0 else float("inf")
                ok = "met" if frac <= 0.1 else "NOT met"
                lines.append(f"- {aware} perplexity increase at 0.8 = {frac:.3g} of plain SVD's "
                             f"({d[(aware, 0.8)]:+,.2f} vs {d[('svd', 0.8)]:+,.2f}); target at most 0.1: {ok}.")
    for ratio in (0.8, 0.6):
        if ("dsformer", ratio) in d and ("svd-llm", ratio) in d:
            a, b = results[("dsformer", ratio)], results[("svd-llm", ratio)]
            ok = a["perplexity"] <= b["perplexity"]
            lines.append(f"- DSFormer vs SVD-LLM at {ratio} (linear bytes {linear_bytes(a) / 1e6:.1f} vs "
                         f"{linear_bytes(b) / 1e6:.1f} MB): perplexity {a['perplexity']:.2f} vs {b['perplexity']:.2f}, KL "
                         f"{a['kl']:.3f} vs {b['kl']:.3f}: " + ("met (at most as lossy)." if ok else
                         f"NOT met: {a['perplexity'] - b['perplexity']:+.2f} perplexity ({100 * (a['perplexity'] / b['perplexity'] - 1):+.1f}%)."))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=128, help="calibration samples of 512 tokens")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.6])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--iters", type=int, default=6, help="DSFormer alternating iterations")
    ap.add_argument("--asvd-at", type=float, nargs="*", default=[0.9, 0.8, 0.6], help="ratios at which ASVD runs")
    ap.add_argument("--dsformer-at", type=float, nargs="*", default=[0.9, 0.8, 0.6], help="ratios at which DSFormer runs")
    ap.add_argument("--uniform-at", type=float, nargs="*", default=[0.8], help="ratios with an extra SVD-LLM row, uniform ranks")
    ap.add_argument("--repeats", type=int, default=3, help="decode speed: best of this many runs")
    ap.add_argument("--distill-at", type=float, nargs="*", default=[0.6], help="ratios with an SVD-LLM + distillation row")
    ap.add_argument("--distill-tokens", type=int, default=16_384)
    ap.add_argument("--distill-lr", type=float, default=2e-4)
    ap.add_argument("--no-write", dest="write", action="store_false", help="print only, leave BENCHMARKS.md")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    run(args)


if __name__ == "__main__":
    main()
