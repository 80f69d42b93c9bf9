"""Plan benchmark: `lmpress plan`'s mixed allocation against the best uniform recipe and against
llama.cpp's Q4_K_M rule at equal bytes, the two sensitivity estimators, planning and re-planning time.

Default model and corpus. Every recipe (plan, uniform, rule) is compressed with the same GPTQ (act-order,
clip search, asymmetric) on the same calibration rows and measured on the same evaluation text against
the float model; only the allocation differs. Sizes are block-linear bits per weight, stored bytes
(codes + fp16 scales and zeros). Per target:

- plan: ``lmpress.plan(target=bits=T)`` (its confirmed GPTQ model);
- best uniform: of the uniform grid settings with at most T bits per weight, the one with the least
  round-to-nearest KL on the plan's held-out slice, compressed with GPTQ;
- Q4_K_M rule: w4g64 everywhere, v_proj and down_proj at 8 bits per channel (lmpress's grid has no 6
  bits) in the first and last eighth of the layers and every third layer between, head float (tied:
  quantizing it adds bytes, lmpress keeps the embedding float), against a plan at the rule's bits.

    flock /tmp/lmpress-heavy.lock python bench/plan.py             # writes the 'plan' section
    python bench/plan.py --calib 8 --targets 4.5 --no-write        # a quick look
    python bench/plan.py --targets --no-q4km --gguf Q4_K_M         # GGUF: llama.cpp's rule vs a GGUF plan
    python bench/plan.py --targets --no-q4km --budgets kl=0.02 ppl=+5%   # confirmed plans for accuracy budgets
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Results, environment, md_table, provenance, without_bench_on_path, write_section  # noqa: E402

without_bench_on_path()  # bench/gguf.py would shadow the gguf package that GGUF plans use


def q4km_overrides(n_layers: int) -> tuple:
    """llama.cpp's ``use_more_bits`` (llama-quant.cpp): more bits for attn_v and ffn_down in these layers."""
    more = [i for i in range(n_layers) if i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2]
    pat = rf"^model\.layers\.({'|'.join(map(str, more))})\.(self_attn\.v_proj|mlp\.down_proj)$"
    return ({"pattern": pat, "bits": 8, "group_size": -1},)


def gptq_row(model, tok, recipe, calib, stream, data, progress) -> dict:
    from lmpress import recipe as rc
    from lmpress.api import evaluate

    student = copy.deepcopy(model)
    steps = recipe if isinstance(recipe, list) else [recipe]
    t0 = time.perf_counter()
    for step in steps:
        rc.apply(student, step, rc.RunContext(calib=calib, tokenizer=tok, data=data, progress=progress))
    sec = time.perf_counter() - t0
    f = evaluate(student, tok, stream=stream, reference=model, measure_speed=False, progress=False)
    return {"kl": f["kl"], "perplexity": f["perplexity"], "top1": f["top1"], "bits": f["linear_bits_per_weight"],
            "params_linear": f["params_linear"], "seconds": sec,
            "recipe": [rc.to_dict(c) for c in steps] if isinstance(recipe, list) else rc.to_dict(recipe)}


def plan_row(model, tok, target, data, cfg, out, progress) -> dict:
    """One plan, confirmed with GPTQ, with what it chose and how long each part took."""
    import lmpress

    t0 = time.perf_counter()
    res = lmpress.plan(model, tokenizer=tok, target=target, data=data, config=cfg, out=out, progress=progress,
                       overwrite=True)
    last = res["rounds"][-1]
    return {"kl": last["kl"], "perplexity": last["perplexity"], "top1": last["top1"], "bits": last["bits"],
            "plan_seconds": res["seconds"]["plan"], "cached": res["seconds"]["cached"], "seconds": last["compress_seconds"],
            "wall": time.perf_counter() - t0, "estimators": res["estimators"], "estimator": res["estimator"],
            "measure_seconds": res["seconds"]["measure"], "uniform": [r for r in res["recipes"] if r["name"].startswith("uniform")],
            "choice": last["choice"], "original_ppl": res["original"]["perplexity"]}


