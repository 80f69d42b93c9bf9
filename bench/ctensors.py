"""compressed-tensors out and in: one folder evaluated three ways, and llm-compressor's folder read by lmpress.

    flock /tmp/lmpress-heavy.lock python bench/ctensors.py [--only 'W4 g64 asym;README'] [--no-peer] [--fresh]

For each setting, GPTQ on the default model and corpus (64 x 512 calibration tokens) writes a
compressed-tensors folder (``format="compressed-tensors"``), which is then evaluated

* by lmpress (``lmpress.load_model`` of the folder: packed ``QuantLinear`` layers),
* by plain transformers (``AutoModelForCausalLM.from_pretrained`` of the folder, compressed-tensors
  installed; asymmetric folders only load with ``CompressedTensorsConfig(dequantize=True)``, an
  upstream limit of transformers 5.x + compressed-tensors 0.20, and not at all when they mix
  settings), with lmpress's perplexity protocol on the same 4,096 evaluation tokens, and the largest
  |logit difference| from lmpress's in-memory model over all evaluation windows,
* by lm-evaluation-harness (``lmpress.lmeval``, when installed) on the built-in task ``wiki_cloze``
  (100 items), run on the model plain transformers loaded, beside lmpress's own scorer on lmpress's load,

and llm-compressor's own compressed-tensors output for the same setting (``--compressed``) is read
by lmpress and measured the same way. The row ``README`` runs the README's first command itself
(``lmpress compress --method gptq --bits 4 --group-size 64 --sym --head-bits 8``, its defaults: 128 x 512
calibration tokens) and compares the perplexity it printed with plain transformers' on its folder.
Finished rows are kept in ``out/ctensors.json`` (``--fresh`` starts over), so the rows can be measured
one invocation at a time; the 'ctensors' section of BENCHMARKS.md is written from all of them.
The settings '... + trained scales' add a second recipe step after GPTQ: its fp16 group scales trained
end to end on the float model's KL over the same calibration rows, codes and zeros fixed
(``DistillConfig(train="scales", data="calib")``, :mod:`lmpress.distill.scales`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, Results, environment, md_table, provenance, write_section
from quant import run_peer

# label -> (GPTQ options, llm-compressor scheme or None)
SETTINGS = {
    "W4 g64 sym, 8-bit head": ({"bits": 4, "group_size": 64, "sym": True, "head_bits": 8}, None),
    "W4 g64 asym": ({"bits": 4, "group_size": 64}, "gptq-w4g64-asym"),
    "W3 g64 asym": ({"bits": 3, "group_size": 64}, "gptq-w3g64-asym"),
    "W3 g64 sym": ({"bits": 3, "group_size": 64, "sym": True}, None),
    # GPTQ, then its fp16 group scales trained on the float model's KL over the same calibration rows (codes and
    # zeros fixed; lmpress.distill.scales): SCALE_EPOCHS passes, one 512-token row per step
    "W4 g64 sym, 8-bit head + trained scales": ({"bits": 4, "group_size": 64, "sym": True, "head_bits": 8, "scales": True}, None),
    "W3 g64 asym + trained scales": ({"bits": 3, "group_size": 64, "scales": True}, None),
}
SCALE_EPOCHS, SCALE_LR = 2, 1e-3
TASK, TASK_LIMIT = "wiki_cloze", 100
README_CMD = ["compress", "--method", "gptq", "--bits", "4", "--group-size", "64", "--sym", "--head-bits", "8"]


def logits_gap(a, b, stream, bos, context=512) -> float:
    """Largest |logit difference| of two models over the evaluation windows (float32)."""
    from lmpress.evaluate import windows

    ids, _ = windows(stream, context, bos)
    gap = 0.0
    with torch.no_grad():
        for row in ids:
            gap = max(gap, float((a(row[None]).logits.float() - b(row[None]).logits.float()).abs().max()))
    return gap


def transformers_load(folder: Path):
    """The folder as plain transformers loads it, or the reason it cannot."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from lmpress.formats import load_note

    note = load_note(folder, "compressed-tensors")
    if note and "cannot load" in note:
        return None, note
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if note else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    return model, "dequantize=True" if note else "plain"


def lm_eval_acc(model, tok):
    try:
        from lmpress.lmeval import evaluate_lm_eval
    except ImportError:
        return None
    try:
        return evaluate_lm_eval(model, tok, TASK, limit=TASK_LIMIT)["lm_eval_acc"]
    except Exception as e:  # the harness missing or a task that cannot load: say so in the table
        return f"n/a ({type(e).__name__}: {str(e)[:120]})"


