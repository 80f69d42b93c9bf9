"""GGUF: llama.cpp's own quantizer vs lmpress's RTN / GPTQ / AWQ into the same llama.cpp types.

    bash bench/peers/build_llamacpp.sh                    # llama-quantize, llama-imatrix, llama-bench (once)
    pip install 'lmpress[llamacpp]'                       # llama.cpp's logits in Python (see .ci/run)
    python bench/gguf.py                                  # default model, every type and method; rewrites 'gguf'
    python bench/gguf.py --types Q4_0,IQ4_NL --methods llamacpp,llamacpp+imatrix   # add chosen rows
    python bench/gguf.py --model qwen2.5-coder-0.5b --types Q4_0,IQ4_NL,Q4_K_M --calib-samples 32

One row per (model, TYPE, method), each a GGUF file:

- ``llamacpp``: ``llama-quantize F32.gguf out.gguf TYPE`` from an F32 GGUF of the float model written by
  lmpress's ``write_gguf``; TYPE is a llama-quantize file type, each tensor in the type llama.cpp's rule
  gives it (``Q4_K`` = ``Q4_K_M``, ``Q5_K`` = ``Q5_K_M``, ``Q3_K`` = ``Q3_K_M`` are its aliases, so the
  mostly-one-type K files are the ``_S`` ones);
- ``llamacpp+imatrix``: the same with ``--imatrix`` from ``llama-imatrix`` on the calibration text lmpress
  uses (the rows of ``lmpress.prepare``, decoded to text);
- ``rtn`` / ``gptq`` / ``awq``: ``lmpress compress MODEL --method M --format gguf:TYPE`` (the same rule, so the
  same tensor types and file size as llama.cpp's file; the same calibration rows).

Each file is measured twice on the same 4,096 evaluation tokens (context 512, BOS per window): by lmpress's
protocol (``lmpress.load_model(file)``, dequantized to float, ``lmpress.evaluate`` with the float model as
reference) and inside llama.cpp (``lmpress.llamacpp.evaluate_gguf``: llama.cpp's logits on the same windows,
KL to the same float reference). Prefill (256-token prompt) and decode (32 tokens) speed come from
``llama-bench`` (2 threads), rounds interleaved over all files of the model, median of the rounds.
Finished rows are kept in ``--cache`` (JSON), so a rerun measures only the rows it has not seen; ``--redo``
measures named rows again; the section is rewritten from every cached row after each row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import Results, environment, md_table, provenance, write_section  # noqa: E402

# bench/ off the path again: this file would shadow the gguf package, bench/kernels.py transformers' kernels
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]

TYPES = ["Q8_0", "Q6_K", "Q5_0", "Q5_K_S", "Q4_0", "Q4_1", "Q4_K_S", "IQ4_NL", "Q3_K_S", "Q2_K", "Q4_K_M"]
METHODS = ["llamacpp", "llamacpp+imatrix", "rtn", "gptq", "awq", "gptq+scales"]
LABEL = {"llamacpp": "llama.cpp", "llamacpp+imatrix": "llama.cpp + imatrix", "rtn": "lmpress RTN",
         "gptq": "lmpress GPTQ", "awq": "lmpress AWQ", "gptq+scales": "lmpress GPTQ + trained scales"}
# gptq+scales: GPTQ, then the fp16 block scales (codes fixed) trained on the forward KL to the float model over
# the same calibration rows, SCALE_EPOCHS passes, one row per step (lmpress.distill.scales)
SCALE_EPOCHS, SCALE_LR = 2, 1e-3
LINEAR = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")
CONTEXT, EVAL_TOKENS = 512, 4096
THREADS = 2


def tool(name: str) -> str:
    path = Path(os.environ.get("LLAMACPP_DIR", "/work/peers/llama.cpp")) / "bin" / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: run bash bench/peers/build_llamacpp.sh")
    return str(path)


def run(cmd: list[str], what: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-800:]}")
    return res.stdout


def linear_bits(path: Path) -> float:
    """Stored bits per weight of the block linears (codes and scales, block-linear tensors only)."""
    from gguf import GGUFReader

    ts = [t for t in GGUFReader(path).tensors if LINEAR.match(t.name)]
    return 8 * sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts)


class Bench:
    """The float model, its tokens and files of one model, and the rows measured on them."""

    def __init__(self, args):
        from lmpress.data import DataConfig, prepare
        from lmpress.io import load_model

        self.args, self.name = args, args.model
        self.work = Path(args.work) / Path(args.model).name  # a built-in name or a folder's name
        self.work.mkdir(parents=True, exist_ok=True)
        self.fm, self.tok = load_model(args.model)
        self.calib, self.stream = prepare(self.tok, DataConfig(calib_samples=args.calib_samples, eval_tokens=EVAL_TOKENS))
        names = {f"{t}|{m}" for t in args.types for m in args.methods}
        self.results = Results(args.cache, args.model, only=names | {"F32|float"}, on_record=self.write)
        for name in args.redo:
            self.results.rows.pop(name, None)

    # ---- files ---------------------------------------------------------------------------------
    def source(self) -> Path:
        """The F32 GGUF of the float model (lmpress's write_gguf, every tensor F32): llama-quantize's input."""
        from lmpress.formats.gguf import write_gguf

        path = self.work / "F32.gguf"
        if not path.exists():
            write_gguf(self.fm, self.tok, path, "F32", {"source": self.name}, embed_type="F32")
        return path

    def imatrix(self) -> Path:
        """llama-imatrix over the calibration rows lmpress uses, written out as text."""
        path = self.work / f"imatrix-{self.args.calib_samples}.gguf"
        if path.exists():
            return path
        body = self.calib[:, 1:] if self.tok.bos_token_id is not None else self.calib  # (n, L-1): the text tokens
        text = self.work / f"calib-{self.args.calib_samples}.txt"
        text.write_text(self.tok.decode(body.reshape(-1).tolist()))
        run([tool("llama-imatrix"), "-m", str(self.source()), "-f", str(text), "-o", str(path), "-c", str(CONTEXT),
             "-b", str(CONTEXT), "--chunks", str(self.args.calib_samples), "-t", str(THREADS), "--no-ppl"], "llama-imatrix")
        return path

    def make(self, gtype: str, method: str) -> tuple[Path, float]:
        """The GGUF file of one row, and the seconds it took to make."""
        out = self.work / f"{gtype}.{method}.gguf"
        t0 = time.perf_counter()
        if method.startswith("llamacpp"):
            cmd = [tool("llama-quantize")]
            if method == "llamacpp+imatrix":
                cmd += ["--imatrix", str(self.imatrix())]
            run(cmd + [str(self.source()), str(out), gtype, str(THREADS)], "llama-quantize")
        else:
            out.unlink(missing_ok=True)  # a --redo row: made again
            how = ["--recipe", str(self.scales_recipe())] if method == "gptq+scales" else ["--method", method]
            cmd = [sys.executable, "-m", "lmpress.cli", "compress", self.name, *how, "--format",
                   f"gguf:{gtype}", "-o", str(out), "--no-eval", "--calib-samples", str(self.args.calib_samples)]
            run(cmd, f"lmpress compress --method {method} --format gguf:{gtype}")
        return out, time.perf_counter() - t0

    def scales_recipe(self) -> Path:
        """The recipe of the ``gptq+scales`` rows (written beside the files)."""
        path = self.work / "gptq+scales.yaml"
        tokens = SCALE_EPOCHS * self.args.calib_samples * CONTEXT
        path.write_text(f"""- method: gptq
- method: distill
  train: scales
  data: calib
  seq_len: {CONTEXT}
  tokens: {tokens}
  batch_size: 1
  lr: {SCALE_LR}
  warmup: 0.0
  min_lr: 0.0
  grad_clip: 0.0
""")
        return path

    # ---- measuring -----------------------------------------------------------------------------
    def lmpress_protocol(self, path: Path) -> dict:
        from lmpress.api import evaluate
        from lmpress.io import load_model

        m, _ = load_model(path)
        r = evaluate(m, self.tok, stream=self.stream, context=CONTEXT, reference=self.fm, measure_speed=False, progress=False)
        return {k: r[k] for k in ("perplexity", "kl", "top1", "eval_tokens")}

    def llamacpp_protocol(self, path: Path) -> dict:
        from lmpress.llamacpp import evaluate_gguf

        r = evaluate_gguf(path, self.stream, context=CONTEXT, bos=self.tok.bos_token_id, reference=self.fm,
                          measure_speed=False, n_threads=THREADS)
        return {f"cpp_{k}": r[k] for k in ("perplexity", "kl", "top1", "eval_tokens")}

    def measure(self, path: Path, seconds: float, float_row: bool = False) -> dict:
        row = {"file": str(path), "file_bytes": path.stat().st_size, "linear_bits": linear_bits(path), "seconds": seconds}
        if float_row:  # the float model itself by lmpress's protocol (its F32 file holds exactly these weights)
            from lmpress.api import evaluate

            r = evaluate(self.fm, self.tok, stream=self.stream, context=CONTEXT, measure_speed=False, progress=False)
            row.update(perplexity=r["perplexity"], kl=0.0, top1=1.0, eval_tokens=r["eval_tokens"])
        else:
            row.update(self.lmpress_protocol(path))
        row.update(self.llamacpp_protocol(path))
        return row

    def rows(self) -> None:
        if self.results.wanted("F32|float"):
            self.results.record("F32|float", self.measure(self.source(), 0.0, float_row=True))
        for gtype in self.args.types:
            for method in self.args.methods:
                name = f"{gtype}|{method}"
                if not self.results.wanted(name):
                    continue
                try:
                    path, secs = self.make(gtype, method)
                    row = self.measure(path, secs)
                except RuntimeError as e:  # a tool that cannot make this row: say so in the table, go on
                    row = {"error": str(e).splitlines()[0][:200]}
                self.results.record(name, row)

    def speed(self) -> None:
        """llama-bench on every file of this model, ``--rounds`` interleaved rounds; median per file."""
        rows = {n: r for n, r in self.results.rows.items() if "file" in r and Path(r["file"]).exists()}
        runs: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in rows}
        for _ in range(self.args.rounds):
            for n, r in rows.items():
                out = run([tool("llama-bench"), "-m", r["file"], "-p", "256", "-n", "32", "-r", "1", "-t", str(THREADS),
                           "-o", "json"], "llama-bench")
                for test in json.loads(out):
                    runs[n]["prefill" if test["n_gen"] == 0 else "decode"].append(test["avg_ts"])
        self.results.data.setdefault("speed", {})[self.name] = {
            "date": time.strftime("%Y-%m-%d %H:%M"), "rounds": self.args.rounds,
            "rows": {n: {k: statistics.median(v) for k, v in x.items()} for n, x in runs.items()}}
        self.results.save()
        self.write()

    # ---- the section ---------------------------------------------------------------------------
    def write(self) -> None:
        if self.args.no_write:
            return
        data = self.results.data
        runs = data.setdefault("invocations", [])
        this = "python bench/gguf.py " + " ".join(sys.argv[1:])
        if this not in runs:
            runs.append(this)
        self.results.save()
        parts = [HEADER.format(env=environment(), note=self.args.note)]
        for model in data:
            if model in ("measured_by", "speed", "invocations") or not isinstance(data[model], dict):
                continue
            parts.append(model_table(model, data[model], data.get("speed", {}).get(model)))
        parts.append("Invocations: " + "; ".join(f"`{r}`" for r in runs) + ".")
        write_section("gguf", "\n\n".join(parts))


HEADER = """## GGUF: llama.cpp's own quantizer vs lmpress's solvers, in the same llama.cpp types

Commands as run (into one cache, listed below the tables); the full set is `python bench/gguf.py` (default model,
every type, 128 x 512 calibration tokens), then `python bench/gguf.py --model qwen2.5-coder-0.5b --types
Q4_0,IQ4_NL,Q4_K_M --calib-samples 32`; llama.cpp from the vendored source of
`llama-cpp-python==0.3.36` (`bench/peers/build_llamacpp.sh`; the Python engine: `pip install 'lmpress[llamacpp]'`).
Every file starts from the same float weights: llama.cpp's rows quantize an F32 GGUF that lmpress's `write_gguf`
wrote (all tensors F32), with `llama-quantize F32.gguf out.gguf TYPE`: TYPE is a llama-quantize file type and
each tensor gets the type llama.cpp's rule gives it (its aliases Q4_K, Q5_K, Q3_K are the _M mixes, so the
mostly-one-type K files are the _S ones); lmpress's rows (`lmpress compress MODEL --method M --format gguf:TYPE`)
follow the same rule (same tensor types, same file size); `+ imatrix`: `--imatrix` from
`llama-imatrix -c 512` over the calibration text lmpress's methods see (the calibration rows of
`lmpress.prepare`, decoded to one text file; llama-imatrix re-tokenizes it, BOS as the file says).
Evaluation: 4,096 tokens of the built-in corpus's evaluation split, context 512. "lmpress protocol": the file
loaded by `lmpress.load_model` (dequantized to float32), `lmpress.evaluate` against the float model (KL(float ||
file), nats/token). "llama.cpp": the file run in llama.cpp through llama-cpp-python on the same windows (BOS +
511 tokens), the same float model as reference (`lmpress.llamacpp.evaluate_gguf`). bits/w: stored bits per weight
of the block linears; file: the whole GGUF. Speed: `llama-bench -p 256 -n 32 -t 2`, one run per file per round,
rounds interleaved over the model's files, median. Machine: {env}. {note}"""


