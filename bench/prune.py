"""Pruning benchmark: the default model on the default corpus.

Unstructured and N:M (magnitude, Wanda, SparseGPT at 50% and 2:4), width pruning to 75% and 50% of
the non-embedding parameters (heads + MLP, and heads + MLP + hidden channels), depth pruning of 6
of 30 blocks with each importance measure, and llm-compressor's Wanda and SparseGPT at 50% and 2:4
on the same calibration tokens, side by side; and Wanda at 60% with uniform, OWL and sensitivity
allocation of the sparsity over the blocks. Every pruned model is saved (sparse layers as
``SparseLinear`` via ``io.save_model(format="lmpress")``; structured ones with plain ``save_pretrained``),
loaded back, and the loaded model is measured: perplexity at context 512, KL and top-1 agreement
against the original, parameters, size on disk, batch-1 decode tokens/s, and the pruning wall time.

    flock /tmp/lmpress-heavy.lock python bench/prune.py [--calib-samples 128] [--only wanda-0.5,...]

Results are cached per row in ``--cache`` (default /tmp/lmpress-bench-prune/results.json, keyed by
calibration size), so an interrupted run resumes; ``--fresh`` discards them. The peer runs with
``/work/peers/llmc/bin/python`` (``bench/peers/setup_llmcompressor.sh`` installs it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Results, environment, md_table, measure_saved, provenance, save, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LLMC_PY = Path("/work/peers/llmc/bin/python")

UNSTRUCTURED = [  # row name, method, options
    ("magnitude-0.5", "magnitude", {"sparsity": 0.5}),
    ("wanda-0.5", "wanda", {"sparsity": 0.5}),
    ("wanda-0.5-fp32", "wanda", {"sparsity": 0.5, "calib_dtype": "float32"}),  # full-precision calibration forwards
    ("sparsegpt-0.5", "sparsegpt", {"sparsity": 0.5}),
    ("magnitude-2:4", "magnitude", {"pattern": "2:4"}),
    ("wanda-2:4", "wanda", {"pattern": "2:4"}),
    ("sparsegpt-2:4", "sparsegpt", {"pattern": "2:4"}),
    ("sparsegpt-0.5+w4g64", "sparsegpt", {"sparsity": 0.5, "bits": 4, "group_size": 64}),  # joint prune + quantize
    ("wanda-0.6", "wanda", {"sparsity": 0.6}),  # per-block allocation: uniform vs OWL vs sensitivity
    ("wanda-0.6-owl", "wanda", {"sparsity": 0.6, "allocation": "owl"}),
    ("wanda-0.6-sensitivity", "wanda", {"sparsity": 0.6, "allocation": "sensitivity"}),
]
ALLOCATION_ROWS = ("wanda-0.6", "wanda-0.6-owl", "wanda-0.6-sensitivity")
WIDTH = [("width-0.75", {"target_params": 0.75}), ("width-0.5", {"target_params": 0.5}),
         ("width-0.75-hidden", {"target_params": 0.75, "hidden": 0.875}), ("width-0.5-hidden", {"target_params": 0.5, "hidden": 0.875})]
DEPTH = [("depth-6-cosine", "cosine"), ("depth-6-activation", "activation"), ("depth-6-perplexity", "perplexity")]
PEERS = ["wanda-0.5", "sparsegpt-0.5", "wanda-2:4", "sparsegpt-2:4"]


class Bench:
    """The default model, its calibration and evaluation tokens, and the rows (a :class:`Results`
    file keyed by the calibration draw)."""

    def __init__(self, args):
        from lmpress import load_model
        from lmpress.data import DataConfig, prepare
        from lmpress.io import resolve_model_path

        self.args = args
        self.model_dir = resolve_model_path(None)
        self.base, self.tok = load_model()
        self.seed = args.calib_seed
        self.data = DataConfig(calib_samples=args.calib_samples, seed=self.seed)
        self.calib, self.stream = prepare(self.tok, self.data)
        cache_file = Path(args.cache)
        # saved models, kept for the speed pass
        self.tmp = cache_file.parent / ("models" if self.seed == 0 else f"models-seed{self.seed}")
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.base_key = f"calib{tuple(self.calib.shape)}"  # the main tables: calibration draw (seed) 0
        self.key = self.base_key + (f" seed={self.seed}" if self.seed else "")
        rewrite = None if args.no_write else (lambda: write_section("prune", report(self)))  # a long run reports as it goes
        self.results = Results(cache_file, self.key, fresh=args.fresh, only=args.only, label=f" (calibration draw {self.seed})",
                               on_record=rewrite)
        self.cache, self.rows = self.results.data, self.results.rows
        self.wanted, self.record = self.results.wanted, self.results.record
        self.shared: dict = {}

    def measure(self, folder: Path, decode: bool = True, **extra) -> dict:
        """The saved model measured after a round trip; decode speed (best of 3) only when ``decode``
        (other calibration draws: quality and time only)."""
        model, row = measure_saved(folder, self.tok, self.stream, self.base, speed_kw={"repeats": 3} if decode else None)
        nonzero = sum(int((p != 0).sum()) for p in _weights(model))
        return {**row, "loadavg_1min": os.getloadavg()[0], "nonzero_params": nonzero, **extra}

    # ---- rows ------------------------------------------------------------------------------------
    def original(self):
        if self.wanted("original"):
            self.record("original", self.measure(self.model_dir, prune_seconds=0.0))

    def unstructured(self, names):
        from lmpress import recipe as rc

        for name, method, kw in UNSTRUCTURED:
            if name not in names or not self.wanted(name):
                continue
            model = copy.deepcopy(self.base)
            cfg = rc.make_config(method, **kw)
            t0 = time.perf_counter()
            info = rc.apply(model, cfg, rc.RunContext(calib=self.calib, progress=True))  # with store_sparse_
            seconds = time.perf_counter() - t0
            out = save(model, self.tmp / name, self.tok, [rc.to_dict(cfg)])
            del model
            self.record(name, self.measure(out, decode=self.seed == 0, prune_seconds=seconds, sparsity=info["sparsity"],
                                           min_layer_sparsity=min(info["sparsity_per_layer"].values()),
                                           layers_dampening_raised=len(info.get("dampening_raised", {}))))

    def width(self):
        from lmpress import recipe as rc
        from lmpress.io import save_model
        from lmpress.prune import structured as st

        todo = [(n, kw) for n, kw in WIDTH if self.wanted(n)]
        if not todo:
            return
        t0 = time.perf_counter()  # importance once (with hidden-channel scores), shared by the four rows
        imp = st.width_importance(self.base, self.calib, rc.make_config("prune-width", hidden=True), True)
        imp_seconds = time.perf_counter() - t0
        for name, kw in todo:
            model = copy.deepcopy(self.base)
            cfg = rc.make_config("prune-width", **kw)
            t0 = time.perf_counter()
            info = st.prune_width_with(model, cfg, imp, self.calib[: cfg.search_samples])
            seconds = imp_seconds + time.perf_counter() - t0
            out = save_model(model, self.tmp / name, tokenizer=self.tok, overwrite=True)
            del model
            self.record(name, self.measure(out, prune_seconds=seconds, importance_seconds=imp_seconds, shape=info["shape"],
                                           params_non_embedding=info["params_after"], plain_transformers=_loads_plain(out)))

    def depth(self):
        from lmpress import recipe as rc
        from lmpress.io import save_model
        from lmpress.prune import structured as st

        for name, importance in DEPTH:
            if not self.wanted(name):
                continue
            cfg = rc.make_config("prune-depth", drop_layers=6, importance=importance)
            t0 = time.perf_counter()
            if importance == "perplexity":
                scores = st.perplexity_importance(self.base, self.calib, cfg, True)
            else:  # one pipeline pass gives both activation measures: shared by the two rows
                if "depth" not in self.shared:
                    self.shared["depth"] = (st.activation_importance(self.base, self.calib, cfg, True), time.perf_counter() - t0)
                scores = self.shared["depth"][0][importance]
            drop = sorted(torch.topk(scores, 6, largest=False).indices.tolist())
            model = copy.deepcopy(self.base)
            st.drop_blocks_(model, drop)
            seconds = time.perf_counter() - t0 + (self.shared["depth"][1] if importance != "perplexity" else 0)
            out = save_model(model, self.tmp / name, tokenizer=self.tok, overwrite=True)
            params = st.non_embedding_params(model)
            del model
            self.record(name, self.measure(out, prune_seconds=seconds, dropped=drop, params_non_embedding=params,
                                           plain_transformers=_loads_plain(out)))

    def peers(self, schemes):
        import numpy as np

        from lmpress import load_model
        from lmpress.prune.sparse import sparsify_

        if not LLMC_PY.exists():
            raise SystemExit(f"{LLMC_PY} missing: run bash bench/peers/setup_llmcompressor.sh (or pass --skip-peers)")
        if not any(self.wanted(f"llmc-{s}") for s in schemes):
            return
        calib_file = self.tmp / "calib.npy"
        np.save(calib_file, self.calib.numpy().astype(np.int64))
        for scheme in schemes:
            name = f"llmc-{scheme}"
            if not self.wanted(name):
                continue
            dense = self.tmp / f"{name}-dense"
            shutil.rmtree(dense, ignore_errors=True)
            cmd = [str(LLMC_PY), str(ROOT / "bench/peers/llmc_oneshot.py"), "--model", str(self.model_dir), "--calib", str(calib_file),
                   "--out", str(dense), "--scheme", scheme]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
            peer = json.loads(res.stdout.strip().splitlines()[-1])
            model, _ = load_model(dense)  # stored in lmpress's sparse format, like ours, for the size column
            lin = _weights(model)
            sparsity = sum(int((w == 0).sum()) for w in lin) / sum(w.numel() for w in lin)
            sparsify_(model, pattern=scheme.split("-")[1] if ":" in scheme else None)
            out = save(model, self.tmp / name, self.tok, [{"method": "llm-compressor", "scheme": scheme}])
            del model
            self.record(name, self.measure(out, decode=self.seed == 0, prune_seconds=peer["oneshot_seconds"], sparsity=sparsity))


    def speed_pass(self, rounds: int = 5, compiled: bool = False):
        """Decode speed of the original and the structured models, interleaved round by round, so that
        load from other processes hits every model alike: the best tok/s of each model over the rounds,
        and its speed-up as the median over rounds of (its tok/s / the original's tok/s in that round).
        ``compiled``: the original and the width rows only, on transformers' fast decode path (static KV
        cache, decode step through torch.compile; each model compiled once, untimed); keys end in _compiled."""
        import statistics

        from lmpress import load_model
        from lmpress.evaluate import speed

        sfx = "_compiled" if compiled else ""
        names = ["original"] + [n for n, _ in (WIDTH if compiled else WIDTH + DEPTH) if n in self.rows]
        if len(names) == 1 or (not self.args.redo_speed and all(f"speedup_median{sfx}" in self.rows[n] for n in names)):
            return
        folder = {n: self.model_dir if n == "original" else self.rows[n].get("folder") or _find_folder(n) for n in names}
        models = {n: load_model(folder[n])[0] for n in names}
        tps = {n: [] for n in names}
        for _ in range(rounds):
            for n, m in models.items():
                tps[n].append(speed(m, repeats=2, compiled=compiled).decode_tps)
        for n in names:
            ratios = [a / b for a, b in zip(tps[n], tps["original"])]
            self.rows[n].update({f"decode_tps{sfx or '_interleaved'}": max(tps[n]), f"speedup_rounds{sfx}": ratios,
                                 f"speedup_median{sfx}": statistics.median(ratios)})
        self.rows["original"][f"speed_rounds{sfx}"] = rounds
        self.results.save()
        if not self.args.no_write:
            write_section("prune", report(self))
        print(f"interleaved{' compiled' if compiled else ''} decode tok/s (best) and median speed-up: "
              + ", ".join(f"{n} {max(tps[n]):.1f} {self.rows[n][f'speedup_median{sfx}']:.3f}x" for n in names), file=sys.stderr)


def _find_folder(name: str) -> Path:
    """A row's saved model from a run before folders were recorded (temporary folders)."""
    found = sorted(Path("/tmp").glob(f"lmpress-bench-prune-*/{name}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no saved model for {name}: rerun that row (--only {name} after removing it from the cache)")
    return found[-1]


def _weights(model):
    from lmpress import arch

    return [m.weight for m in arch.compressible_linears(model).values()]


def _loads_plain(folder: Path) -> bool:
    """Does plain transformers (no lmpress code) load the folder and run it?"""
    code = ("import sys, torch; from transformers import AutoModelForCausalLM as A; "
            "m = A.from_pretrained(sys.argv[1], dtype=torch.float32); m(torch.tensor([[1, 2, 3]]))")
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True).returncode == 0


