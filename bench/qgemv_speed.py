"""Batch-1 decode speed of quantized linear layers on CPU: fp32 / bf16 F.linear vs lmpress qmatmul.

Every linear matrix of the default model (SmolLM2-135M: 30 layers x q, k, v, o, gate, up, down =
210 matrices, plus the 576 -> 49152 lm_head) is multiplied once per "token", in sequence, so the
weights come from DRAM as in real decode. Each format is timed as the min over --repeats passes;
the formats are interleaved inside each pass so that drift hits them alike. The memory-bandwidth
bound is measured in the same run (sum over a large fp32 tensor).

    python bench/qgemv_speed.py                 # the table in the lmpress README
    python bench/qgemv_speed.py --rows 1 2 4 8 16 32   # also: fused kernel vs dequantize + matmul
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lmpress.quant import kernels

sys.path.insert(0, str(Path(__file__).parent))
from common import read_bandwidth  # noqa: E402

HIDDEN, KV, INTER, VOCAB, LAYERS = 576, 192, 1536, 49152, 30
LAYER_SHAPES = [  # (out, in) of q, k, v, o, gate, up, down
    (HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
    (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER),
]  # fmt: skip
HEAD_SHAPE = (VOCAB, HIDDEN)


@dataclass
class Format:
    name: str
    nbytes: int  # bytes of weights (+ scales, zeros) read per token
    layers: Callable[[], object]  # one pass over the 210 layer matrices
    head: Callable[[], object]  # the lm_head


def shapes() -> list[tuple[int, int]]:
    return LAYER_SHAPES * LAYERS


def elapsed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def dense_format(name: str, dtype: torch.dtype) -> Format:
    ws = [torch.randn(o, i).to(dtype) for o, i in shapes()]
    head = torch.randn(*HEAD_SHAPE).to(dtype)
    xs = {k: torch.randn(1, k).to(dtype) for k in (HIDDEN, INTER)}
    nbytes = sum(w.numel() for w in ws + [head]) * head.element_size()
    return Format(
        name,
        nbytes,
        lambda: [F.linear(xs[w.shape[1]], w) for w in ws],
        lambda: F.linear(xs[HIDDEN], head),
    )


def quantized(out: int, cols: int, bits: int, group_size: int):
    """Random packed codes (every byte pattern is valid) with fp16 scales and zeros."""
    packed = torch.randint(0, 256, (out, cols * bits // 8), dtype=torch.uint8)
    s = (torch.rand(out, cols // group_size) * 0.01).half()
    z = (torch.rand(out, cols // group_size) * (2**bits - 1)).half()
    return packed, s, z, bits, group_size, out


def qmatmul_format(bits: int, group_size: int, rows: int = 1) -> Format:
    mats = [quantized(o, i, bits, group_size) for o, i in shapes()]
    head = quantized(*HEAD_SHAPE, bits, group_size)
    xs = {k: torch.randn(rows, k) for k in (HIDDEN, INTER)}
    nbytes = sum(m[0].numel() + 4 * m[1].numel() for m in mats + [head])
    return Format(
        f"lmpress int{bits} g{group_size}",
        nbytes,
        lambda: [kernels.qmatmul(xs[m[0].shape[1] * 8 // bits], *m) for m in mats],
        lambda: kernels.qmatmul(xs[HIDDEN], *head),
    )


def torch_int4_format(group_size: int) -> Format:
    """torch's own CPU int4 kernel (aten._weight_int4pack_mm_for_cpu), for context."""

    def one(out, cols):
        q = torch.randint(0, 16, (out, cols), dtype=torch.int32)
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        return w, torch.rand(cols // group_size, out, 2)

    mats = [one(o, i) for o, i in shapes()]
    head = one(*HEAD_SHAPE)
    xs = {k: torch.randn(1, k) for k in (HIDDEN, INTER)}
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    nbytes = sum(w.numel() + 2 * sz.numel() for w, sz in mats + [head])  # bf16-sized scales
    return Format(
        f"torch int4 g{group_size} (aten)",
        nbytes,
        lambda: [mm(xs[w.shape[1] * 2], w, group_size, sz) for w, sz in mats],
        lambda: mm(xs[HIDDEN], head[0], group_size, head[1]),
    )


def measure(formats: list[Format], repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (seconds for the 210 layer matrices, seconds for the lm_head), min over repeats."""
    for f in formats:  # warm up: first-call costs (compile, page faults) stay out of the table
        f.layers(), f.head()
    best = {f.name: [float("inf"), float("inf")] for f in formats}
    for _ in range(repeats):
        for f in formats:
            best[f.name][0] = min(best[f.name][0], elapsed(f.layers))
            best[f.name][1] = min(best[f.name][1], elapsed(f.head))
    return {k: (v[0], v[1]) for k, v in best.items()}


def table(formats: list[Format], times: dict, bandwidth: float) -> str:
    fp32 = sum(times[formats[0].name])
    lines = [
        f"| format | MB/token | layers ms | lm_head ms | total ms/token | speedup vs fp32 "
        f"| GB/s | % of bandwidth bound ({bandwidth / 1e9:.1f} GB/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in formats:
        layers, head = times[f.name]
        total = layers + head
        lines.append(
            f"| {f.name} | {f.nbytes / 1e6:.1f} | {layers * 1e3:.2f} | {head * 1e3:.2f} "
            f"| {total * 1e3:.2f} | {fp32 / total:.2f}x | {f.nbytes / total / 1e9:.1f} "
            f"| {100 * f.nbytes / bandwidth / total:.0f}% |"
        )
    return "\n".join(lines)


def rows_sweep(rows_list: list[int], group_size: int, repeats: int) -> str:
    """ms for the 210 layer matrices at int4: fused kernel vs dequantize + F.linear vs fp32."""
    ext = kernels._extension()
    mats = [quantized(o, i, 4, group_size) for o, i in shapes()]
    dense = [torch.randn(o, i) for o, i in shapes()]
    lines = [
        "| rows of x | fp32 F.linear ms | int4 fused ms | int4 dequant + F.linear ms |",
        "|---:|---:|---:|---:|",
    ]
    for rows in rows_list:
        xs = {k: torch.randn(rows, k) for k in (HIDDEN, INTER)}
        runs = {
            "fp32": lambda: [F.linear(xs[w.shape[1]], w) for w in dense],
            "fused": lambda: [ext.qgemv(xs[m[0].shape[1] * 2], *m[:5], None) for m in mats],
            "dequant": lambda: [
                F.linear(xs[m[0].shape[1] * 2], ext.dequant(*m[:5], m[0].shape[1] * 2))
                for m in mats
            ],
        }
        if rows > ext.max_rows:
            runs.pop("fused")
        ms = {k: min(elapsed(fn) for _ in range(repeats)) * 1e3 for k, fn in runs.items()}
        fused = f"{ms['fused']:.2f}" if "fused" in ms else "n/a"
        lines.append(f"| {rows} | {ms['fp32']:.2f} | {fused} | {ms['dequant']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8, 3, 2])
    ap.add_argument("--no-torch-int4", action="store_true", help="skip torch's own int4 kernel")
    ap.add_argument("--rows", type=int, nargs="*", default=[], help="also sweep rows of x (int4)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"backend: {kernels.backend_name()}, torch {torch.__version__}, {args.threads} threads")
    formats = [
        dense_format("fp32 F.linear", torch.float32),
        dense_format("bf16 F.linear", torch.bfloat16),
    ]
    formats += [qmatmul_format(b, args.group_size) for b in args.bits]
    if not args.no_torch_int4:
        formats.append(torch_int4_format(args.group_size))
    bandwidth = read_bandwidth(args.repeats)
    times = measure(formats, args.repeats)
    print(f"\nBatch-1 decode, {len(shapes())} layer matrices + lm_head of SmolLM2-135M, "
          f"min of {args.repeats} passes\n")  # fmt: skip
    print(table(formats, times, bandwidth))
    if args.rows:
        print("\nRows of x (210 layer matrices, int4 g%d)\n" % args.group_size)
        print(rows_sweep(args.rows, args.group_size, args.repeats))


if __name__ == "__main__":
    main()