def budget_row(model, tok, budget, data, cfg, out, progress) -> dict:
    """One plan for an accuracy budget alone (the smallest model within it), with every confirmation round."""
    import lmpress

    t0 = time.perf_counter()
    res = lmpress.plan(model, tokenizer=tok, budget=budget, data=data, config=cfg, out=out, progress=progress,
                       overwrite=True)
    keep = ("kl_limit", "predicted_kl", "bits", "kl", "perplexity", "top1", "met", "note", "compress_seconds")
    return {"budget": budget, "met": res["met"], "plan_seconds": res["seconds"]["plan"], "cached": res["seconds"]["cached"],
            "wall": time.perf_counter() - t0, "original_ppl": res["original"]["perplexity"],
            "rounds": [{k: r[k] for k in keep if k in r} for r in res["rounds"]]}


def _time_left(args, minutes: float = 0) -> bool:
    """False when ``--stop-at HH:MM`` (local time) comes within ``minutes``: no new row starts then
    (the first plan, which measures the sensitivities, asks for 12 minutes)."""
    if not args.stop_at:
        return True
    import datetime

    now = datetime.datetime.now()
    if not hasattr(args, "_stop"):  # the next HH:MM after the run started (past midnight too)
        h, m = map(int, args.stop_at.split(":"))
        stop = now.replace(hour=h, minute=m, second=0, microsecond=0)
        args._stop = stop if stop > now else stop + datetime.timedelta(days=1)
    return now + datetime.timedelta(minutes=minutes) < args._stop


def run(args) -> None:
    torch.set_num_threads(2)
    from lmpress import recipe as rc
    from lmpress.data import DataConfig, prepare
    from lmpress.io import load_model
    from lmpress.planner.config import PlanConfig

    model, tok = load_model()
    data = DataConfig(calib_samples=args.calib, calib_len=512, eval_tokens=4096)
    cfg = PlanConfig(holdout_rows=args.holdout, holdout_len=512, fisher_rows=2, kl_rows=1, kl_len=128,
                     recipes=args.recipes, cache_dir=args.cache)
    calib, stream = prepare(tok, data)
    res = Results(args.json, "rows", fresh=args.fresh)
    if args.write:  # the section follows every finished row, so a stopped run still shows what it measured
        res.on_record = lambda: write_section("plan", report(res.rows, args))
    tmp = Path(tempfile.mkdtemp(prefix="lmpress-plan-"))
    for t in args.targets:
        name = f"plan bits={t}"
        if not _time_left(args, 12 if t == args.targets[0] else 0):
            break
        if res.wanted(name):
            res.record(name, plan_row(model, tok, f"bits={t}", data, cfg, tmp / f"p{t}", args.progress))
        if args.fisher and res.wanted(f"{name}, fisher estimator") and _time_left(args):
            res.record(f"{name}, fisher estimator", plan_row(model, tok, f"bits={t}", data, replace(cfg, estimator="fisher"),
                                                             tmp / f"f{t}", args.progress))
        uni = [u for u in res.rows[name]["uniform"] if u["bits"] <= t + 1e-9]
        best = min(uni, key=lambda u: u["kl"])
        label = best["name"].split()[1]
        name = f"uniform {label} (best at bits<={t})"
        if res.wanted(name) and _time_left(args):
            m = re.fullmatch(r"w(\d)(pc|g(\d+))", label)
            r = rc.make_config("gptq", bits=int(m.group(1)), group_size=-1 if m.group(2) == "pc" else int(m.group(3)))
            res.record(name, {**gptq_row(model, tok, r, calib, stream, data, args.progress), "target": t})
    if args.q4km and _time_left(args):
        name = "Q4_K_M rule"
        if res.wanted(name):
            r = rc.make_config("gptq", bits=4, group_size=64, overrides=q4km_overrides(len(model.model.layers)))
            res.record(name, gptq_row(model, tok, r, calib, stream, data, args.progress))
        bits = res.rows[name]["bits"]
        name = f"plan at the Q4_K_M rule's bits ({bits:.4f})"
        if res.wanted(name) and _time_left(args):
            res.record(name, plan_row(model, tok, f"bits={bits:.6f}", data, cfg, tmp / "pq", args.progress))
    for k in args.depth:
        if _time_left(args):
            depth_rows(res, model, tok, k, calib, stream, data, cfg, tmp, args)
    if args.gguf and _time_left(args):
        gguf_rows(res, model, tok, calib, stream, data, cfg, tmp, args)
    for b in args.budgets:
        name = f"budget {b}"
        if res.wanted(name) and _time_left(args):
            res.record(name, budget_row(model, tok, b, data, cfg, tmp / f"b{len(res.rows)}", args.progress))
    if args.write:
        write_section("plan", report(res.rows, args))


