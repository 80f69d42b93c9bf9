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
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, md_table, write_section  # noqa: E402

METHODS = ("svd", "asvd", "svd-llm", "dsformer")


class Reference:
    """The original model's log-probabilities on the evaluation windows, kept (float16) so that each
    compressed model needs one forward for both perplexity and KL (same windows and scoring as
    :func:`lmpress.evaluate.perplexity` / :func:`lmpress.evaluate.compare`)."""

    def __init__(self, model, stream, bos):
        from lmpress.evaluate import windows

        self.ids, _ = windows(stream, 512, bos)  # (W, 512)
        self.logp = [lp.half() for lp in self._logprobs(model)]

    def _logprobs(self, model):
        for s in range(len(self.ids)):
            with torch.inference_mode():  # closed before the yield, so it never leaks to the caller
                lp = torch.log_softmax(model(self.ids[s : s + 1], use_cache=False).logits[0, :-1].float(), -1)  # (T-1, V)
            yield lp

    def score(self, model) -> tuple[float, float, float]:
        """(perplexity, mean KL(original ‖ model) in nats, top-1 agreement)."""
        nll = kl = agree = n = 0.0
        for s, lp in enumerate(self._logprobs(model)):
            lq, tgt = self.logp[s].float(), self.ids[s, 1:]
            nll += -lp.gather(-1, tgt[:, None]).double().sum().item()
            kl += (lq.exp() * (lq - lp)).sum(-1).double().sum().item()
            agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
            n += tgt.numel()
        return math.exp(nll / n), kl / n, agree / n


def measure(model, ref: Reference, out_dir: Path | None, speed_kw: dict) -> dict:
    from lmpress.evaluate import speed
    from lmpress.io import folder_bytes
    from lmpress.counts import param_counts

    ppl, kl, top1 = ref.score(model)
    c = param_counts(model)
    sp = speed(model, **speed_kw)
    return {"ppl": ppl, "kl": kl, "top1": top1, "linear": c.linear, "total": c.total, "linear_bytes": c.linear_bytes,
            "disk": folder_bytes(out_dir) if out_dir else None, "decode": sp.decode_tps}


def run(args) -> None:
    torch.set_num_threads(2)
    from lmpress import recipe as rc
    from lmpress.data import DataConfig, prepare
    from lmpress.evaluate import perplexity
    from lmpress.formats import save_compressed
    from lmpress.io import folder_bytes, load_model, resolve_model_path

    model, tok = load_model()
    data = DataConfig(calib_samples=args.calib, calib_len=512, eval_tokens=4096)
    calib, stream = prepare(tok, data)
    bos = tok.bos_token_id
    speed_kw = dict(prompt_tokens=64, new_tokens=32, repeats=args.repeats)
    ref = Reference(model, stream, bos)
    base = measure(model, ref, None, speed_kw)
    base["disk"] = folder_bytes(resolve_model_path(None))
    check = perplexity(model, stream, context=512, bos=bos).ppl  # the evaluator's own number
    assert abs(check - base["ppl"]) < 1e-3 * check, (check, base["ppl"])
    ctx = rc.RunContext(calib=calib, tokenizer=tok, teacher=model, data=data, progress=args.progress)
    rows, results = [], {}
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
        out = save_compressed(student, tmp / f"{method}-{ratio}", recipe=[rc.to_dict(cfg)], tokenizer=tok)
        again, _ = load_model(out)  # what a user gets back
        m = measure(again, ref, out, speed_kw)
        m.update(seconds=secs, kept=info["kept_fraction"], err=info["mean_rel_error"])
        results[(label, ratio)] = m
        print(label, ratio, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}, flush=True)
        if method == "svd-llm" and not extra and ratio in args.distill_at:
            results[(f"svd-llm + distillation ({args.distill_tokens:,} tokens)", ratio)] = distill_row(again, model, tok, ref, speed_kw, args)
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


def distill_row(student, teacher, tok, ref, speed_kw, args) -> dict:
    """Recovery of a factorized model by distillation from the original (forward KL, the engine of
    lmpress.distill): the factors are plain linears (DSFormer: basis and values), so they train."""
    from lmpress.distill.data import corpus_windows
    from lmpress.distill.engine import DistillConfig, distill

    cfg = DistillConfig(loss="fkl", tokens=args.distill_tokens, batch_size=4, seq_len=256, lr=args.distill_lr, bf16=True, seed=0)
    windows = corpus_windows(tok, None, seq_len=cfg.seq_len, max_rows=-(-cfg.tokens // cfg.seq_len), seed=0)
    t0 = time.perf_counter()
    res = distill(student, teacher, cfg, windows=windows, progress=args.progress)
    secs = time.perf_counter() - t0
    student.eval()
    m = measure(student, ref, None, speed_kw)
    m.update(seconds=secs, disk=None, tokens_per_s=res["tokens_per_s"])
    print("distilled", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}, flush=True)
    return m


def report(args, base, results, calib_shape, wall, note: str = "") -> str:
    mb = 1e6
    header = ["ratio", "method", "perplexity", "Δppl", "KL", "top-1", "linear params", "linear MB",
              "disk MB", "decode tok/s (x dense)", "compress s"]
    rows = [["1.0", "dense", f"{base['ppl']:.2f}", "0", "0", "1", f"{base['linear'] / 1e6:.1f}M",
             f"{base['linear_bytes'] / mb:.1f}", f"{base['disk'] / mb:.1f}", f"{base['decode']:.1f} (1.00)", "-"]]
    for (method, ratio), m in sorted(results.items(), key=lambda kv: -kv[0][1]):
        rows.append([ratio, method, f"{m['ppl']:,.2f}", f"{m['ppl'] - base['ppl']:+,.2f}", f"{m['kl']:.3f}", f"{m['top1']:.3f}",
                     f"{m['linear'] / 1e6:.1f}M", f"{m['linear_bytes'] / mb:.1f}", f"{m['disk'] / mb:.1f}" if m["disk"] else "-",
                     f"{m['decode']:.1f} ({m['decode'] / base['decode']:.2f})", f"{m['seconds']:.0f}"])
    verdicts = targets(base, results)
    return f"""## Low-rank: SVD, ASVD, SVD-LLM, DSFormer

Command: `flock /tmp/lmpress-heavy.lock python bench/lowrank.py{' ' + ' '.join(args.argv) if args.argv else ''}`.
Model: SmolLM2-135M-Instruct (built-in, fp32). Data: built-in Wikipedia corpus; calibration
{calib_shape[0]} x {calib_shape[1]} tokens; evaluation 4,088 tokens at context 512 (8 windows, BOS each).
Machine: {environment()}. Whole run: {wall / 60:.1f} min.

`ratio` is the fraction of the blocks' linear-layer parameters kept ({base['linear'] / 1e6:.1f}M dense); for DSFormer
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
    d = {k: v["ppl"] - base["ppl"] for k, v in results.items()}
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
            ok = a["ppl"] <= b["ppl"]
            lines.append(f"- DSFormer vs SVD-LLM at {ratio} (linear bytes {a['linear_bytes'] / 1e6:.1f} vs "
                         f"{b['linear_bytes'] / 1e6:.1f} MB): perplexity {a['ppl']:.2f} vs {b['ppl']:.2f}, KL "
                         f"{a['kl']:.3f} vs {b['kl']:.3f}: " + ("met (at most as lossy)." if ok else
                         f"NOT met: {a['ppl'] - b['ppl']:+.2f} perplexity ({100 * (a['ppl'] / b['ppl'] - 1):+.1f}%)."))
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
