"""Distillation benchmark on the default model and corpus (CPU budget: about 35 + 35 minutes on 2 cores).

(a) prune-then-distill: width-prune SmolLM2-135M to 75% of its non-embedding parameters, then train
    copies of the pruned model on the same corpus tokens: distillation from the original model
    (forward KL), distillation plus next-token cross-entropy, and plain cross-entropy fine-tuning,
    each at every learning rate of --lr-a (so that no method is judged at a rate that suits only
    the other). Perplexity before/after, KL to the teacher.
(b) W2 g64: post-training RTN (min-max, and with a weight-MSE clipping search) and GPTQ, then
    quantization-aware distillation started from the GPTQ model (FakeQuantLinear on GPTQ's weights,
    straight-through estimator, learnable clipping, CAKLD with the float model as teacher).

Training throughput (tokens/s) includes the teacher forward. Training windows come from the
calibration part of the corpus; perplexity is measured on the evaluation documents (never trained
on), context 512, 4,088 scored tokens.

    flock /tmp/lmpress-heavy.lock python bench/distill.py           # writes the 'distill' section
    python bench/distill.py --tokens-a 8000 --tokens-b 8000 --no-write   # a quick smoke run
    python bench/distill.py --only b --json d.json; python bench/distill.py --only a --json d.json
                                              # the parts one at a time, merged through d.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Results, environment, md_table, measure, write_section  # noqa: E402


# ---- (a) width pruning ----------------------------------------------------------------------------


def make_pruned(teacher, tok):
    """(student, how, info): ``lmpress.prune.structured``'s width pruning (Minitron activation importance)
    of a copy of ``teacher`` to 75% of its non-embedding parameters, on 64 x 512 calibration tokens."""
    from lmpress.api import apply_
    from lmpress.data import DataConfig, prepare
    from lmpress.prune.structured import WidthPruneConfig

    calib, _ = prepare(tok, DataConfig(calib_samples=64), need_eval=False)
    s = copy.deepcopy(teacher)
    info = apply_(s, WidthPruneConfig(target_params=0.75), calib, tokenizer=tok)
    c = s.config
    return s, (f"`lmpress.prune.structured.prune_width_(WidthPruneConfig(target_params=0.75))` (Minitron-style, "
               f"activation importance on {calib.shape[0]} x {calib.shape[1]} calibration tokens): "
               f"{c.num_attention_heads} query / {c.num_key_value_heads} KV heads, MLP {c.intermediate_size}, "
               f"hidden {c.hidden_size}"), info


# ---- runs ----------------------------------------------------------------------------------------------


def train(student, teacher, windows, args, bf16=True, **cfg_fields) -> dict:
    from lmpress.distill.engine import DistillConfig, distill

    cfg = DistillConfig(seq_len=args.seq_len, batch_size=args.batch_size, bf16=bf16, seed=0, **cfg_fields)
    t0 = time.perf_counter()
    res = distill(student, teacher if cfg.loss != "ce" else None, cfg, windows=windows, progress=True)
    res["wall"] = time.perf_counter() - t0
    res.pop("history")
    return res


A_LOSSES = {  # part (a) run name -> (label, DistillConfig fields)
    "kd": ("distillation (forward KL)", {"loss": "fkl"}),
    "kdce": ("distillation (forward KL) + cross-entropy", {"loss": "fkl"}),  # ce_weight from --ce-weight-a
    "ce": ("cross-entropy fine-tuning (no teacher)", {"loss": "ce"}),
}


def part_a(teacher, tok, stream, windows, args, out: dict) -> None:
    """Width-prune, then train copies of the pruned model with each loss at each learning rate."""
    student, how, info = make_pruned(teacher, tok)
    out["prune_how"] = how
    out["params_teacher"], out["params_student"] = info["params_before"], info["params_after"]  # non-embedding, as the pruner counts
    out["pruned"] = measure(student, tok, stream, reference=teacher)
    print("pruned:", out["pruned"], flush=True)
    steps = 3 * args.batch_size * args.seq_len  # bf16 autocast vs fp32 throughput, same run, 3 steps each
    for bf16 in (False, True):
        out[f"tps_bf16_{bf16}"] = train(copy.deepcopy(student), teacher, windows, args, bf16=bf16, loss="fkl",
                                        tokens=steps, lr=args.lr_a[0])["tokens_per_s"]
    for k in [k for k in out if k.startswith("a_")]:  # results of an earlier part (a) in the --json file
        del out[k]
    out["a_runs"] = []
    for lr in args.lr_a:
        for name in args.a_losses:
            kw = dict(A_LOSSES[name][1], **({"ce_weight": args.ce_weight_a} if name == "kdce" else {}))
            s = copy.deepcopy(student)
            res = train(s, teacher, windows, args, tokens=args.tokens_a, lr=lr, **kw)
            run = {"name": name, "lr": lr, "ce_weight": kw.get("ce_weight", 0.0), "train": res,
                   "eval": measure(s, tok, stream, reference=teacher)}
            out["a_runs"].append(run)
            print(name, lr, run["eval"], res["tokens_per_s"], flush=True)


def part_b(teacher, tok, stream, windows, args, out: dict) -> None:
    """W2 g64: post-training RTN (min-max, MSE clip) and GPTQ in this run, then quantization-aware
    distillation started from the GPTQ model (its grid as the starting point: recipe gptq -> distill)."""
    from lmpress.data import DataConfig, prepare
    from lmpress.distill.qat import materialize_fake_quant_, to_fake_quant_
    from lmpress.recipe import RunContext, apply, make_config

    for name, init in (("rtn", None), ("rtn_mse", "mse")):
        s = copy.deepcopy(teacher)
        to_fake_quant_(s, 2, 64, init_clip=init)
        materialize_fake_quant_(s)
        out[f"b_{name}"] = measure(s, tok, stream, reference=teacher)
        print(name, out[f"b_{name}"], flush=True)
        del s
    calib, _ = prepare(tok, DataConfig(calib_samples=args.calib_samples), need_eval=False)
    s = copy.deepcopy(teacher)
    t0 = time.perf_counter()
    apply(s, make_config("gptq", bits=2, group_size=64), RunContext(calib=calib, progress=True))
    out["b_gptq_seconds"] = time.perf_counter() - t0
    out["b_gptq"] = measure(s, tok, stream, reference=teacher)
    print("gptq", out["b_gptq"], flush=True)
    out["b_qat_train"] = train(s, teacher, windows, args, loss=args.loss_b, tokens=args.tokens_b, lr=args.lr_b,
                               clip_lr=args.clip_lr_b, qat_bits=2, qat_group_size=64, qat_learn_clip=True,
                               qat_init_clip=None)
    materialize_fake_quant_(s)
    out["b_qat"] = measure(s, tok, stream, reference=teacher)
    print("qat", out["b_qat"], flush=True)


# ---- report ------------------------------------------------------------------------------------------------


def f(x, nd=2):
    return f"{x:,.{nd}f}"


def report(r: dict, args) -> str:
    """The section: part (a) and part (b) as far as ``r`` holds them (``--only`` runs are merged
    through ``--json``)."""
    parts = [_report_a(r, args) if "a_runs" in r else "(a) not run yet: `python bench/distill.py --only a --json FILE`.",
             _report_b(r, args) if "b_qat" in r else "(b) not run yet: `python bench/distill.py --only b --json FILE`."]
    runs = "; ".join(f"part {k}: `{v['command']}`, {v['minutes']:.0f} min, 1-minute load average {v['load'][0]:.1f} at the start "
                     f"and {v['load'][1]:.1f} at the end" for k, v in sorted(r.get("runs", {}).items()))
    return f"""## Distillation: prune-then-distill and 2-bit quantization-aware distillation

