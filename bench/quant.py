"""Quantization benchmark: float vs RTN, GPTQ and AWQ at several widths, plus llm-compressor's GPTQ.

    python bench/quant.py                      # full table, writes the 'quant' section of BENCHMARKS.md
    python bench/quant.py --quick              # fewer settings, for a smoke run (does not write)
    python bench/quant.py --resume --redo "W4 g64|gptq" "W4 g64|llmc"   # re-measure rows, keep the rest

Every finished row is kept in ``--cache`` (JSON); ``--resume`` skips the rows found there and
``--redo`` measures the named rows (``label|method``) again, so an interrupted or disturbed run can
be completed without redoing everything. The table says which rows came from a later run.

Default model (SmolLM2-135M-Instruct, fp32), default corpus; the same calibration tokens
(64 x 512 from the calibration split) for every method and for llm-compressor; evaluation on the
fixed evaluation stream (4,096 tokens, context 512). The default model's weights were stored as
Q4_1 (per 32 weights a scale and a float minimum), so W4 asymmetric g32 is favoured by the data:
it is marked. (It is not lossless: lmpress's grid has an integer zero point, Q4_1 a float minimum.) Decode speed depends on the storage (bits, group), not on the method, so
it is measured once per storage setting, on the GPTQ model, in the same process as the float model.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, Results, environment, md_table, measure, measure_saved, save, write_section  # noqa: E402

# (label, bits, group size, method), most informative first: the table is rewritten after every row
PLAN = [
    ("W4 g64", 4, 64, "rtn"), ("W4 g64", 4, 64, "gptq"), ("W3 g64", 3, 64, "rtn"), ("W3 g64", 3, 64, "gptq"),
    ("W4 g64", 4, 64, "llmc"), ("W3 g64", 3, 64, "llmc"),
    ("W2 g64", 2, 64, "rtn"), ("W2 g64", 2, 64, "gptq"), ("W4 g64", 4, 64, "gptq+head8"),
    ("W4 g64", 4, 64, "awq"), ("W3 g64", 3, 64, "awq"), ("W2 g64", 2, 64, "awq"),
    ("W8 per-channel", 8, -1, "rtn"), ("W8 per-channel", 8, -1, "gptq"), ("W4 per-channel", 4, -1, "rtn"),
    ("W4 per-channel", 4, -1, "gptq"), ("W4 g32", 4, 32, "rtn"),
]
SPEED_METHOD = {"W4 g32": "rtn"}  # decode speed measured on this method's model (else GPTQ's)
PEER_PYTHON = Path("/work/peers/llmc/bin/python")
PEER_SCRIPT = ROOT / "bench" / "peers" / "llmc_oneshot.py"


SPEED = dict(prompt_tokens=64, new_tokens=32, repeats=3)  # the documented decode protocol (evaluate's own: a 256-token prompt)


def run_method(float_model, method, bits, group, calib, **extra):
    from lmpress.recipe import RunContext, apply, make_config, to_dict

    model = copy.deepcopy(float_model)
    cfg = make_config(method, bits=bits, group_size=group, **extra)
    t0 = time.perf_counter()
    apply(model, cfg, RunContext(calib=calib, progress=False))
    return model, time.perf_counter() - t0, [to_dict(cfg)]


def run_peer(scheme, model_dir, calib_file, tmp, compressed: bool = False):
    if not PEER_PYTHON.exists():
        return None, "llm-compressor venv missing: run bench/peers/setup_llmcompressor.sh"
    out = Path(tmp) / f"llmc-{scheme}"
    cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), "--model", str(model_dir), "--calib", str(calib_file), "--out", str(out), "--scheme", scheme]
    cmd += ["--compressed"] if compressed else []
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return None, res.stderr.strip().splitlines()[-1][:200] if res.stderr.strip() else "failed"
    info = json.loads([l for l in res.stdout.splitlines() if l.startswith("{")][-1])
    return (out, info["oneshot_seconds"]), None


class Run:
    """The float model, the tokens and the rows of one invocation (rows ``label|method`` in a
    :class:`Results` file; ``data["fspeed"]``: the float model's decode speeds, ``data["later"]``: rows
    measured by a later ``--redo`` run than the others)."""

    def __init__(self, args):
        from lmpress.data import DataConfig, prepare
        from lmpress.evaluate import speed
        from lmpress.io import load_model, resolve_model_path

        self.args = args
        self.model_dir = resolve_model_path(None)
        self.fm, self.tok = load_model(self.model_dir)
        self.calib, self.stream = prepare(self.tok, DataConfig(calib_samples=args.calib_samples))
        self.float_row = measure(self.fm, self.tok, self.stream, model_path=self.model_dir)
        self.results = Results(None if args.quick or args.only else args.cache, "rows", fresh=not args.resume,
                               only=args.only)
        self.rows, data = self.results.rows, self.results.data
        for k in args.redo:
            self.rows.pop(k, None)
        self.later = set(data.get("later", [])) | set(args.redo)
        data["later"] = sorted(self.later)
        self.fspeed = data.setdefault("fspeed", [])
        self.fspeed.append(speed(self.fm, **SPEED).decode_tps)

    def peer(self, bits, group, calib_file, tmp) -> dict:
        got, err = run_peer(f"gptq-w{bits}g{group}-asym", self.model_dir, calib_file, tmp)
        if got is None:
            return {"error": err}
        _, row = measure_saved(got[0], self.tok, self.stream, self.fm)
        return {**row, "seconds": got[1]}

    def ours(self, label, bits, group, method, tmp) -> dict:
        from lmpress.evaluate import speed

        extra = {"head_bits": 8} if method == "gptq+head8" else {}
        m, secs, recipe = run_method(self.fm, method.split("+")[0], bits, group, self.calib, **extra)
        with_speed = method == SPEED_METHOD.get(label, "gptq") or method == "gptq+head8"
        out = save(m, Path(tmp) / f"m{time.monotonic_ns()}", self.tok, recipe)
        row = {**measure(m, self.tok, self.stream, reference=self.fm, model_path=out, speed_kw=SPEED if with_speed else None),
               "seconds": secs}
        del m
        if with_speed:
            self.fspeed.append(speed(self.fm, **SPEED).decode_tps)
        return row

    def plan(self, tmp) -> None:
        from lmpress.quant import kernels

        calib_file = Path(tmp) / "calib.npy"
        np.save(calib_file, self.calib.numpy())
        for label, bits, group, method in PLAN[:4] if self.args.quick else PLAN:
            name = f"{label}|{method}"
            if not self.results.wanted(name) or (method == "llmc" and self.args.no_peer):
                continue
            row = self.peer(bits, group, calib_file, tmp) if method == "llmc" else self.ours(label, bits, group, method, tmp)
            self.results.record(name, row)
            if not (self.args.quick or self.args.only):
                self.write(kernels.backend_name(), done=False)

    def time128(self) -> None:
        """The time target is at 128 x 512 calibration tokens."""
        from lmpress.data import DataConfig, prepare

        if not self.results.wanted("time128|gptq"):
            return
        calib128, _ = prepare(self.tok, DataConfig(calib_samples=128), need_eval=False)
        m, secs, _ = run_method(self.fm, "gptq", 4, 64, calib128)
        self.results.record("time128|gptq", {"seconds": secs, **measure(m, self.tok, self.stream)})

    def write(self, kinfo, done) -> None:
        def key(name):
            return tuple(name.split("|"))

        results = {key(k): v for k, v in self.rows.items()}
        write(results, self.float_row, self.fspeed, {key(k) for k in self.later}, kinfo, self.args, done)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--note", default="", help="a sentence about the run's conditions, printed with the table")
    ap.add_argument("--cache", default="/tmp/lmpress-bench-quant.json")
    ap.add_argument("--resume", action="store_true", help="keep the rows of --cache, run only the missing ones")
    ap.add_argument("--redo", nargs="*", default=[], help="rows 'label|method' to measure again (with --resume)")
    ap.add_argument("--only", type=lambda s: set(s.split(",")), default=None,
                    help="comma-separated rows 'label|method' (e.g. 'W4 g64|gptq,W3 g64|gptq'): measured and printed "
                         "as JSON, BENCHMARKS.md untouched (to check that a change keeps the figures)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from lmpress.quant import kernels

    run = Run(args)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        run.plan(tmp)
        if args.only:
            print(json.dumps({"float": run.float_row, **run.rows}, indent=2, default=str))
            return
        if not args.quick:
            run.time128()
            run.write(kernels.backend_name(), done=True)


def _checks(results, float_row) -> str:
    """The issue's figures, computed from this run's rows."""
    out = []
    r3, g3 = results.get(("W3 g64", "rtn")), results.get(("W3 g64", "gptq"))
    if r3 and g3:
        ratio = (g3["perplexity"] - float_row["perplexity"]) / (r3["perplexity"] - float_row["perplexity"])
        out.append(f"- GPTQ W3 g64 perplexity increase over float: {g3['perplexity'] - float_row['perplexity']:.2f} vs RTN's "
                   f"{r3['perplexity'] - float_row['perplexity']:.2f}: ratio {ratio:.2f} (target: at most 0.50).")
    w2 = {m: r for (l, m), r in results.items() if l == "W2 g64" and "perplexity" in r}
    if w2:
        best = min(w2, key=lambda m: w2[m]["perplexity"])
        out.append(f"- Best post-training W2 g64: {best.upper()}, perplexity {w2[best]['perplexity']:.2f}, KL {w2[best]['kl']:.3f} "
                   "(the number quantization-aware distillation has to beat).")
    t = results.get(("time128", "gptq"))
    if t:
        out.append(f"- GPTQ W4 g64 with 128 x 512 calibration tokens: {t['seconds']:.0f} s wall time (target: under 600 s), "
                   f"perplexity {t['perplexity']:.3f}.")
    return "\n".join(out)


def write(results, float_row, fspeed, later, kinfo, args, done) -> None:
    fdec = sum(fspeed) / len(fspeed)
    rows = [["float (fp32)", "-", f"{float_row['perplexity']:.3f}", "0", f"{float_row['linear_bits_per_weight']:.2f}", f"{float_row['disk_bytes'] / 1e6:.1f}", "-", f"{fdec:.1f} (1.00x)"]]
    for (label, method), r in results.items():
        if method == "llmc" or label == "time128":
            continue
        note = " †" if label == "W4 g32" else ""
        dec = f"{r['decode_tps']:.1f} ({r['decode_tps'] / fdec:.2f}x)" if "decode_tps" in r else "same storage as GPTQ"
        name = ("GPTQ, 8-bit head" if method == "gptq+head8" else method.upper()) + (" ‡" if (label, method) in later else "")
        rows.append([label + note, name, f"{r['perplexity']:.3f}", f"{r['kl']:.4f}", f"{r['linear_bits_per_weight']:.2f}",
                     f"{r['disk_bytes'] / 1e6:.1f}", f"{r['seconds']:.1f}", dec])
    peer_rows = []
    for (label, method), p in results.items():
        if method != "llmc" or label == "time128":
            continue
        ours = results.get((label, "gptq"))
        if "error" in p:
            peer_rows.append([label, "not run: " + p["error"], "", "", "", ""])
            continue
        mark = " ‡" if (label, method) in later else ""
        peer_rows.append([label + mark, f"{p['perplexity']:.3f}", f"{p['kl']:.4f}", f"{p['seconds']:.0f}",
                          f"{ours['perplexity']:.3f} / {ours['kl']:.4f} / {ours['seconds']:.0f}",
                          f"{ours['seconds'] / p['seconds']:.2f}x"])
    linear_fp32, emb = 4 * float_row["params_linear"], 4 * float_row["params_embedding"]
    w4 = results.get(("W4 g64", "gptq"))
    size = (f"Size check (W4 g64, GPTQ): {w4['disk_bytes'] / 1e6:.1f} MB on disk vs the target 0.30 x fp32 block-linear bytes "
            f"({linear_fp32 / 1e6:.1f} MB) + fp32 embedding ({emb / 1e6:.1f} MB) = {(0.3 * linear_fp32 + emb) / 1e6:.1f} MB.") if w4 else ""
    checks = _checks(results, float_row)
    status = "" if done else f"\n**Partial run: {len(results)} of {len(PLAN)} planned rows were measured when this table was written.**\n"
    body = f"""## Quantization: RTN, AWQ, GPTQ; llm-compressor side by side

