"""OUT of a plan: the model, the recipe that replays it, report.md / report.html with plain SVG
pictures (no plotting dependency), plan.json. Every extra file is written atomically."""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

COLORS = {"float": "#2b2b2b", 8: "#1a9850", 4: "#91cf60", 3: "#fee08b", 2: "#d73027"}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plain(x):
    """Tuples to lists, recursively, for YAML."""
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def recipe_yaml(recipe) -> str:
    import yaml

    from .. import recipe as rc

    return yaml.safe_dump([_plain(rc.to_dict(c)) for c in recipe], sort_keys=False, width=200)


def write_outputs(model, tokenizer, res: dict, recipe, out, *, data, format: str, overwrite: bool) -> Path:
    from ..io import _atomic_folder, check_output, save_model

    if format.partition(":")[0] == "gguf":  # OUT holds model.gguf beside the report
        saved = _atomic_folder(check_output(out, overwrite=overwrite), lambda tmp: save_model(
            model, tmp / "model.gguf", tokenizer=tokenizer, format=format, recipe=recipe, data=data))
        replay = f"--format {format} -o REPLAY.gguf"
    else:
        saved = save_model(model, out, tokenizer=tokenizer, format=format, recipe=recipe, data=data, overwrite=overwrite)
        replay = "-o REPLAY"
    res["replay"] = (f"lmpress compress {res.get('model_spec') or '<MODEL>'} --recipe {saved}/recipe.yaml "
                     f"--calib-samples {data.calib_samples} --calib-len {data.calib_len} {replay}")
    _atomic_write(saved / "recipe.yaml", recipe_yaml(recipe))
    _atomic_write(saved / "plan.json", json.dumps(res, indent=1, default=str))
    md, figs = markdown(res), figures(res)
    for name, svg in figs.items():
        _atomic_write(saved / f"{name}.svg", svg)
    _atomic_write(saved / "report.md", md)
    _atomic_write(saved / "report.html", page(res, figs))
    return saved


# ---- SVG -----------------------------------------------------------------------------------------


def _scale(lo, hi, a, b, log=False):
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    span = (hi - lo) or 1.0
    return lambda v: a + (b - a) * (((math.log10(v) if log else v) - lo) / span)


def scatter(series: list[dict], xlabel: str, ylabel: str, w: int = 640, h: int = 420) -> str:
    """A scatter/line plot: ``series`` of {label, points [(x, y)], color, line, size}; y on a log axis."""
    pts = [p for s in series for p in s["points"] if p[1] > 0]
    if not pts:
        return "<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>"
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    fx = _scale(min(xs), max(xs), 70, w - 170)
    fy = _scale(min(ys) / 1.3, max(ys) * 1.3, h - 50, 20, log=True)
    o = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='11'>",
         f"<rect x='70' y='20' width='{w - 240}' height='{h - 70}' fill='none' stroke='#999'/>"]
    for k in range(5):
        xv = min(xs) + (max(xs) - min(xs)) * k / 4
        o.append(f"<text x='{fx(xv):.1f}' y='{h - 32}' text-anchor='middle'>{xv:.3g}</text>")
    e = math.floor(math.log10(min(ys) / 1.3))
    while 10**e <= max(ys) * 1.3:
        if 10**e >= min(ys) / 1.3:
            o.append(f"<text x='64' y='{fy(10**e) + 4:.1f}' text-anchor='end'>1e{e}</text>"
                     f"<line x1='70' x2='{w - 170}' y1='{fy(10**e):.1f}' y2='{fy(10**e):.1f}' stroke='#eee'/>")
        e += 1
    o.append(f"<text x='{(70 + w - 170) / 2}' y='{h - 12}' text-anchor='middle'>{html.escape(xlabel)}</text>")
    o.append(f"<text x='14' y='{h / 2}' transform='rotate(-90 14 {h / 2})' text-anchor='middle'>{html.escape(ylabel)}</text>")
    for i, s in enumerate(series):
        p = [(fx(x), fy(y)) for x, y in s["points"] if y > 0]
        if s.get("line") and len(p) > 1:
            o.append(f"<polyline fill='none' stroke='{s['color']}' stroke-width='1.5' points='"
                     + " ".join(f"{a:.1f},{b:.1f}" for a, b in p) + "'/>")
        for (a, b), (x, _) in zip(p, [q for q in s["points"] if q[1] > 0]):
            o.append(f"<circle cx='{a:.1f}' cy='{b:.1f}' r='{s.get('size', 3)}' fill='{s['color']}'/>")
            if s.get("labels"):
                o.append(f"<text x='{a + 5:.1f}' y='{b - 4:.1f}' font-size='9'>{html.escape(s['labels'].get(x, ''))}</text>")
        o.append(f"<circle cx='{w - 160}' cy='{30 + 16 * i}' r='4' fill='{s['color']}'/>"
                 f"<text x='{w - 150}' y='{34 + 16 * i}'>{html.escape(s['label'])}</text>")
    return "\n".join(o + ["</svg>"])