Runs ({runs}). A load above 2 means other jobs shared the 2 cores and the tokens/s figures are low.
CPU budget: about 35 minutes for part (a) (three losses at two learning rates) and 35 for part (b). Model: SmolLM2-135M-Instruct (built-in, fp32).
Data: built-in Wikipedia corpus; training windows of {args.seq_len} tokens from the calibration documents
(seed 0, {r['train_rows']} windows), batch {args.batch_size} windows per step, AdamW, warmup 5%
then cosine, gradient clipping 1.0, bf16 autocast for the forward passes (fp32 weights); perplexity and KL
to the original model on the evaluation documents (context 512, 4,088 scored tokens, fp32). Machine: {environment()}.

{parts[0]}

{parts[1]}
"""


def _report_a(r, args) -> str:
    t, p, runs = r["teacher"], r["pruned"], r["a_runs"]
    gap = p["perplexity"] - t["perplexity"]
    rec = lambda x: 100 * (p["perplexity"] - x["perplexity"]) / gap  # noqa: E731
    rows = [["original (teacher)", "-", f(t["perplexity"]), "0", "-", "-", "-"],
            ["width-pruned to 75%", "-", f(p["perplexity"]), f(p["kl"], 3), "0", "-", "-"]]
    for x in runs:
        label = A_LOSSES[x["name"]][0].replace("cross-entropy", f"{x['ce_weight']:g} x cross-entropy", 1) \
            if x["name"] == "kdce" else A_LOSSES[x["name"]][0]
        rows.append([f"pruned + {label}", f"{x['lr']:g}", f(x["eval"]["perplexity"]), f(x["eval"]["kl"], 3),
                     f"{x['train']['tokens']:,}", f"{rec(x['eval']):.0f}%", f"{x['train']['tokens_per_s']:.0f}"])
    best = {}
    for x in runs:
        if x["name"] not in best or x["eval"]["perplexity"] < best[x["name"]]["eval"]["perplexity"]:
            best[x["name"]] = x
    tps = {n: sum(x["train"]["tokens_per_s"] for x in runs if x["name"] == n) / sum(x["name"] == n for x in runs)
           for n in best}
    return f"""(a) Student: {r['prune_how']}; non-embedding parameters {r['params_student'] / 1e6:.1f}M of
{r['params_teacher'] / 1e6:.1f}M ({100 * r['params_student'] / r['params_teacher']:.1f}%). Every run starts from the same
pruned model and trains on the same {runs[0]['train']['tokens']:,} tokens ({runs[0]['train']['epochs']:.2f} epochs of the windows),
in the same order; each loss at each learning rate in the table. "Gap recovered" is
(ppl_pruned - ppl_after) / (ppl_pruned - ppl_teacher).

