"""Shared helpers for the benchmark scripts: measuring through :func:`lmpress.evaluate`, saving a
compressed model, the results file of finished rows (resume, ``--only``, the commit of each row),
the environment line and the BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def commit() -> str:
    """The short hash of the checked-out commit ("none" outside a git checkout)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or "none"


def environment() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{datetime.date.today().isoformat()}, commit {commit()}, {cpu}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md, between HTML comment markers."""
    import fcntl

    with open(BENCHMARKS.with_suffix(".lock"), "w") as lock:  # benchmarks running side by side
        fcntl.flock(lock, fcntl.LOCK_EX)
        _replace_section(name, body)


def _replace_section(name: str, body: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# lmpress benchmarks\n\nEvery table below is written by a script in `bench/`; the command, model, data and date are given with it.\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)


def read_bandwidth(repeats: int) -> float:
    """Bytes per second of a multi-threaded sum over 512 MiB (a bound for weight streaming)."""
    import time

    import torch

    big = torch.ones(128 * 2**20)
    big.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - t)
    return big.numel() * 4 / best


def without_bench_on_path() -> None:
    """Drop bench/ from sys.path: a bench script named like a package would shadow it (``gguf.py`` the
    ``gguf`` package that lmpress's GGUF code imports; a ``kernels.py`` once shadowed the ``kernels``
    package that transformers looks for)."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ---- measuring ---------------------------------------------------------------------------------


def measure(model, tokenizer, stream, *, reference=None, model_path=None, speed_kw: dict | None = None, context: int = 512) -> dict:
    """:func:`lmpress.evaluate`'s figures of ``model`` on ``stream`` (KL and top-1 against ``reference``,
    ``disk_bytes`` of ``model_path``), no progress bars. ``speed_kw``: also the batch-1 prefill / decode
    speed, from :func:`lmpress.evaluate.speed` with these arguments (evaluate itself times a 256-token
    prompt, best of 3; several benchmarks document other prompt lengths and repeats); None: no speed."""
    from lmpress.api import evaluate
    from lmpress.evaluate import as_dict, speed

    model.eval()  # a student comes back from training in train mode
    res = evaluate(model, tokenizer, stream=stream, context=context, reference=reference, measure_speed=False,
                   model_path=model_path, progress=False)
    if speed_kw is not None:
        res.update(as_dict(speed(model, **speed_kw)))
    return res


def measure_saved(folder, tokenizer, stream, reference, *, speed_kw: dict | None = None):
    """Load ``folder`` back (what a user gets) and :func:`measure` it: ``(model, figures)``, the figures
    with the ``folder``."""
    from lmpress import load_model

    model, _ = load_model(folder)
    return model, {"folder": str(folder), **measure(model, tokenizer, stream, reference=reference, model_path=folder, speed_kw=speed_kw)}


def save(model, out, tokenizer, recipe: list[dict], format: str = "lmpress") -> Path:
    """Save a compressed model the one way the benchmarks do (replacing ``out``); returns the folder.
    Default: lmpress's own layout, the one the tables' disk sizes were measured in."""
    from lmpress.io import save_model

    return save_model(model, out, tokenizer=tokenizer, format=format, recipe=recipe, overwrite=True)


# ---- the results file ----------------------------------------------------------------------------

MEASURED_BY = "lmpress.evaluate"  # the results files' mark: rows keyed by evaluate's names (perplexity, ...)


class Results:
    """A benchmark's finished rows, kept in the JSON file ``path`` (None: in memory only) so that an
    interrupted run resumes: ``data`` is the whole file, ``rows`` its part under ``key`` (one dict a
    row name). ``fresh`` discards what the file holds; ``only`` (a set of row names, or None for all)
    selects the rows a run may measure; ``on_record()`` runs after every recorded row (a benchmark
    rewrites its section as it goes)."""

    def __init__(self, path, key: str, *, fresh: bool = False, only=None, label: str = "", on_record=None):
        self.path = Path(path) if path else None
        self.data = {} if fresh or not (self.path and self.path.exists()) else json.loads(self.path.read_text())
        if self.data and self.data.get("measured_by") != MEASURED_BY:
            raise SystemExit(f"{self.path} holds rows measured before the benchmarks measured through lmpress.evaluate "
                             "(other keys): run again with --fresh (or without --resume), or move the file away")
        self.data["measured_by"] = MEASURED_BY
        self.key, self.only, self.label, self.on_record = key, only, label, on_record
        self.rows = self.data.setdefault(key, {})

    def save(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def wanted(self, name: str) -> bool:
        """Selected by ``only`` and not measured yet."""
        return (not self.only or name in self.only) and name not in self.rows

    def record(self, name: str, row: dict) -> None:
        """Keep ``row`` under ``name`` with the commit that measured it, save, report."""
        row["commit"] = commit()  # rows cached from earlier invocations say which code measured them
        self.rows[name] = row
        self.save()
        if self.on_record:
            self.on_record()
        print(f"{name}{self.label}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in row.items() if k != "info"), file=sys.stderr, flush=True)


def provenance(rows: dict) -> str:
    """A sentence naming the commit of each group of rows, when a table mixes invocations."""
    by = {}
    for name, x in rows.items():
        by.setdefault(x.get("commit", "unrecorded"), []).append(name)
    if len(by) < 2:
        return ""
    parts = [f"commit {c}: {', '.join(ns)}" for c, ns in by.items()]
    return ("Rows come from more than one invocation of the command (finished rows are cached; a row is re-measured "
            "by deleting it from the cache and running with --only): " + "; ".join(parts) + ".")