def own_acc(model, tok) -> float:
    """lmpress's own scorer (evaluate.multiple_choice) on the same items as the harness."""
    from lmpress.evaluate import multiple_choice
    from lmpress.tasks import load_task

    return multiple_choice(model, tok, load_task(TASK, TASK_LIMIT)).acc


def scales_step(calib):
    from lmpress.distill.engine import DistillConfig

    return DistillConfig(train="scales", data="calib", seq_len=calib.shape[1], tokens=SCALE_EPOCHS * calib.numel(),
                         batch_size=1, lr=SCALE_LR, warmup=0.0, min_lr=0.0, grad_clip=0.0)


def setting_row(label, opts, fm, tok, calib, stream, tmp) -> dict:
    import lmpress
    from lmpress.evaluate import perplexity

    folder = Path(tmp) / label.replace(" ", "_").replace(",", "").replace("+", "")
    opts = dict(opts)
    recipe = [lmpress.GPTQConfig(**opts)] if not opts.pop("scales", False) else [lmpress.GPTQConfig(**opts), scales_step(calib)]
    t0 = time.perf_counter()
    q, _ = lmpress.compress(fm, recipe, tok, out=folder, format="compressed-tensors", measure=False,
                            progress=False, data=lmpress.DataConfig(calib_samples=calib.shape[0]))
    seconds = time.perf_counter() - t0
    ours, _ = lmpress.load_model(folder)
    row = {"seconds": seconds, "lmpress": lmpress.evaluate(ours, tok, stream=stream, reference=fm, measure_speed=False,
                                                           model_path=folder, progress=False)}
    hf, how = transformers_load(folder)
    row["transformers_how"] = how
    if hf is not None:
        row["transformers_ppl"] = perplexity(hf, stream, bos=tok.bos_token_id).ppl
        row["transformers_gap"] = logits_gap(hf, q, stream, tok.bos_token_id)
        row["transformers_lm_eval"] = lm_eval_acc(hf, tok)
        del hf
    row["lmpress_gap"] = logits_gap(ours, q, stream, tok.bos_token_id)
    row["lmpress_lm_eval"] = own_acc(ours, tok)
    return row


def peer_row(scheme, model_dir, fm, tok, calib, stream, tmp) -> dict:
    import lmpress

    calib_file = Path(tmp) / "calib.npy"
    np.save(calib_file, calib.numpy())
    got, err = run_peer(scheme, model_dir, calib_file, tmp, compressed=True)
    if got is None:
        return {"error": err}
    theirs, _ = lmpress.load_model(got[0])
    return {"seconds": got[1], "note": getattr(theirs, "lmpress_load_note", ""),
            **lmpress.evaluate(theirs, tok, stream=stream, reference=fm, measure_speed=False, progress=False)}


def readme_row(fm, tok, stream, tmp) -> dict:
    """The README's first command as a user runs it, then its folder in plain transformers."""
    from lmpress.evaluate import perplexity

    folder, js = Path(tmp) / "readme-out", Path(tmp) / "readme.json"
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "lmpress.cli", *README_CMD, "-o", str(folder), "--no-speed",
                          "--json", str(js)], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"the README command failed: {res.stderr.strip()[-500:]}")
    printed = json.loads(js.read_text())["after"]
    hf, how = transformers_load(folder)
    row = {"seconds": time.perf_counter() - t0, "printed_ppl": printed["perplexity"], "printed_kl": printed["kl"],
           "transformers_how": how, "disk_bytes": printed.get("disk_bytes")}
    if hf is not None:
        row["transformers_ppl"] = perplexity(hf, stream, bos=tok.bos_token_id).ppl
        row["rel_diff"] = abs(row["transformers_ppl"] - row["printed_ppl"]) / row["printed_ppl"]
    return row


def readme_report(r: dict) -> str:
    if "transformers_ppl" not in r:
        return f"README's first command: plain transformers does not load its folder ({r['transformers_how']}).\n"
    ok = "within" if r["rel_diff"] <= 1e-3 else "NOT within"
    return (f"README's first command (`lmpress {' '.join(README_CMD)} -o OUT`, 128 x 512 calibration tokens, "
            f"{r['seconds']:.0f} s with the evaluation): lmpress printed perplexity {r['printed_ppl']:.4f} (KL "
            f"{r['printed_kl']:.4f}); plain transformers (`AutoModelForCausalLM.from_pretrained(OUT)`, {r['transformers_how']}) "
            f"on the same folder and evaluation tokens: {r['transformers_ppl']:.4f}, a relative difference of "
            f"{r['rel_diff']:.1e}: {ok} the 0.1% target.\n")