{md_table(["model", "learning rate", "perplexity", "KL to teacher", "train tokens", "gap recovered", "train tokens/s"], rows)}

{_verdict_a(best, rec)}

Training throughput, teacher forward included (mean over the runs): {', '.join(f'{n} {v:.0f}' for n, v in tps.items())}
tokens/s (cross-entropy fine-tuning runs no teacher). bfloat16 autocast versus float32 for the pruned student's
distillation step (3 steps each, same run): {r['tps_bf16_True']:.0f} versus {r['tps_bf16_False']:.0f} tokens/s
({r['tps_bf16_True'] / r['tps_bf16_False']:.2f}x)."""


def _verdict_a(best: dict, rec) -> str:
    """The issue's two figures for (a), each method at its best learning rate."""
    if "ce" not in best or not {"kd", "kdce"} & set(best):
        return "Figures: need a cross-entropy run and a distillation run."
    ce = best["ce"]["eval"]
    lines = []
    for n in ("kd", "kdce"):
        if n in best:
            x = best[n]["eval"]
            beats = x["perplexity"] < ce["perplexity"]
            lines.append(f"- {A_LOSSES[n][0]} at its best learning rate ({best[n]['lr']:g}): recovers {rec(x):.0f}% of the gap "
                         f"(at least half: {'met' if rec(x) >= 50 else 'NOT met'}); perplexity {x['perplexity']:.2f} vs cross-entropy's "
                         f"best {ce['perplexity']:.2f} (lr {best['ce']['lr']:g}): {'beats it' if beats else 'does NOT beat it'}; "
                         f"KL to the teacher {x['kl']:.3f} vs {ce['kl']:.3f}.")
    return "Figures, each method at its best learning rate of the table:\n\n" + "\n".join(lines)


