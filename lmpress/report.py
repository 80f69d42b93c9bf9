"""Plain-text tables of figures for the CLI."""

from __future__ import annotations

FORMATS = {
    "perplexity": ("perplexity", "{:.3f}"),
    "kl": ("KL to original (nats/token)", "{:.5f}"),
    "top1": ("top-1 agreement", "{:.4f}"),
    "params": ("parameters", "{:,}"),
    "params_linear": ("  in block linears", "{:,}"),
    "params_embedding": ("  in embeddings", "{:,}"),
    "linear_bits_per_weight": ("bits per weight (block linears)", "{:.3f}"),
    "disk_bytes": ("size on disk", "{:,} bytes"),
    "tensor_bytes": ("size in memory (tensors)", "{:,} bytes"),
    "peak_rss_bytes": ("peak memory (RSS)", "{:,} bytes"),
    "prefill_tps": ("prefill tokens/s (batch 1)", "{:.1f}"),
    "decode_tps": ("decode tokens/s (batch 1)", "{:.2f}"),
    "mc_acc": ("zero-shot accuracy", "{:.3f}"),
    "mc_acc_norm": ("zero-shot accuracy (length-norm.)", "{:.3f}"),
    "lm_eval_acc": ("lm-eval accuracy", "{:.3f}"),
    "lm_eval_acc_norm": ("lm-eval accuracy (length-norm.)", "{:.3f}"),
    "mc_items": ("zero-shot items", "{:,}"),
    "eval_tokens": ("evaluated tokens", "{:,}"),
    "eval_seconds": ("perplexity wall time", "{:.1f} s"),
    "streamed": ("streamed", "{}"),
}


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    fmt = FORMATS.get(key, (key, "{}"))[1]
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def table(columns: dict[str, dict], keys=None) -> str:
    """A text table: one row per figure, one column per model."""
    keys = keys or [k for k in FORMATS if any(k in c for c in columns.values())]
    names = list(columns)
    rows = [["figure", *names]]
    for k in keys:
        rows.append([FORMATS.get(k, (k,))[0], *(_fmt(k, columns[n].get(k)) for n in names)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