def report(rows: dict, float_ppl: float, args) -> str:
    def f(x, nd=3):
        return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

    table, notes = [], set()
    readme = rows.get("README")
    for label, r in rows.items():
        if label == "README":
            continue
        ours = r["lmpress"]
        notes.update(v for v in (r.get("lmpress_lm_eval"), r.get("transformers_lm_eval")) if isinstance(v, str))
        table.append([label, f(ours["perplexity"]), f(ours["kl"], 4), f(r.get("transformers_ppl")),
                      r["transformers_how"] if "transformers_ppl" in r else f"does not load: {r['transformers_how']}",
                      f"{r['transformers_gap']:.1e}" if "transformers_gap" in r else "-",
                      *(("n/a" if isinstance(v, str) else f(v)) for v in (r.get("lmpress_lm_eval"), r.get("transformers_lm_eval"))),
                      f(r["peer"].get("perplexity")) if r.get("peer") else "-",
                      f(r["peer"].get("kl"), 4) if r.get("peer") else "-"])
    head = ["setting (GPTQ)", "lmpress ppl", "lmpress KL", "transformers ppl", "transformers load",
            "max abs logit diff", f"{TASK} acc: lmpress scorer, lmpress's load", "lm-eval harness, transformers' load",
            "llm-compressor folder read by lmpress: ppl", "its KL"]
    return ("## compressed-tensors: one folder, three evaluators; llm-compressor's folder read by lmpress\n\n"
            "Command: `flock /tmp/lmpress-heavy.lock python bench/ctensors.py" + "".join(" " + a for a in sys.argv[1:])
            + "` (rows can be measured one at a time with "
            f"`--only LABEL`; cached in out/ctensors.json). Model: SmolLM2-135M-Instruct (fp32, perplexity {float_ppl:.3f}). "
            f"Calibration: {args.calib_samples} x 512 tokens; evaluation: 4,096 tokens, context 512; KL to the float "
            f"model. '+ trained scales': GPTQ, then its fp16 group scales trained on the float model's KL (codes and zeros "
            f"fixed; recipe step distill with train: scales, data: calib), {SCALE_EPOCHS} passes over the same calibration "
            f"rows, one row per step, lr {SCALE_LR}. {TASK}: the first {TASK_LIMIT} items of lmpress's built-in cloze task (held-out Wikipedia text), "
            "scored by lmpress's own multiple-choice scorer on the folder as lmpress loads it and by lm-evaluation-harness "
            "(HFLM) on the folder as plain transformers loads it ('-': the folder does not load there). Written: " + environment() + ". "
            + (provenance(rows) or f"Rows measured at commit {next(iter(rows.values())).get('commit', '?')}.") + "\n\n"
            + md_table(head, table) + "\n\n" + "".join(f"- lm-eval: {n}\n" for n in sorted(notes))
            + (readme_report(readme) if readme else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description="compressed-tensors benchmark")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--only", type=lambda s: [x.strip() for x in s.split(";")], default=None,
                    help="';'-separated setting labels")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="forget the cached rows")
    args = ap.parse_args()
    torch.set_num_threads(2)
    import lmpress
    from lmpress.io import resolve_model_path

    model_dir = resolve_model_path(None)
    fm, tok = lmpress.load_model(model_dir)
    calib, stream = lmpress.prepare(tok, lmpress.DataConfig(calib_samples=args.calib_samples))
    float_ppl = lmpress.evaluate(fm, tok, stream=stream, measure_speed=False, progress=False)["perplexity"]
    results = Results(ROOT / "out" / "ctensors.json", "rows", fresh=args.fresh, only=args.only)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for label, (opts, scheme) in SETTINGS.items():
            if not results.wanted(label):
                continue
            row = setting_row(label, opts, fm, tok, calib, stream, tmp)
            if scheme and not args.no_peer:
                row["peer"] = peer_row(scheme, model_dir, fm, tok, calib, stream, tmp)
            results.record(label, row)
        if results.wanted("README"):
            results.record("README", readme_row(fm, tok, stream, tmp))
    body = report(results.rows, float_ppl, args)
    if not args.no_write:
        write_section("ctensors", body)
    print(body)


if __name__ == "__main__":
    main()