# ---- report ------------------------------------------------------------------------------------


def _dec(row) -> float:
    """Decode tokens/s: the interleaved speed pass when it ran, else the row's own measurement."""
    return row.get("decode_tps_interleaved", row["decode_tps"])


def _speedup(row, base) -> float:
    """Decode speed-up over the original: the median of the per-round ratios of the interleaved pass
    when it ran, else the ratio of the two rows' own measurements."""
    return row.get("speedup_median", _dec(row) / _dec(base))


def _speedup_cell(row, base) -> str:
    """The speed-up, with the range of the per-round ratios when the interleaved pass ran."""
    rounds = row.get("speedup_rounds")
    spread = f" ({min(rounds):.2f}-{max(rounds):.2f})" if rounds else ""
    return f"{_speedup(row, base):.2f}x{spread}"


def _compiled_cell(row) -> str:
    """The compiled-decode speed-up (median, range of rounds), or a dash when not measured."""
    rounds = row.get("speedup_rounds_compiled")
    return f"{row['speedup_median_compiled']:.2f}x ({min(rounds):.2f}-{max(rounds):.2f})" if rounds else "-"


def _mb(b):
    return f"{b / 1e6:.0f}"


def draws(bench: Bench) -> dict[int, dict]:
    """``{seed: rows}`` for every calibration draw in the cache at this calibration size (0 = the main tables)."""
    out = {}
    for key, rows in bench.cache.items():
        if key == bench.base_key:
            out[0] = rows
        elif key.startswith(bench.base_key + " seed="):
            out[int(key.split("seed=")[1])] = rows
    return dict(sorted(out.items()))