def depth_rows(res, model, tok, k, calib, stream, data, cfg, tmp, args) -> None:
    """Two families against one: ``k`` blocks cut (block influence, ShortGPT's cosine) then GPTQ W4 g64,
    and a quantization-only plan at the same bytes (bits per weight of the original block linears)."""
    from lmpress import recipe as rc
    from lmpress.counts import param_counts

    name = f"depth-{k} + w4g64"
    if res.wanted(name):
        steps = [rc.make_config("prune-depth", drop_layers=k), rc.make_config("gptq", bits=4, group_size=64)]
        row = gptq_row(model, tok, steps, calib, stream, data, args.progress)
        whole = param_counts(model).linear  # the original's block-linear weights (the cut blocks count at 0 bits)
        row.update(bits_kept=row["bits"], bits=row["bits"] * row["params_linear"] / whole)  # over the original's weights
        res.record(name, row)
    bits = res.rows[name]["bits"]
    name = f"plan at depth-{k} + w4g64's bits ({bits:.4f})"
    if res.wanted(name) and _time_left(args):
        res.record(name, plan_row(model, tok, f"bits={bits:.6f}", data, cfg, tmp / f"d{k}", args.progress))


def gguf_rows(res, model, tok, calib, stream, data, cfg, tmp, args) -> None:
    """llama.cpp's rule for the file type ``--gguf`` (GPTQ on its grids, as ``lmpress compress --format
    gguf:TYPE``) and a GGUF plan at that rule's bits: same quantizer, only the per-tensor types differ."""
    from lmpress import recipe as rc

    rule = f"GGUF {args.gguf} rule"
    if res.wanted(rule):
        res.record(rule, gptq_row(model, tok, rc.make_config("gptq", gguf=args.gguf), calib, stream, data, args.progress))
    bits = res.rows[rule]["bits"]
    name = f"GGUF plan at the {args.gguf} rule's bits ({bits:.4f})"
    gcfg = replace(cfg, gguf=args.gguf)
    if args.gguf_exclude:  # e.g. the types that hold a model's published grid exactly (Q4_1, Q5_1 here)
        gcfg = replace(gcfg, gguf_types=tuple(t for t in gcfg.gguf_types if t not in args.gguf_exclude))
        name += f", without {' and '.join(args.gguf_exclude)}"
    if res.wanted(name) and _time_left(args):
        res.record(name, plan_row(model, tok, f"bits={bits:.6f}", data, gcfg, tmp / "pg", args.progress))