def _f(v, fmt):
    return "-" if v is None else fmt.format(v)


def model_table(model: str, rows: dict, speed: dict | None) -> str:
    spd = (speed or {}).get("rows", {})
    header = ["TYPE", "quantizer", "bits/w", "file MB", "ppl", "KL", "top-1", "ppl (llama.cpp)", "KL (llama.cpp)",
              "prefill tok/s", "decode tok/s", "made in (s)"]
    order = {t: i for i, t in enumerate(["F32", *TYPES])}
    table, errors = [], []
    for name in sorted(rows, key=lambda n: (order.get(n.split("|")[0], 99), METHODS.index(n.split("|")[1])
                                            if n.split("|")[1] in METHODS else -1)):
        r, (gtype, method) = rows[name], name.split("|")
        if name == "commit" or not isinstance(r, dict):
            continue
        if "error" in r:
            errors.append(f"- {gtype} {LABEL.get(method, method)}: not made ({r['error']})")
            continue
        s = spd.get(name, {})
        table.append([gtype, LABEL.get(method, "float (F32 file)"), f"{r['linear_bits']:.2f}", f"{r['file_bytes'] / 1e6:.1f}",
                      f"{r['perplexity']:.3f}", f"{r['kl']:.4f}", f"{r['top1']:.3f}", f"{r['cpp_perplexity']:.3f}",
                      f"{r['cpp_kl']:.4f}", _f(s.get("prefill"), "{:.0f}"), _f(s.get("decode"), "{:.1f}"),
                      f"{r['seconds']:.0f}"])
    when = f"Speed measured {speed['date']}, {speed['rounds']} rounds." if speed else "Speed not measured yet."
    out = [f"### {model}", "", md_table(header, table), "", when]
    if errors:
        out += ["", *errors]
    checks = kl_checks(rows)
    if checks:
        out += ["", checks]
    prov = provenance({k: v for k, v in rows.items() if isinstance(v, dict)})
    if prov:
        out += ["", prov]
    return "\n".join(out)