def peer_draws(bench: Bench, name: str, scheme: str | None = None) -> list[tuple[int, dict, dict]]:
    """(seed, lmpress row ``name``, llm-compressor row of ``scheme`` (default: name)) for each draw where
    both were measured."""
    peer = f"llmc-{scheme or name}"
    return [(seed, rows[name], rows[peer]) for seed, rows in draws(bench).items() if name in rows and peer in rows]


def _mean(rows: list[dict], key: str) -> float:
    return sum(x[key] for x in rows) / len(rows)


def draws_report(bench: Bench) -> str:
    """lmpress vs llm-compressor on every calibration draw measured, and the means."""
    head = ["setting", "calibration draw", "lmpress ppl", "llm-compressor ppl", "lmpress - llm-compressor", "lmpress s", "llm-compressor s"]
    table = []
    for s in PEERS + ["wanda-0.5-fp32"]:
        got = peer_draws(bench, s, "wanda-0.5" if s == "wanda-0.5-fp32" else s)
        if len(got) < 2:
            continue
        for seed, a, b in got:
            table.append([s, seed, f"{a['perplexity']:.3f}", f"{b['perplexity']:.3f}", f"{a['perplexity'] - b['perplexity']:+.3f}", f"{a['prune_seconds']:.0f}",
                          f"{b['prune_seconds']:.0f}"])
        A, B = [a for _, a, _ in got], [b for _, _, b in got]
        table.append([f"**{s}**", f"mean of {len(got)}", f"{_mean(A, 'perplexity'):.3f}", f"{_mean(B, 'perplexity'):.3f}",
                      f"{_mean(A, 'perplexity') - _mean(B, 'perplexity'):+.3f}", f"{_mean(A, 'prune_seconds'):.0f}", f"{_mean(B, 'prune_seconds'):.0f}"])
    if not table:
        return ""
    n, L = bench.calib.shape
    return f"""### lmpress vs llm-compressor over several calibration draws

The same comparison with other sets of {n} x {L} calibration tokens (`--calib-seed N` shuffles the calibration
documents with seed N; draw 0 is the tables above); the evaluation tokens do not change. Wanda and SparseGPT are the
same algorithms in both tools, so a single draw's difference is mostly which near-tied weights floating-point noise
puts on either side of the cut; the mean over draws is the fairer comparison. {_draw_provenance(bench)}
Command per draw: `flock /tmp/lmpress-heavy.lock python bench/prune.py --calib-samples {n} --calib-seed N`.

{md_table(head, table)}
"""