def report(rows: dict, args) -> str:
    budgets = {k: v for k, v in rows.items() if "budget" in v}
    rows = {k: v for k, v in rows.items() if "budget" not in v}
    plans = {k: v for k, v in rows.items() if "estimators" in v}  # rows made by lmpress.plan
    if not plans:
        return "## Plan\n\n(no row measured yet)"
    first = next(iter(plans.values()))
    lines = ["## Plan: mixed allocation vs uniform and the Q4_K_M rule", "",
             f"`flock /tmp/lmpress-heavy.lock python bench/plan.py --calib {args.calib} --holdout {args.holdout} "
             f"--recipes {args.recipes}" + (f" --targets {' '.join(map(str, args.targets))}" if getattr(args, "targets", None) else "")
             + (f" --gguf {args.gguf}" if getattr(args, "gguf", None) else "")
             + (f" --gguf-exclude {','.join(args.gguf_exclude)}" if getattr(args, "gguf_exclude", None) else "")
             + (" --fisher" if getattr(args, "fisher", False) else "")
             + (f" --depth {' '.join(map(str, args.depth))}" if getattr(args, "depth", None) else "")
             + (f" --budgets {' '.join(args.budgets)}" if getattr(args, "budgets", None) else "") + f"`; {environment()}. Default model (SmolLM2-135M-Instruct), built-in corpus; "
             f"GPTQ (act-order, clip search, asymmetric) on {args.calib} x 512 calibration tokens for every row; KL, "
             "perplexity and top-1 on the 4,096 evaluation tokens (context 512) against the float model "
             f"(perplexity {first['original_ppl']:.3f}). Sensitivities: held-out calibration slice of {args.holdout} x 512 "
             "tokens (after the GPTQ rows) for the measured recipes, its first 2 x 512 for the fisher estimator, "
             "1 x 128 for the kl estimator." + (f" {args.note}" if args.note else ""), "",
             md_table(["recipe", "bits/weight (block linears)", "KL", "perplexity", "top-1", "KL / best uniform"],
                      _rows(rows)), "",
              "Caveat: the default model's weights were published as Q4_1 (4 bits, groups of 32, scale and minimum), so "
              "asymmetric w4g32 (5.0 stored bits per weight here: fp16 scale and zero per 32 weights) reproduces them "
              "exactly. An allocation free to mix w4g32 in gets a lossless option that ordinary weights do not offer; "
              "the uniform and rule rows above do not use it. In a GGUF file the same holds for Q4_1 (llama.cpp's own "
              "Q4_1 file of this model has KL 0) and nearly for Q5_1, which hold the published grid: a GGUF plan free to "
              "choose them finds that grid, so the fair GGUF plan row leaves them out (`--gguf-exclude Q4_1,Q5_1`), as "
              "llama.cpp's Q4_K_M rule does. Choices of the plan, by setting: see the per-row counts below."
              + (" depth-K + w4g64: K blocks cut (ShortGPT's cosine block influence on the calibration rows), then "
                 "GPTQ W4 g64 on the rest; its bits per weight are over the original model's block linears (a cut "
                 "block stores nothing), so the plan beside it has the same bytes." if any(k.startswith("depth-") for k in rows)
                 else ""), ""]
    for k, v in rows.items():
        if "choice" in v:
            from collections import Counter

            cnt = Counter(v["choice"].values())
            lines.append(f"- {k}: " + ", ".join(f"{lab} x{n}" for lab, n in cnt.most_common()))
    lines.append("")
    if provenance(rows):
        lines += [provenance(rows), ""]
    lines += ["Sensitivity estimators (Spearman rank correlation of the predicted with the measured round-to-nearest "
              f"KL of {len(first['uniform'])} uniform and {args.recipes} random mixed recipes on the held-out slice):", "",
              md_table(["estimator", "Spearman", "used"],
                       [[e, f"{q['spearman']:.3f}", "yes" if e == first["estimator"] else ""]
                        for e, q in first["estimators"].items()]), ""]
    ms = first["measure_seconds"]
    gptq = [v["seconds"] for k, v in rows.items() if k.startswith("uniform")] or [float("nan")]
    cached = [v["plan_seconds"] for v in plans.values() if v["cached"]]
    lines += [f"Time: first plan {first['plan_seconds']:.0f} s before confirmation (fisher {ms.get('fisher', 0):.0f} s, "
              f"kl estimator {ms.get('kl', 0):.0f} s, measured recipes {ms.get('recipes', 0):.0f} s); one GPTQ run "
              f"{min(gptq):.0f} s" + (f" (plan / GPTQ = {first['plan_seconds'] / min(gptq):.1f}x)" if gptq else "")
              + ("; a re-plan for a new target from the cached sensitivities takes, before its confirmation (which "
                 "compresses with GPTQ again): " + ", ".join(f"{k} {v['plan_seconds']:.1f} s (commit {v.get('commit', '?')})"
                                                            for k, v in plans.items() if v["cached"])
                 + " (a re-plan evaluated the original model until commit eb46406, which keeps its figures in the cache; "
                 "the first re-plan after that fills them in)" if cached else "") + ".", ""]
    if any(k.endswith("fisher estimator") for k in rows):  # its first plan would measure only these parts
        alone = ms.get("fisher", 0) + ms.get("recipes", 0)
        lines += [f"A first plan with the fisher estimator alone measures the fisher scores and the recipes only: "
                  f"{ms.get('fisher', 0):.0f} + {ms.get('recipes', 0):.0f} = {alone:.0f} s of the times above "
                  f"(plan / GPTQ = {alone / min(gptq):.1f}x); its rows ('fisher estimator') were planned from the same "
                  "cache.", ""]
    for k, v in list(plans.items())[1:]:
        if not v["cached"]:  # a plan over other candidates (GGUF types) measured its own sensitivities
            m = v["measure_seconds"]
            lines += [f"- {k}: {v['plan_seconds']:.0f} s before confirmation (fisher {m.get('fisher', 0):.0f} s, kl estimator "
                      f"{m.get('kl', 0):.0f} s, measured recipes {m.get('recipes', 0):.0f} s); estimator used: {v['estimator']} "
                      "(Spearman " + ", ".join(f"{e} {q['spearman']:.3f}" for e, q in v["estimators"].items()) + ")."]
    if budgets:
        lines += ["", *budget_report(budgets)]
    return "\n".join(lines)