def kl_checks(rows: dict) -> str:
    """Per TYPE: the best lmpress file's KL over llama.cpp + imatrix's (the issue's target: at most 0.7)."""
    out = []
    for gtype in TYPES:
        ref = rows.get(f"{gtype}|llamacpp+imatrix")
        ours = {m: rows[f"{gtype}|{m}"] for m in ("rtn", "gptq", "awq", "gptq+scales")
                if "kl" in rows.get(f"{gtype}|{m}", {})}
        if not ref or "kl" not in ref or not ours:
            continue
        best = min(ours, key=lambda m: ours[m]["kl"])
        if ref["kl"] <= 0:  # Q4_1: llama.cpp re-encodes the published Q4_1 weights exactly; no ratio to take
            out.append(f"- {gtype}: llama.cpp + imatrix's KL is 0 (the model was published in this type, so its file holds "
                       f"the published weights exactly); best lmpress ({LABEL[best]}) KL {ours[best]['kl']:.4f}: judge no "
                       "method by this type")
            continue
        plain = rows.get(f"{gtype}|llamacpp", {})
        worse = (f"; llama.cpp without the imatrix is closer to the float model here (KL {plain['kl']:.4f}): "
                 f"{ours[best]['kl'] / plain['kl']:.2f}x that" if 0 < plain.get("kl", 1e9) < ref["kl"] else "")
        out.append(f"- {gtype}: best lmpress ({LABEL[best]}) KL {ours[best]['kl']:.4f} = {ours[best]['kl'] / ref['kl']:.2f}x "
                   f"llama.cpp + imatrix's {ref['kl']:.4f} (target at most 0.70x){worse}; file {ours[best]['file_bytes']:,} "
                   f"vs {ref['file_bytes']:,} bytes")
    return "\n".join(out + four_and_a_half(rows))