def _draw_provenance(bench: Bench) -> str:
    by = {}
    for seed, rows in draws(bench).items():
        for name, x in rows.items():
            if seed:
                by.setdefault(x.get("commit", "unrecorded"), []).append(f"{name}@{seed}")
    return "Draws 1+ by commit: " + "; ".join(f"{c}: {', '.join(ns)}" for c, ns in by.items()) + "." if by else ""


def report(bench: Bench) -> str:
    r = bench.cache[bench.base_key]
    base = r["original"]
    speed0 = base["decode_tps"]

    def row(name, label):
        x = r[name]
        return [label, f"{x['perplexity']:.2f}", f"{x['perplexity'] - base['perplexity']:+.2f}", f"{x['kl']:.3f}", f"{x['top1']:.3f}",
                f"{x['nonzero_params'] / 1e6:.1f}M", _mb(x["disk_bytes"]), f"{x['decode_tps']:.1f}",
                f"{x['decode_tps'] / speed0:.2f}x", f"{x['prune_seconds']:.0f}"]

    head = ["model", "perplexity", "Δ ppl", "KL", "top-1", "nonzero block-linear weights", "disk MB", "decode tok/s",
            "vs original", "pruning s"]
    t1 = [row("original", "original (fp32)")]
    for name, _, _ in UNSTRUCTURED:
        if name in r:
            t1.append(row(name, f"lmpress {name}"))
        if f"llmc-{name}" in r:
            t1.append(row(f"llmc-{name}", f"llm-compressor {name}"))
    head2 = ["model", "perplexity", "Δ ppl", "KL", "top-1", "params", "non-embedding params", "shape / dropped", "disk MB",
             "decode tok/s", "vs original", "vs original, compiled decode", "pruning s", "plain transformers loads"]
    t2 = []
    for name in [n for n, _ in WIDTH] + [n for n, _ in DEPTH]:
        if name not in r:
            continue
        x = r[name]
        what = (f"kv groups {x['shape']['groups']}/3, MLP {x['shape']['intermediate']}, hidden {x['shape']['hidden']}"
                if "shape" in x else f"blocks {x['dropped']}")
        t2.append([name, f"{x['perplexity']:.2f}", f"{x['perplexity'] - base['perplexity']:+.2f}", f"{x['kl']:.3f}", f"{x['top1']:.3f}",
                   f"{x['params'] / 1e6:.1f}M", f"{x['params_non_embedding'] / 1e6:.1f}M", what, _mb(x["disk_bytes"]),
                   f"{_dec(x):.1f}", _speedup_cell(x, base), _compiled_cell(x), f"{x['prune_seconds']:.0f}",
                   "yes" if x["plain_transformers"] else "NO"])
    n, L = bench.calib.shape
    return f"""## Pruning: magnitude, Wanda, SparseGPT, width and depth (default model, default corpus)

Command: `flock /tmp/lmpress-heavy.lock python bench/prune.py --calib-samples {n}`. Model: SmolLM2-135M-Instruct
(fp32, {base['params'] / 1e6:.1f}M parameters, {(base['params'] - base['params_embedding']) / 1e6:.1f}M non-embedding). Calibration: {n} x {L} tokens of the built-in
Wikipedia corpus (the same token rows for lmpress and llm-compressor, which gets them as a `datasets.Dataset`).
Evaluation: {bench.stream.numel():,} held-out tokens, context 512; KL(original ‖ pruned) and top-1 agreement per token.
Every pruned model was saved, loaded back and measured after the round trip. Unstructured / N:M models are
stored as `SparseLinear` (bitmask or 2:4 indices + fp32 values; llm-compressor's dense outputs are stored the
same way for the size column); their decode runs densified, so it is not faster. Decode: batch 1, 256-token
prompt, 32 new tokens, best of 3 (unstructured table); for the structured table the original and every structured
model were re-measured in a final interleaved pass ({base.get('speed_rounds', 5)} rounds, best of 2 decodes per model per round): the tok/s
column is each model's best round, "vs original" the median over rounds of its tok/s over the original's in the
same round (in brackets: the lowest and highest round), so that load from other processes on the shared 2-core
machine hits all of them alike; same-size models differing by a few percent are within the noise. "compiled decode":
the original and the width models again, interleaved ({base.get('speed_rounds_compiled', '-')} rounds, `--compiled-decode`), decoding with
transformers' fast path (a static KV cache and the decode step through `torch.compile`, compiled before timing), which
removes most of the per-token work outside the matrix products. Pruning wall time: the method call
only (model loading excluded), for llm-compressor its `oneshot` call. lmpress's Wanda and SparseGPT run with
their defaults (calibration forwards in bfloat16, SparseGPT's Hessian products in float32; all linears of a block pruned from the same block inputs, as in llm-compressor; `wanda-0.5-fp32` is Wanda with float32 forwards); llm-compressor with
its defaults (float32). `sparsegpt-0.5+w4g64` is SparseGPT's joint mode: 50% sparse and the kept weights on a
4-bit asymmetric g64 grid in the same sweep, stored as a packed 4-bit layer (zeros included). Width rows share one importance pass
(included in each row's time), the cosine and activation depth rows share one pipeline pass (likewise). The
`-hidden` rows keep 87.5% of the hidden channels (`hidden: 0.875`; the embedding and tied head shrink with them) and
cut heads and MLP channels to the same 75% / 50% of the non-embedding parameters.
Machine: {environment()}. {provenance(r)}

### Unstructured and 2:4 sparsity of all block linears (50%; and 60% with each per-block allocation)

The `wanda-0.6*` rows allocate the 60% mean sparsity per block: uniformly, by OWL's outlier ratios
(lambda 0.08, M 5), or by sensitivity (each block Wanda-pruned alone, its output error relative to its own
update; same lambda); the allocation pass is included in the pruning time.

{md_table(head, t1)}

### Structured: width (Minitron activation importance) and depth (6 of 30 blocks)

{md_table(head2, t2)}

{draws_report(bench)}
{targets(bench)}
"""