def budget_report(budgets: dict) -> list[str]:
    """The accuracy budgets: each plan's confirmation rounds and whether the last one met the budget."""
    rows = []
    for v in budgets.values():
        for i, r in enumerate(v["rounds"]):
            rows.append([v["budget"] if i == 0 else "", str(i + 1), f"{r['kl_limit']:.4g}", f"{r['predicted_kl']:.4f}",
                         f"{r['bits']:.3f}", f"{r['kl']:.4f}",
                         f"{r['perplexity']:.3f} ({100 * (r['perplexity'] / v['original_ppl'] - 1):+.1f}%)",
                         "yes" if r["met"] else "no" + (f": {r['note']}" if r.get("note") else "")])
    met = sum(v["met"] for v in budgets.values())
    return [f"Accuracy budgets alone (the smallest plan within each; confirmed by compressing with GPTQ and evaluating "
            f"as above; a missed budget tightens the predicted-KL limit and re-solves, at most 3 rounds): "
            f"**{met} of {len(budgets)} met**. Re-plans from the cached sensitivities took "
            + ", ".join(f"{v['plan_seconds']:.1f}" for v in budgets.values() if v["cached"]) + " s before confirmation.", "",
            md_table(["budget", "round", "predicted-KL limit", "predicted KL", "bits/weight", "KL", "perplexity", "met"], rows)]


def _rows(rows: dict) -> list:
    out = []
    for k, v in rows.items():
        ref = None
        t = v.get("target")
        m = re.match(r"plan bits=([\d.]+)", k)
        tgt = float(m.group(1)) if m else t
        uni = next((u for kk, u in rows.items() if kk.startswith("uniform") and u.get("target") == tgt), None)
        if uni is not None:
            ref = v["kl"] / uni["kl"]
        if k.startswith("plan at the Q4") and "Q4_K_M rule" in rows:
            ref = None
            k = k + f" (KL / rule's: {v['kl'] / rows['Q4_K_M rule']['kl']:.2f}x)"
        d = re.match(r"plan at (depth-\d+ \+ w4g64)'s bits", k)
        if d and d.group(1) in rows:
            ref = None
            k = k + f" (KL / {d.group(1)}'s: {v['kl'] / rows[d.group(1)]['kl']:.2f}x)"
        g = re.match(r"GGUF plan at the (\S+) rule's", k)
        if g and f"GGUF {g.group(1)} rule" in rows:
            ref = None
            k = k + f" (KL / rule's: {v['kl'] / rows[f'GGUF {g.group(1)} rule']['kl']:.2f}x)"
        out.append([k, f"{v['bits']:.4f}", f"{v['kl']:.5f}", f"{v['perplexity']:.3f}", f"{v['top1']:.4f}",
                    "-" if ref is None else f"{ref:.2f}x"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=32, help="GPTQ calibration rows of 512 tokens (default 32)")
    ap.add_argument("--holdout", type=int, default=4, help="held-out rows of 512 tokens (default 4)")
    ap.add_argument("--recipes", type=int, default=12, help="random mixed recipes measured (default 12)")
    ap.add_argument("--targets", type=float, nargs="*", default=[4.5, 3.5])
    ap.add_argument("--no-q4km", dest="q4km", action="store_false")
    ap.add_argument("--depth", type=int, nargs="*", default=[],
                    help="blocks cut before GPTQ W4 g64 (two families), each against a quantization-only plan at its bytes")
    ap.add_argument("--fisher", action="store_true",
                    help="also each target's plan with the fisher estimator alone (the cheap one), from the same cache")
    ap.add_argument("--gguf", default=None, metavar="TYPE",
                    help="also llama.cpp's rule for this file type (e.g. Q4_K_M) against a GGUF plan at its bits")
    ap.add_argument("--gguf-exclude", type=lambda t: tuple(t.split(",")), default=(), metavar="T1,T2",
                    help="block types the GGUF plan may not choose (the row's name says so)")
    ap.add_argument("--budgets", nargs="*", default=[], metavar="B",
                    help="accuracy budgets planned alone and confirmed (kl=0.05, ppl=+5%%), after the other rows")
    ap.add_argument("--json", default=str(Path.home() / ".cache" / "lmpress" / "bench" / "plan.json"), help="finished rows (resume)")
    ap.add_argument("--cache", default=None, help="sensitivity cache folder (default ~/.cache/lmpress/plan)")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--no-write", dest="write", action="store_false")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--note", default="", help="a sentence about the run's conditions (what else ran)")
    ap.add_argument("--stop-at", default=None, metavar="HH:MM", help="start no new row after this local time")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
