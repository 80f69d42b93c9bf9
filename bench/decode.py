"""Batch-1 decode (and prefill) speed: lmpress float / W4 g64 / W4 g64 + 8-bit head / W3 g64 / W8,
eager and compiled, against llama.cpp's F32 / Q8_0 / Q4_0 / Q4_K_M files of the same model.

    flock /tmp/lmpress-heavy.lock python bench/decode.py --write
    python bench/decode.py --prompts 256 --rounds 1 --models "W4 g64 + 8-bit head" --no-llamacpp   # sanity

Default model (SmolLM2-135M-Instruct), 2 threads, prompt lengths 64 / 256 / 1024 (random token ids), 32
new tokens (greedy). The lmpress models are RTN (speed does not depend on the solver). Each round times
every lmpress model once per decode path (``lmpress.evaluate.speed``, one repeat; the compiled path
is compiled before the first round, per prompt length) and runs ``llama-bench`` once per GGUF file
(decode: ``-n 32 -d P``, prefill: ``-p P``); rounds are interleaved, the table gives medians.
The GGUF files are made with ``llama-quantize``: F32 from the published Q4_1 file (the weights lmpress's
float model holds), Q8_0 / Q4_0 / Q4_K_M from that F32 file (no importance matrix).

The bandwidth bound of a row is the memory read bandwidth (a 2-thread sum over 512 MiB, measured in
the same run) over the bytes a decode step reads: every linear weight (packed codes, scales, zeros;
the output head; not the token embedding, of which one row is read) plus the KV cache at the mean
context length (float32 in lmpress, float16 in llama.cpp).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, md_table, read_bandwidth, without_bench_on_path, write_section  # noqa: E402

without_bench_on_path()

LLAMACPP = Path(os.environ.get("LLAMACPP_DIR", "/work/peers/llama.cpp"))
MODELS = {  # name -> RTN settings (None: the float model)
    "float": None,
    "W4 g64": dict(bits=4, group_size=64),
    "W4 g64 + 8-bit head": dict(bits=4, group_size=64, head_bits=8),
    "W3 g64": dict(bits=3, group_size=64),
    "W8": dict(bits=8, group_size=-1),
}
GGUF_TYPES = ["F32", "Q8_0", "Q4_0", "Q4_K_M"]


def lmpress_models(names: list[str]) -> dict:
    from lmpress import load_model
    from lmpress.quant.rtn import RTNConfig, rtn_

    base, _ = load_model()
    out = {}
    for name in names:
        model = copy.deepcopy(base)
        if MODELS[name] is not None:
            rtn_(model, RTNConfig(**MODELS[name]))
        out[name] = model.eval()
    return out


def lmpress_bytes(model, positions: int) -> int:
    """Bytes one decode step reads: linear weights (with scales, zeros) and the float32 KV cache."""
    from lmpress.quant.qlinear import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, torch.nn.Linear)):
            total += sum(t.numel() * t.element_size() for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])
    return total + kv_bytes(model.config, positions, 4)


def kv_bytes(cfg, positions: int, element: int) -> int:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * element * positions


# ---- llama.cpp ---------------------------------------------------------------------------------


def gguf_files(folder: Path, types: list[str]) -> dict[str, Path]:
    """The default model as GGUF files of these types, made once with ``llama-quantize``: F32 from the
    published Q4_1 file (``--allow-requantize``: dequantized, the very weights lmpress's float model
    holds, as lmpress loads the same file), the others from that F32 file."""
    from lmpress.assets import fetch_model

    quantize = LLAMACPP / "build" / "bin" / "llama-quantize"
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / "smollm2-135m-F32.gguf"
    out = {}
    for t in ["F32", *[t for t in types if t != "F32"]]:
        path = folder / f"smollm2-135m-{t}.gguf"
        if not path.exists():
            src, extra = (fetch_model(), ["--allow-requantize"]) if t == "F32" else (f32, [])
            subprocess.run([str(quantize), *extra, str(src), str(path.with_suffix(".tmp")), t], check=True,
                           capture_output=True)
            path.with_suffix(".tmp").rename(path)
        if t in types:
            out[t] = path
    return out


def gguf_bytes(path: Path, positions: int) -> int:
    """Bytes one decode step reads from a GGUF model: every tensor but the token embedding (unless it
    is also the output head), plus the float16 KV cache."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    tensors = {t.name: int(t.n_bytes) for t in r.tensors}
    skip = "token_embd.weight" if "output.weight" in tensors else ""
    field = lambda key: int(r.fields[key].parts[-1][0])  # noqa: E731
    arch = "llama"
    layers, heads = field(f"{arch}.block_count"), field(f"{arch}.attention.head_count")
    kv, hidden = field(f"{arch}.attention.head_count_kv"), field(f"{arch}.embedding_length")
    kv_cache = 2 * layers * kv * (hidden // heads) * 2 * positions
    return sum(n for name, n in tensors.items() if name != skip and "norm" not in name) + kv_cache


def llama_bench(path: Path, prompt: int, new: int, threads: int) -> tuple[float, float]:
    """(prefill tokens/s of a ``prompt``-token prompt, decode tokens/s of ``new`` tokens after it)."""
    exe = LLAMACPP / "build" / "bin" / "llama-bench"
    args = [str(exe), "-m", str(path), "-t", str(threads), "-r", "1", "-o", "json"]
    pp = json.loads(subprocess.run([*args, "-p", str(prompt), "-n", "0"], check=True, capture_output=True, text=True).stdout)
    tg = json.loads(subprocess.run([*args, "-p", "0", "-n", str(new), "-d", str(prompt)], check=True,
                                   capture_output=True, text=True).stdout)
    return pp[0]["avg_ts"], tg[0]["avg_ts"]


# ---- the run -----------------------------------------------------------------------------------


def run(args, on_prompt_done) -> dict:
    from lmpress.evaluate import speed

    torch.set_num_threads(args.threads)
    models = lmpress_models(args.models)
    ggufs = {} if args.no_llamacpp else gguf_files(Path(args.gguf_dir), args.gguf)
    load_before = os.getloadavg()
    bandwidth = read_bandwidth(5)
    rows: dict = {}  # (name, path, prompt) -> {"prefill": [...], "decode": [...]}

    def add(key, prefill, decode):
        r = rows.setdefault(key, {"prefill": [], "decode": []})
        r["prefill"].append(prefill)
        r["decode"].append(decode)
        print(*key, f"prefill {prefill:.1f} decode {decode:.2f} tok/s", file=sys.stderr, flush=True)

    for model in models.values():  # first-call costs (the kernel build, page faults) stay out of the rounds
        speed(model, prompt_tokens=8, new_tokens=2, repeats=1)
    t0 = time.time()
    res = {"rows": rows, "bytes": {}, "bandwidth": bandwidth, "load": (load_before, load_before), "seconds": 0.0}
    for prompt in args.prompts:  # one prompt length after the other (a stopped run keeps the finished ones)
        for _ in range(args.rounds):  # rounds interleave the models
            for name, model in models.items():
                for path in args.paths:
                    s = speed(model, prompt_tokens=prompt, new_tokens=args.new_tokens, repeats=1, compiled=path == "compiled")
                    add((f"lmpress {name}", path, prompt), s.prefill_tps, s.decode_tps)
            for t, f in ggufs.items():
                add((f"llama.cpp {t}", "llama-bench", prompt), *llama_bench(f, prompt, args.new_tokens, args.threads))
        positions = prompt + args.new_tokens // 2  # mean context of a decode step
        for name in {k[0] for k in rows if k[2] == prompt}:
            if name.startswith("lmpress"):
                res["bytes"][(name, prompt)] = lmpress_bytes(models[name.removeprefix("lmpress ")], positions)
            else:
                res["bytes"][(name, prompt)] = gguf_bytes(ggufs[name.removeprefix("llama.cpp ")], positions)
        res["load"], res["seconds"] = (load_before, os.getloadavg()), time.time() - t0
        on_prompt_done(res, [p for p in args.prompts if any(k[2] == p for k in rows)])
    return res


def table(res: dict, prompt: int, rounds: int) -> str:
    rows = {k: v for k, v in res["rows"].items() if k[2] == prompt}
    med = {k: (statistics.median(v["prefill"]), statistics.median(v["decode"])) for k, v in rows.items()}
    ref_key = next((k for k in med if k[0] == "llama.cpp Q4_0"), None)
    flt_key = next((k for k in med if k[0] == "lmpress float" and k[1] == "eager"), None)
    header = ["model", "path", "decode tok/s", "vs lmpress float eager", "vs llama.cpp Q4_0", "prefill tok/s",
              "MB read/token", "bandwidth bound tok/s", "% of bound"]
    out = []
    for k, (pp, tg) in med.items():
        mb = res["bytes"][(k[0], prompt)] / 1e6
        bound = res["bandwidth"] / (mb * 1e6)
        ratio = lambda ref: f"{tg / med[ref][1]:.2f}x" if ref else "-"  # noqa: E731
        out.append([k[0], k[1], f"{tg:.1f}", ratio(flt_key), ratio(ref_key), f"{pp:.0f}", f"{mb:.1f}", f"{bound:.0f}",
                    f"{100 * tg / bound:.0f}%"])
    return f"Prompt {prompt} tokens (medians of {rounds} rounds):\n\n" + md_table(header, out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, nargs="+", default=[256, 64, 1024])  # the headline length first
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--paths", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--gguf", nargs="+", default=GGUF_TYPES)
    ap.add_argument("--gguf-dir", default="/tmp/lmpress-decode/gguf")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--json", help="also write the raw figures here")
    ap.add_argument("--write", action="store_true", help="write the 'decode' section of BENCHMARKS.md")
    ap.add_argument("--note", default="", help="a sentence about the run's conditions (what else ran)")
    args = ap.parse_args()

    def report(res, prompts):
        tables = "\n\n".join(table(res, p, args.rounds) for p in sorted(prompts))
        print(tables, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": {" | ".join(map(str, k)): v for k, v in res["rows"].items()},
                                                   "bandwidth": res["bandwidth"], "load": res["load"]}, indent=1))
        if args.write:
            write_section("decode", section(res, args, tables))

    run(args, report)


def section(res: dict, args, tables: str) -> str:
    (l0, l1) = res["load"]
    return (f"## Decode speed: lmpress eager and compiled vs llama.cpp\n\n"
            f"Command: `flock /tmp/lmpress-heavy.lock python bench/decode.py {' '.join(sys.argv[1:])}`. {environment()}; "
            f"kernel {kernel_name()}. Default model (SmolLM2-135M-Instruct), RTN weights, random prompt ids, "
            f"{args.new_tokens} new tokens, batch 1, {args.threads} threads; llama.cpp files from `llama-quantize` (F32 "
            f"from the published Q4_1 file, the others from F32, no imatrix), timed by `llama-bench`. Read bandwidth "
            f"{res['bandwidth'] / 1e9:.1f} GB/s (measured in the run). Load average {l0[0]:.1f} before and {l1[0]:.1f} "
            f"after the run ({res['seconds'] / 60:.0f} min); ratios come from one interleaved run."
            + (f" {args.note}" if args.note else "") + f"\n\n{tables}\n")


def kernel_name() -> str:
    from lmpress.quant import kernels

    return kernels.backend_name()


if __name__ == "__main__":
    main()