def targets(bench: Bench) -> str:
    r = bench.cache[bench.base_key]
    base = r["original"]["perplexity"]
    lines = ["### The issue's figures", ""]
    every = ["original"] + [n for n, _, _ in UNSTRUCTURED] + [f"llmc-{p}" for p in PEERS] + [n for n, _ in WIDTH] + [n for n, _ in DEPTH]
    missing = [n for n in every if n not in r]
    if missing:
        lines += [f"Rows not measured yet (the run was cut short; rerun the command, finished rows are cached): {', '.join(missing)}.", ""]
    loads = [x["loadavg_1min"] for x in r.values() if "loadavg_1min" in x]
    if loads and max(loads) > 2.5:
        lines += [f"Machine load (1-minute load average on 2 cores) during the measurements: {min(loads):.1f} to {max(loads):.1f}: "
                  "other processes shared the cores, so wall times and speeds are inflated and noisy.", ""]

    def inc(name):
        return r[name]["perplexity"] - base

    if all(f"{m}-0.5" in r for m in ("magnitude", "wanda", "sparsegpt")):
        for m in ("wanda", "sparsegpt"):
            ok = inc(f"{m}-0.5") <= inc("magnitude-0.5") / 2
            lines.append(f"- {m} 50%: perplexity increase {inc(f'{m}-0.5'):+.2f} vs magnitude's {inc('magnitude-0.5'):+.2f} "
                         f"(at most half: {'met' if ok else 'NOT met'}).")
    if "width-0.75" in r:
        for name in ("width-0.75", "width-0.75-hidden"):
            if name in r:
                x = r[name]
                ratio = _speedup(x, r["original"])
                ok = ratio >= 1.2 and x["plain_transformers"]
                lines.append(f"- {name}: loads in plain transformers: {'yes' if x['plain_transformers'] else 'no'}; decode "
                             f"{_speedup_cell(x, r['original'])} the original (median of the interleaved rounds; >= 1.2x: {'met' if ok else 'NOT met'}).")
                if "speedup_median_compiled" in x:
                    okc = x["speedup_median_compiled"] >= 1.2 and x["plain_transformers"]
                    lines.append(f"  With the compiled decode path: {_compiled_cell(x)} (>= 1.2x: {'met' if okc else 'NOT met'}).")
    for s in PEERS:
        got = peer_draws(bench, s)
        if not got or got[0][0] != 0:
            continue
        A, B = [a for _, a, _ in got], [b for _, _, b in got]
        a, b, t_a, t_b = _mean(A, "perplexity"), _mean(B, "perplexity"), _mean(A, "prune_seconds"), _mean(B, "prune_seconds")
        ok_p, ok_t = a <= b, t_a <= t_b
        over = f"mean of {len(got)} calibration draws" if len(got) > 1 else "one calibration draw"
        lines.append(f"- {s} ({over}): perplexity {a:.3f} vs llm-compressor {b:.3f} ({'met' if ok_p else 'NOT met'}); "
                     f"time {t_a:.0f} s vs {t_b:.0f} s ({'met' if ok_t else 'NOT met'}).")
    if all(n in r for n in ALLOCATION_ROWS):
        u, o, se = (r[n]["perplexity"] for n in ALLOCATION_ROWS)
        lines.append(f"- Per-block allocation at 60% (informational, no target): perplexity uniform {u:.2f}, OWL {o:.2f}, "
                     f"sensitivity {se:.2f}.")
    if "wanda-0.5" in r:
        s = r["wanda-0.5"]["prune_seconds"]
        n, L = bench.calib.shape
        lines.append(f"- Wanda 50% pruning pass ({n} x {L} calibration tokens): {s:.0f} s (under 5 minutes: {'met' if s < 300 else 'NOT met'}).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="pruning benchmark")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--only", type=lambda s: set(s.split(",")), default=None, help="comma-separated row names")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    ap.add_argument("--cache", default="/tmp/lmpress-bench-prune/results.json")
    ap.add_argument("--speed-rounds", type=int, default=5, help="rounds of the interleaved decode pass")
    ap.add_argument("--compiled-decode", action="store_true", help="also an interleaved pass with the compiled decode path (width rows)")
    ap.add_argument("--redo-speed", action="store_true", help="rerun the interleaved decode pass even if cached")
    ap.add_argument("--calib-seed", type=int, default=0,
                    help="another calibration draw: only the rows compared with llm-compressor, for the draws table")
    args = ap.parse_args()
    torch.set_num_threads(2)
    bench = Bench(args)
    if bench.seed:
        bench.unstructured(PEERS + ["wanda-0.5-fp32"])
        if not args.skip_peers:
            bench.peers(PEERS)
        if not args.no_write:
            write_section("prune", report(bench))
        return
    bench.original()
    bench.unstructured(("magnitude-0.5", "wanda-0.5", "wanda-0.5-fp32", "sparsegpt-0.5"))
    if not args.skip_peers:
        bench.peers(("wanda-0.5", "sparsegpt-0.5"))
    bench.width()
    bench.depth()
    bench.speed_pass(args.speed_rounds)
    if args.compiled_decode:
        bench.speed_pass(args.speed_rounds, compiled=True)
    bench.unstructured(("magnitude-2:4", "wanda-2:4", "sparsegpt-2:4"))
    if not args.skip_peers:
        bench.peers(("wanda-2:4", "sparsegpt-2:4"))
    bench.unstructured(("sparsegpt-0.5+w4g64",))
    bench.unstructured(ALLOCATION_ROWS)
    body = report(bench)
    if not args.no_write:
        write_section("prune", body)
    print(body)


if __name__ == "__main__":
    main()