def label_bits(label: str):
    """The code width of a candidate's label (``w4g64`` -> 4, a ggml type ``IQ4_NL`` -> 4), or "float"."""
    if label == "float":
        return "float"
    if label.startswith("w"):
        return int(label[1])
    from ..quant import ggml

    return ggml.block_type(label).bits


def heatmap(groups: list[dict], choice: dict[str, str]) -> str:
    """Rows: group kinds; columns: blocks; each cell the chosen setting, coloured by bits."""
    kinds = list(dict.fromkeys(g["kind"] for g in groups if g["block"] is not None))
    nb = 1 + max(g["block"] for g in groups if g["block"] is not None)
    cw, ch = max(18, min(40, 900 // nb)), 22
    w, h = max(640, 100 + cw * nb), 40 + ch * len(kinds) + 40
    o = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='9'>"]
    for r, k in enumerate(kinds):
        o.append(f"<text x='84' y='{40 + ch * r + 15}' text-anchor='end' font-size='11'>{k}</text>")
    for b in range(nb):
        o.append(f"<text x='{90 + cw * b + cw / 2}' y='32' text-anchor='middle'>{b}</text>")
    for g in groups:
        if g["block"] is None:
            continue
        lab = choice[g["name"]]
        bits = label_bits(lab)
        x, y = 90 + cw * g["block"], 40 + ch * kinds.index(g["kind"])
        o.append(f"<rect x='{x}' y='{y}' width='{cw - 1}' height='{ch - 1}' fill='{COLORS.get(bits, '#888')}'>"
                 f"<title>{g['name']}: {lab}</title></rect>")
        o.append(f"<text x='{x + cw / 2}' y='{y + 14}' text-anchor='middle' fill='{'#fff' if bits in ('float', 2, 8) else '#000'}'>"
                 f"{lab[1:] if lab.startswith('w') else 'f' if lab == 'float' else lab}</text>")
    o.append(f"<text x='90' y='{h - 10}' font-size='11'>cell: bits + group size (g32, g64, pc = per channel); f = float; "
             f"head: {choice.get(next((g['name'] for g in groups if g['block'] is None), ''), 'n/a')}</text>")
    return "\n".join(o + ["</svg>"])


def figures(res: dict) -> dict[str, str]:
    bits_axis = res["front_cost"] == "bits"
    def x_of(row):
        return row["bits"] if bits_axis else row["bytes"] / 1e6
    rec = res["recipes"]
    uni = [r for r in rec if r["name"].startswith("uniform")]
    mix = [r for r in rec if r["name"].startswith("mixed")]
    rule = [r for r in rec if r["name"].startswith("Q4_K_M")]
    numel = 8 * res["rounds"][-1]["linear_bytes"] / res["rounds"][-1]["bits"] / 8
    front = [((c * 8 / numel) if bits_axis else (c + res["fixed_bytes"]) / 1e6, s) for c, s in res["front"]]
    series = [
        {"label": "predicted front (solver)", "points": front, "color": "#4575b4", "line": True, "size": 2},
        {"label": "uniform, RTN (measured)", "points": [(x_of(r), r["kl"]) for r in uni], "color": "#d73027",
         "labels": {x_of(r): r["name"].split()[1] for r in uni}},
        {"label": "mixed, RTN (measured)", "points": [(x_of(r), r["kl"]) for r in mix], "color": "#fdae61"},
        {"label": "Q4_K_M rule, RTN (measured)", "points": [(x_of(r), r["kl"]) for r in rule], "color": "#7b3294",
         "size": 4},
        {"label": "chosen, GPTQ (eval text)", "points": [(x_of(r), r["kl"]) for r in res["rounds"]], "color": "#000",
         "size": 5},
    ]
    xl = "bits per weight (block linears)" if bits_axis else "model size (MB, all tensors)"
    return {"front": scatter(series, xl, "KL to original (nats/token)"),
            "allocation": heatmap(res["groups"], res["rounds"][-1]["choice"])}


# ---- text ----------------------------------------------------------------------------------------


def _table(header, rows) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def markdown(res: dict) -> str:
    last = res["rounds"][-1]
    ask = " and ".join(x for x in (res["budget"], res["target"]) if x)
    lines = [f"# lmpress plan: {ask}", "",
             f"**{'Met' if res['met'] else 'NOT met'}** after {len(res['rounds'])} round(s): KL {last['kl']:.5f}, "
             f"perplexity {last['perplexity']:.3f} (original {res['original']['perplexity']:.3f}), "
             f"{last['bits']:.3f} bits per weight in the block linears, {last['tensor_bytes']:,} bytes of tensors.", "",
             "## Confirmation rounds", "",
             _table(["round", "predicted-KL limit", "predicted KL", "measured KL", "perplexity", "top-1", "bits/weight",
                     "bytes (planned)", "bytes (model)", "met"],
                    [[r["round"], "-" if r["kl_limit"] is None else f"{r['kl_limit']:.4g}", f"{r['predicted_kl']:.5f}",
                      f"{r['kl']:.5f}", f"{r['perplexity']:.3f}", f"{r['top1']:.4f}", f"{r['bits']:.3f}",
                      f"{r['bytes']:,}", f"{r['tensor_bytes']:,}", r["met"]] for r in res["rounds"]]), "",
             "Measured KL and perplexity: GPTQ (the recipe below) on the evaluation text, against the original.", "",
             "## Sensitivity estimators", "",
             _table(["estimator", "Spearman vs measured recipe KL", "scale to KL", "used"],
                    [[e, f"{q['spearman']:.3f}", f"{q['scale']:.4g}", "yes" if e == res["estimator"] else ""]
                     for e, q in res["estimators"].items()]), "",
             f"Recipes measured with round-to-nearest on the held-out calibration slice "
             f"({res['data']['holdout'][0]} x {res['data']['holdout'][1]} tokens); fisher on its first "
             f"{res['data']['fisher_rows']} rows, kl on {res['data']['kl_slice'][0]} x {res['data']['kl_slice'][1]}.", "",
             "![front](front.svg)", "", "![allocation](allocation.svg)", "",
             "## Measured recipes (candidates of the front)", "",
             _table(["recipe", "bits/weight", "MB", "measured KL (RTN)", *[f"predicted ({e})" for e in res["estimators"]]],
                    [[r["name"], f"{r['bits']:.3f}", f"{r['bytes'] / 1e6:.2f}", f"{r['kl']:.5f}",
                      *[f"{r[f'estimate_{e}']:.5f}" if f"estimate_{e}" in r else "-" for e in res["estimators"]]]
                     for r in res["recipes"]]), "",
             "## Chosen allocation", "",
             _table(["group", "choice", "predicted KL"],
                    [[g["name"], last["choice"][g["name"]],
                      f"{g['predicted_kl'][g['candidates'].index(last['choice'][g['name']])]:.2e}"]
                     for g in res["groups"]]), "",
             "## Recipe", "", "```yaml", recipe_yaml_from_dicts(res["recipe"]).rstrip(), "```", "",
             f"Replay: `{res.get('replay', '')}`", "",
             f"Time: plan {res['seconds']['plan']:.1f} s (measurements cached: {res['seconds']['cached']}), "
             f"solve {res['seconds']['solve']:.2f} s, compression {sum(r['compress_seconds'] for r in res['rounds']):.1f} s."]
    return "\n".join(lines) + "\n"


def recipe_yaml_from_dicts(recipe: list[dict]) -> str:
    import yaml

    return yaml.safe_dump(_plain(recipe), sort_keys=False, width=200)


def page(res: dict, figs: dict[str, str]) -> str:
    md = markdown(res)
    body = []
    in_code = False
    for line in md.splitlines():
        if line.startswith("```"):
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
        elif in_code:
            body.append(html.escape(line))
        elif line.startswith("!["):
            name = line[line.index("(") + 1 : line.index(".svg")]
            body.append(figs[name])
        elif line.startswith("#"):
            n = len(line) - len(line.lstrip("#"))
            body.append(f"<h{n}>{html.escape(line.lstrip('#').strip())}</h{n}>")
        elif line.startswith("|---"):
            continue
        elif line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    out, in_table = [], False
    for b in body:  # wrap consecutive rows in tables
        if b.startswith("<tr>") and not in_table:
            out.append("<table border='1' cellspacing='0' cellpadding='3'>")
            in_table = True
        if not b.startswith("<tr>") and in_table:
            out.append("</table>")
            in_table = False
        out.append(b)
    if in_table:
        out.append("</table>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>lmpress plan</title></head>"
            "<body style='font-family:sans-serif;max-width:1000px'>" + "\n".join(out) + "</body></html>\n")