Command: `python bench/quant.py`. Model: SmolLM2-135M-Instruct (fp32). Calibration: {args.calib_samples} x 512
tokens from the calibration split (same tokens for every method and for llm-compressor). Evaluation:
4,096-token evaluation stream, context 512 (4,088 scored tokens); KL is KL(float ‖ quantized), nats
per token. Bits per weight: stored bits of the block linears (codes + fp16 scales and zeros) per
weight. Size: the saved folder's safetensors (embedding in fp32, output head tied unless noted).
GPTQ uses its defaults (act-order with static groups, MSE clip search, calibration passes in bf16,
not true-sequential); AWQ its defaults
(20-point scale grid, activation-weighted clip search); llm-compressor's GPTQ with an asymmetric int
grid at the same bits and group size, its other settings default (act-order static, min-max
observer, float32 passes). Decode: batch 1, 64-token prompt,
32 greedy tokens, best of 3; ratio to the float model's mean decode speed over runs interleaved in
the same process. Kernel: {kinfo}. Machine: {environment()}.
{args.note}
{status}
{"‡ measured again in a later run of the same script (`--resume --redo`), both rows of the lmpress / llm-compressor pair together, after the first run's figure was disturbed by other work on the machine; every other row is from the first run." if later else ""}

† the default model's weights sit on a 4-bit g32 grid (it was distributed as Q4_1: per 32 weights a
scale and a float minimum), which favours this row; it is not lossless because lmpress's asymmetric
grid has an integer zero point where Q4_1 has a float minimum. Group size 128 does not
divide the hidden size 576 and is not run.

{md_table(["setting", "method", "perplexity", "KL", "bits/weight", "disk (MB)", "quantize (s)", "decode tok/s (vs float)"], rows)}

### GPTQ: lmpress vs llm-compressor (same model, calibration tokens, evaluation)

{md_table(["setting", "llm-compressor ppl", "KL", "time (s)", "lmpress ppl / KL / time (s)", "time ratio (lmpress / llm-compressor)"], peer_rows) if peer_rows else "llm-compressor not run yet."}

{size}

{checks}
"""
    print(body)
    write_section("quant", body)


if __name__ == "__main__":
    main()