def four_and_a_half(rows: dict) -> list[str]:
    """The issue's 4.5-bit targets: the best lmpress file at 4.5 bits per weight of the block linears against
    llama.cpp's best there (at most 0.70x its KL), and that file's size against the float checkpoint (F32
    file; at most 0.18x)."""
    at = {n: r for n, r in rows.items() if isinstance(r, dict) and "kl" in r and abs(r.get("linear_bits", 0) - 4.5) < 0.015}
    cpp = {n: r for n, r in at.items() if n.split("|")[1].startswith("llamacpp")}
    ours = {n: r for n, r in at.items() if n.split("|")[1] in ("rtn", "gptq", "awq", "gptq+scales")}
    if not cpp or not ours:
        return []
    c, o = min(cpp, key=lambda n: cpp[n]["kl"]), min(ours, key=lambda n: ours[n]["kl"])
    label = lambda n: f"{n.split('|')[0]} {LABEL[n.split('|')[1]]}"  # noqa: E731
    lines = [f"- At 4.5 bits per weight: best lmpress ({label(o)}) KL {ours[o]['kl']:.4f} = {ours[o]['kl'] / cpp[c]['kl']:.2f}x "
             f"llama.cpp's best ({label(c)}) {cpp[c]['kl']:.4f} (target at most 0.70x)"]
    f32 = rows.get("F32|float", {}).get("file_bytes")
    if f32:
        lines.append(f"- Its whole file: {ours[o]['file_bytes'] / 1e6:.1f} MB = {ours[o]['file_bytes'] / f32:.3f}x the float "
                     f"checkpoint's F32 file ({f32 / 1e6:.1f} MB; target at most 0.18x)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="built-in name or model folder (default smollm2-135m)")
    ap.add_argument("--types", type=lambda s: s.split(","), default=TYPES, help="comma-separated llama.cpp types")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=METHODS, help=f"comma-separated, of {METHODS}")
    ap.add_argument("--calib-samples", type=int, default=128, help="calibration rows of 512 tokens (imatrix and lmpress)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved llama-bench rounds (0: no speed)")
    ap.add_argument("--redo", type=lambda s: s.split(","), default=[], help="rows 'TYPE|method' to measure again")
    ap.add_argument("--work", default="/work/peers/gguf-bench", help="folder for the GGUF files (kept for speed runs)")
    ap.add_argument("--cache", default="/work/peers/gguf-bench/results.json")
    ap.add_argument("--no-write", action="store_true", help="measure and cache, leave BENCHMARKS.md alone")
    ap.add_argument("--note", default="", help="a sentence about the run's conditions, printed with the table")
    args = ap.parse_args()
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {METHODS}")
    torch.set_num_threads(THREADS)
    bench = Bench(args)
    bench.rows()
    if args.rounds:
        bench.speed()
    bench.write()


if __name__ == "__main__":
    main()