def _report_b(r, args) -> str:
    t, bq = r["teacher"], r["b_qat_train"]
    rows_b = [
        ["float (teacher)", f(t["perplexity"]), "0", "1.000", "-"],
        ["RTN W2 g64 (min-max, post-training)", f(r["b_rtn"]["perplexity"]), f(r["b_rtn"]["kl"], 3), f(r["b_rtn"]["top1"], 3), "0"],
        ["RTN W2 g64 + MSE clipping search (post-training)", f(r["b_rtn_mse"]["perplexity"]), f(r["b_rtn_mse"]["kl"], 3),
         f(r["b_rtn_mse"]["top1"], 3), "0"],
        [f"GPTQ W2 g64 (post-training, {args.calib_samples} x 512 calibration tokens, {r['b_gptq_seconds']:.0f} s)", f(r["b_gptq"]["perplexity"]),
         f(r["b_gptq"]["kl"], 3), f(r["b_gptq"]["top1"], 3), "0"],
        [f"GPTQ W2 g64, then QAT + distillation ({args.loss_b.upper()}, learnable clipping)", f(r["b_qat"]["perplexity"]),
         f(r["b_qat"]["kl"], 3), f(r["b_qat"]["top1"], 3), f"{bq['tokens']:,}"],
    ]
    return f"""(b) Grid: asymmetric per group of 64 input columns, W ≈ (q - z) s, q in [0, 3], fp16 scales, every
linear inside the 30 blocks (embeddings / tied head in float). GPTQ with its defaults (act-order, MSE
clip search). QAT (`lmpress.distill.qat`) starts from the GPTQ model: the latent weights are GPTQ's
dequantized weights and the clipping ratios start at 1, so the starting grid is GPTQ's; the float model
is the teacher; learning rate {args.lr_b:g} for the latent weights (and the float embeddings and
norms), {args.clip_lr_b:g} for the clipping ratios; {bq['tokens']:,} training tokens at {bq['tokens_per_s']:.0f} tokens/s
(teacher forward included).

{md_table(["W2 g64 model", "perplexity", "KL to float", "top-1 agreement", "train tokens"], rows_b)}"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens-a", type=int, default=49_152)
    ap.add_argument("--tokens-b", type=int, default=49_152)
    ap.add_argument("--lr-a", type=float, nargs="+", default=[2e-4, 5e-4], help="(a) learning rates, every loss at each")
    ap.add_argument("--a-losses", nargs="+", choices=list(A_LOSSES), default=list(A_LOSSES))
    ap.add_argument("--ce-weight-a", type=float, default=1.0, help="(a) weight of cross-entropy in the kdce runs")
    ap.add_argument("--lr-b", type=float, default=1e-3)
    ap.add_argument("--clip-lr-b", type=float, default=5e-3)
    ap.add_argument("--loss-b", default="cakld")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--only", choices=["a", "b"], default=None)
    ap.add_argument("--calib-samples", type=int, default=64, help="GPTQ W2 calibration rows of 512 tokens (part b)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--report-only", action="store_true", help="rewrite the section from --json without running")
    args = ap.parse_args()
    if args.report_only and not args.json:
        ap.error("--report-only rewrites the section from the results of --json FILE: give it")
    if args.report_only:
        body = report(Results(args.json, "runs").data, args)
        print(body)
        if not args.no_write:
            write_section("distill", body)
        return
    torch.set_num_threads(2)
    from lmpress import load_model
    from lmpress.data import DataConfig, prepare
    from lmpress.distill.data import corpus_windows

    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    teacher, tok = load_model()
    _, stream = prepare(tok, DataConfig(eval_tokens=4096), need_calib=False)
    rows = -(-max(args.tokens_a, args.tokens_b) // args.seq_len)
    windows = corpus_windows(tok, None, seq_len=args.seq_len, max_rows=rows, seed=0)
    results = Results(args.json, "runs")  # the parts of earlier --only runs, merged
    r = results.data
    r.update(teacher=measure(teacher, tok, stream), train_rows=len(windows))
    print("teacher:", r["teacher"], flush=True)
    if args.only != "b":
        part_a(teacher, tok, stream, windows, args, r)
    if args.only != "a":
        part_b(teacher, tok, stream, windows, args, r)
    info = {"command": "python bench/distill.py " + " ".join(sys.argv[1:]), "minutes": (time.perf_counter() - t0) / 60,
            "load": (load_start, os.getloadavg()[0])}
    for part in "ab" if args.only is None else args.only:
        results.record(part, dict(info))  # saves the parts' figures with it
    body = report(r, args)
    print(body)
    if not args.no_write:
        write_section("distill", body)


if __name__ == "__main__":
    main()
