"""``lmpress.plan``: an accuracy budget and a size target in, the best compressed model out.

1. candidates per layer group with exact bytes (:mod:`.candidates`);
2. sensitivities per (group, candidate), two estimators, and a set of whole recipes measured for
   real to rank and scale them (:mod:`.sensitivity`), cached so a re-plan takes seconds;
3. the exact allocation (:mod:`.solve`);
4. confirmation: compressed with GPTQ and evaluated against the original; a missed budget tightens
   the predicted-KL limit and re-solves, at most ``rounds`` times (:mod:`.confirm`);
5. OUT: the model, ``recipe.yaml``, ``report.md`` / ``report.html`` (:mod:`.report`), ``plan.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

import torch

from ..data import DataConfig
from ..errors import InputError
from . import solve as sv
from .candidates import Candidate, Group, fixed_bytes, grid_candidates, layer_groups, quant_bytes
from .config import PlanConfig, parse_budget, parse_target
from .sensitivity import fisher_scores, group_specs, kl_scores, recipe_kl, reference

VERSION = 1  # of the cached measurements


# ---- data and cache ----------------------------------------------------------------------------


def holdout_ids(tokenizer, data: DataConfig, cfg: PlanConfig) -> torch.Tensor:
    """(holdout_rows, holdout_len) calibration tokens that follow the GPTQ calibration rows of ``data``
    in the same shuffled calibration text (so neither the evaluation text nor GPTQ's rows)."""
    from ..data import load_documents, split_documents, tokenize_until

    docs, _ = split_documents(load_documents(data.corpus))
    docs = list(docs)
    random.Random(data.seed).shuffle(docs)
    bos = tokenizer.bos_token_id
    skip = data.calib_samples * (data.calib_len - (bos is not None))
    body = cfg.holdout_len - (bos is not None)
    ids = tokenize_until(tokenizer, docs, skip + cfg.holdout_rows * body)[skip:].view(cfg.holdout_rows, body)
    if bos is not None:
        ids = torch.cat([torch.full((cfg.holdout_rows, 1), bos, dtype=torch.long), ids], 1)
    return ids


def cache_key(model, ids: torch.Tensor, groups: list[Group], cfg: PlanConfig) -> str:
    """A hash of the weights, the held-out tokens and everything that changes a measurement."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(ids.numpy().tobytes())
    h.update(json.dumps([VERSION, [(g.name, [c.label for c in g.candidates]) for g in groups], cfg.sym,
                         cfg.fisher_rows, cfg.kl_rows, cfg.kl_len, cfg.recipes, cfg.seed]).encode())
    return h.hexdigest()


class Cache:
    """Measured sensitivities in one JSON file, rewritten atomically after every step (resume)."""

    def __init__(self, cfg: PlanConfig, key: str):
        root = Path(cfg.cache_dir or os.environ.get("LMPRESS_CACHE", Path.home() / ".cache" / "lmpress")) / "plan"
        self.path = Path(cfg.cache_dir) / f"{key}.json" if cfg.cache_dir else root / f"{key}.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"key": key}
        self.hit = "fisher" in self.data or "kl" in self.data

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


# ---- measuring -----------------------------------------------------------------------------------


def sample_recipes(groups: list[Group], n: int, seed: int, rule: tuple | None = None) -> list[dict]:
    """Every uniform recipe (one grid setting on all block groups) and ``n`` random mixed ones (each
    mixes 2-3 settings, so together they span the range of sizes); the head stays float. Then the
    hand-written rule: ``rule`` ``(name, {layer: candidate fields})``, by default llama.cpp's Q4_K_M
    rule on lmpress's grid (:func:`q4km_rule`)."""
    blocks = [g for g in groups if g.block is not None]
    labels = [c.label for c in blocks[0].candidates if c.bits is not None
              and all(c in g.candidates for g in blocks)]
    def pick(g, label):
        return next(i for i, c in enumerate(g.candidates) if c.label == label)
    out = [{"name": f"uniform {lab}", "choice": {g.name: pick(g, lab) for g in blocks}} for lab in labels]
    rng = random.Random(seed)
    for r in range(n):
        mix = rng.sample(labels, min(len(labels), rng.choice((2, 3))))
        out.append({"name": f"mixed {r}", "choice": {g.name: pick(g, rng.choice(mix)) for g in blocks}})
    name, layers = rule if rule is not None else ("Q4_K_M rule", q4km_rule(groups))
    return out + ([{"name": name, "layers": layers}] if layers else [])


def gguf_rule(groups: list[Group], types: dict[str, str], ftype: str) -> tuple[str, dict]:
    """llama.cpp's own rule for the file type ``ftype`` on the plan's groups: ``(name, {layer: (bits,
    block, type)})`` from ``types`` (:func:`lmpress.quant.gguf_mix.plan`: parameter name -> ggml type)."""
    from ..quant import ggml

    def fields(t):
        return ggml.block_type(t).bits, ggml.block_type(t).block, t

    return f"{ftype} rule", {n: fields(types[f"{n}.weight"]) for g in groups if g.block is not None for n in g.layers}


def gguf_fixed_bytes(model, groups: list[Group], types: dict[str, str]) -> int:
    """Bytes of a GGUF plan's file outside the groups: every other matrix in its type in ``types`` (the
    file type's rule: the token embedding, an untied head; a tied head is not stored), everything else
    (norms) in F32."""
    from ..quant.ggml import row_bytes

    inside = {f"{n}.{k}" for g in groups for n in g.layers for k in ("weight", "bias")}
    total = 0
    for name, t in model.state_dict().items():
        if name in inside:
            continue
        if name in types:
            total += t.shape[0] * row_bytes(types[name], t.shape[1])
        elif t.dim() == 1:  # norms (and biases outside the groups) are F32
            total += t.numel() * 4
    return total


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule (llama-quant.cpp): the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4km_rule(groups: list[Group]) -> dict | None:
    """llama.cpp's Q4_K_M allocation on lmpress's grid: w4g64 (Q4_K's 4.5 bits), v_proj and down_proj at
    8 bits per channel (the grid has no 6 bits) in :func:`use_more_bits` layers; the head stays float.
    Layer name -> (bits, group_size); None when the model has no v_proj / down_proj or 64 does not fit."""
    blocks = [g for g in groups if g.block is not None]
    n = 1 + max(g.block for g in blocks)
    names = [x for g in blocks for x in g.layers]
    if not any(x.endswith("v_proj") for x in names) or not any(x.endswith("down_proj") for x in names):
        return None
    if any(i % 64 for g in blocks for _, i in g.shapes):
        return None
    return {x: (8, -1) if use_more_bits(g.block, n) and x.endswith(("v_proj", "down_proj")) else (4, 64)
            for g in blocks for x in g.layers}


def measure(model, groups: list[Group], holdout: torch.Tensor, cfg: PlanConfig, cache: Cache,
            progress: bool = True, rule: tuple | None = None) -> dict:
    """Fill ``cache.data`` with what is missing: ``fisher`` and/or ``kl`` scores per group, and the
    measured KL of :func:`sample_recipes` (each step saved as it finishes)."""
    from ..progress import bar

    d = cache.data
    t = d.setdefault("seconds", {})
    want = ("fisher", "kl") if cfg.estimator == "auto" else (cfg.estimator,)
    if "fisher" in want and "fisher" not in d:
        t0 = time.perf_counter()
        d["fisher"] = fisher_scores(model, groups, holdout[: cfg.fisher_rows], cfg.sym, progress=progress)
        t["fisher"] = time.perf_counter() - t0
        cache.save()
    if "kl" in want and len(d.get("kl", {})) < len(groups):
        t0 = time.perf_counter()
        ref = reference(model, holdout[: cfg.kl_rows, : cfg.kl_len])
        kl = d.setdefault("kl", {})
        for g in bar([g for g in groups if g.name not in kl], desc="kl sensitivity", enabled=progress):
            kl[g.name] = kl_scores(model, g, ref, cfg.sym)
            t["kl"] = t.get("kl", 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            cache.save()
        del ref
    recs = d.setdefault("recipes", [])
    todo = sample_recipes(groups, cfg.recipes, cfg.seed, rule)[len(recs):]
    if todo:
        t0 = time.perf_counter()
        ref = reference(model, holdout)
        for r in bar(todo, desc="recipes", enabled=progress):
            specs = group_specs(groups, r["choice"], cfg.sym) if "choice" in r else \
                {n: Candidate(*c).spec(cfg.sym) for n, c in r["layers"].items()}
            recs.append({**r, "kl": recipe_kl(model, specs, ref)})
            t["recipes"] = t.get("recipes", 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            cache.save()
    return d


def original_figures(model, tokenizer, stream: torch.Tensor, context: int, cache: Cache) -> dict:
    """The original model's evaluation (perplexity, nll: what a ``ppl`` budget is relative to), kept in
    the cache under a hash of the evaluation tokens and context, so a re-plan does not evaluate it again
    (``cached`` says which it was)."""
    from ..api import evaluate

    h = hashlib.blake2b(stream.numpy().tobytes(), digest_size=8)
    h.update(str(context).encode())
    kept = cache.data.setdefault("original", {})
    if h.hexdigest() in kept:
        return {**kept[h.hexdigest()], "cached": True}
    figs = evaluate(model, tokenizer, stream=stream, context=context, measure_speed=False, progress=False)
    kept[h.hexdigest()] = figs
    cache.save()
    return {**figs, "cached": False}


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    import numpy as np

    def ranks(x):
        x = np.asarray(x, float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ranks of ties
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def assess(groups: list[Group], measured: dict) -> dict:
    """For each estimator: the predicted KL of every measured recipe (sum of its groups' scores), the
    rank correlation with the measured KL, the least-squares scale to KL units; and the one to use."""
    recs = [r for r in measured["recipes"] if "choice" in r]
    out = {}
    for est in ("fisher", "kl"):
        if est not in measured:
            continue
        pred = [sum(measured[est][g][i] for g, i in r["choice"].items()) for r in recs]
        meas = [r["kl"] for r in recs]
        scale = sum(p * m for p, m in zip(pred, meas)) / max(sum(p * p for p in pred), 1e-30)
        out[est] = {"spearman": spearman(pred, meas), "scale": scale, "predicted": [p * scale for p in pred]}
    best = max(out, key=lambda e: (out[e]["spearman"], e == "kl"))
    return {"estimators": out, "use": best}


def predicted_kl(groups: list[Group], measured: dict, est: str, scale: float) -> list[list[float]]:
    return [[max(0.0, s * scale) for s in measured[est][g.name]] for g in groups]


# ---- solving -------------------------------------------------------------------------------------


def costs(groups: list[Group], target, fixed: int):
    """The byte constraint of a target as ``(costs per group, limit)``: block-linear bytes against
    ``bits`` per weight, or every group's bytes against ``size`` less the fixed bytes."""
    if target is None:
        return None
    if target.kind == "bits":
        numel = sum(g.numel for g in groups if g.block is not None)
        return [list(g.bytes) if g.block is not None else [0] * len(g.bytes) for g in groups], target.value * numel / 8
    return [list(g.bytes) for g in groups], target.value - fixed


def allocate(groups, pred, target, fixed: int, kl_limit: float | None):
    """The exact allocation: least predicted KL under the target (and the KL limit), or, with a KL
    limit alone, the fewest bytes within it. None when nothing meets them."""
    cons = []
    bc = costs(groups, target, fixed)
    if bc is not None:
        cons.append(bc)
    if kl_limit is not None:
        cons.append((pred, kl_limit))
    objective = pred if target is not None else [list(g.bytes) for g in groups]
    return sv.solve(objective, cons)


def summary(groups, pred, choice, fixed: int) -> dict:
    blocks = [i for i, g in enumerate(groups) if g.block is not None]
    lin = sum(groups[i].bytes[choice[i]] for i in blocks)
    return {"predicted_kl": sv.total(pred, choice), "bytes": fixed + sv.total([g.bytes for g in groups], choice),
            "linear_bytes": lin, "bits": 8 * lin / sum(groups[i].numel for i in blocks),
            "choice": {g.name: g.candidates[i].label for g, i in zip(groups, choice)}}


def recipe_rows(model, groups, pred, fixed: int, recipes: list[dict], quality: dict) -> list[dict]:
    """The measured recipes with their sizes and each estimator's (scaled) prediction."""
    rows, i = [], 0
    shapes = {n: (s, g) for g in groups for n, s in zip(g.layers, g.shapes)}
    for x in recipes:
        row = {"name": x["name"], "kl": x["kl"]}
        if "choice" in x:
            row.update({f"estimate_{e}": q["predicted"][i] for e, q in quality["estimators"].items()})
            row.update(summary(groups, pred, [x["choice"].get(g.name, 0) for g in groups], fixed))
            i += 1
        else:  # a per-layer rule: its bytes from the layers' shapes (head float)
            lin = sum(quant_bytes(*shapes[n][0], Candidate(*c), float_size=4,
                                  bias=getattr(model.get_submodule(n), "bias", None) is not None)
                      for n, c in x["layers"].items())
            row.update(linear_bytes=lin, bits=8 * lin / sum(g.numel for g in groups if g.block is not None),
                       bytes=fixed + lin + sum(g.bytes[0] for g in groups if g.block is None))
        rows.append(row)
    return rows


def nearest(groups, pred, target, fixed: int, kl_limit) -> str:
    """Why nothing meets the budget and target, with the nearest plans on either side."""
    parts = []
    if target is not None:
        ch = allocate(groups, pred, target, fixed, None)
        if ch is None:
            least = summary(groups, pred, [min(range(len(g.bytes)), key=g.bytes.__getitem__) for g in groups], fixed)
            parts.append(f"the smallest plan has {least['bits']:.2f} bits per weight, {least['bytes'] / 1e6:.1f} MB")
        else:
            s = summary(groups, pred, ch, fixed)
            parts.append(f"the most accurate plan at {target} has a predicted KL of {s['predicted_kl']:.4f}")
    if kl_limit is not None:
        ch = allocate(groups, pred, None, fixed, kl_limit)
        if ch is not None:
            s = summary(groups, pred, ch, fixed)
            parts.append(f"the smallest plan within KL {kl_limit:.4g} has {s['bits']:.2f} bits per weight, "
                         f"{s['bytes'] / 1e6:.1f} MB")
    return "; ".join(parts)


def plan_groups(model, cfg: PlanConfig) -> tuple[list[Group], int, tuple | None]:
    """The groups with their candidates, the bytes outside them, and the hand-written rule to measure
    beside (None: llama.cpp's Q4_K_M rule on lmpress's grid): lmpress's grid settings and float, or for
    a GGUF plan llama.cpp's block types (no float; the head is not a group: the file type's rule types it)."""
    if cfg.gguf:
        from ..quant import gguf_mix
        from .candidates import gguf_candidates

        groups = layer_groups(model, gguf_candidates(cfg.gguf_types), head_bits=(), keep_float=False)
        empty = [g.name for g in groups if not g.candidates]
        if empty:
            raise InputError(f"no type of gguf_types {list(cfg.gguf_types)} has a block that divides the rows of "
                             f"{empty[0]}; add Q8_0 or Q4_0 (blocks of 32)")
        types = gguf_mix.plan(model, cfg.gguf, imatrix=True)  # every stored matrix's type by the file type's rule
        return groups, gguf_fixed_bytes(model, groups, types), gguf_rule(groups, types, cfg.gguf)
    groups = layer_groups(model, grid_candidates(cfg.bits, cfg.group_sizes), cfg.head_bits)
    return groups, fixed_bytes(model, groups), None


def plan(model=None, *, budget=None, target=None, tokenizer=None, out=None, data: DataConfig | None = None,
         config: PlanConfig | None = None, format: str = "auto", overwrite: bool = False, progress: bool = True,
         context: int = 512) -> dict:
    """Plan, compress and confirm the most accurate model within ``target`` (``"bits=4.5"``,
    ``"size=100MB"``) and/or the smallest within ``budget`` (``"kl=0.05"``, ``"ppl=+5%"``); either
    alone or both. ``model``: a loaded model (give its ``tokenizer``) or a spec for
    :func:`lmpress.load_model`. ``data``: the calibration (GPTQ rows, then the held-out slice) and
    evaluation text; ``config``: :class:`PlanConfig`. Writes ``out`` (model, recipe.yaml, report.md,
    report.html, plan.json) when given. Returns the plan (a dict, as plan.json)::

        res = lmpress.plan("smollm2-135m", target="bits=3.5", out="plan-3.5")
        res["rounds"][-1]["kl"], res["recipe"]
    """
    import copy

    from .. import recipe as rc
    from ..api import evaluate
    from ..data import prepare
    from ..evaluate import tensor_bytes
    from ..io import check_output, load_model, model_input_path
    from .confirm import recipe_for

    budget = parse_budget(budget) if budget is not None else None
    target = parse_target(target) if target is not None else None
    if budget is None and target is None:
        raise InputError("give a budget (--budget kl=0.05 or ppl=+5%), a target (--target bits=4.5 or size=100MB), or both")
    cfg, data = config or PlanConfig(), data or DataConfig()
    if format.partition(":")[0] == "gguf":  # --format gguf:TYPE: a GGUF plan with TYPE's rule for the rest
        import dataclasses

        from ..io import gguf_format

        ftype = gguf_format(format)
        if ftype is None or (cfg.gguf is not None and cfg.gguf != ftype):
            raise InputError(f"--format {format}: a GGUF plan needs the file type whose rule types the embedding and "
                             "head, e.g. --format gguf:Q4_K_M" + (f" (the config says gguf={cfg.gguf})" if cfg.gguf else ""))
        cfg = dataclasses.replace(cfg, gguf=ftype)
    spec = None if hasattr(model, "config") else model
    model_spec = str(spec) if spec is not None else (None if model is not None else "smollm2-135m")
    if out is not None:
        check_output(out, overwrite=overwrite, inputs=[model_input_path(spec) if (spec is not None or model is None) else None, data.corpus])
    if spec is not None or model is None:
        model, tokenizer = load_model(spec)
    t_start = time.perf_counter()
    groups, fixed, rule = plan_groups(model, cfg)
    if cfg.gguf:
        format = f"gguf:{cfg.gguf}"
    holdout = holdout_ids(tokenizer, data, cfg)
    cache = Cache(cfg, cache_key(model, holdout, groups, cfg))
    measured = measure(model, groups, holdout, cfg, cache, progress, rule)
    quality = assess(groups, measured)
    est = quality["use"] if cfg.estimator == "auto" else cfg.estimator  # a cache may hold both
    pred = predicted_kl(groups, measured, est, quality["estimators"][est]["scale"])
    calib, stream = prepare(tokenizer, data)
    base = original_figures(model, tokenizer, stream, context, cache)
    kl_limit = budget.kl_guess(base["perplexity"]) if budget else None
    t_solve = time.perf_counter()
    choice = allocate(groups, pred, target, fixed, kl_limit)
    if choice is None:
        raise InputError(f"nothing meets {' and '.join(str(x) for x in (budget, target) if x)}: "
                         f"{nearest(groups, pred, target, fixed, kl_limit)}; loosen the budget or the target")
    solve_seconds = time.perf_counter() - t_solve
    plan_seconds = time.perf_counter() - t_start
    rounds, student, recipe = [], None, None
    for r in range(cfg.rounds):
        recipe = recipe_for(groups, choice, sym=cfg.sym, gguf=cfg.gguf)
        t0 = time.perf_counter()
        student = copy.deepcopy(model)
        rc.apply(student, recipe[0], rc.RunContext(calib=calib, tokenizer=tokenizer, data=data, progress=progress))
        gptq_seconds = time.perf_counter() - t0
        figs = evaluate(student, tokenizer, stream=stream, context=context, reference=model, measure_speed=False,
                        progress=False)
        row = {"round": r + 1, "kl_limit": kl_limit, **summary(groups, pred, choice, fixed),
               "tensor_bytes": tensor_bytes(student), "kl": figs["kl"], "top1": figs["top1"],
               "perplexity": figs["perplexity"], "compress_seconds": gptq_seconds,
               "met": budget.met(figs, base["perplexity"]) if budget else True}
        rounds.append(row)
        if row["met"] or r + 1 == cfg.rounds:
            break
        have = figs["kl"] if budget.kind == "kl" else max(figs["nll"] - base["nll"], 1e-9)
        kl_limit = min(row["predicted_kl"], kl_limit) * min(0.9, budget.kl_guess(base["perplexity"]) / max(have, 1e-12))
        nxt = allocate(groups, pred, target, fixed, kl_limit)
        if nxt is None:
            rounds[-1]["note"] = f"no plan within a predicted KL of {kl_limit:.4g}: {nearest(groups, pred, target, fixed, kl_limit)}"
            break
        choice = nxt
    res = {
        "budget": str(budget) if budget else None, "target": str(target) if target else None,
        "met": rounds[-1]["met"], "estimator": est,
        "estimators": {e: {k: v for k, v in q.items() if k != "predicted"} for e, q in quality["estimators"].items()},
        "recipes": recipe_rows(model, groups, pred, fixed, measured["recipes"], quality),
        "rounds": rounds, "recipe": [rc.to_dict(c) for c in recipe], "original": base, "fixed_bytes": fixed,
        "seconds": {"plan": plan_seconds, "solve": solve_seconds, "measure": measured.get("seconds", {}),
                    "cached": cache.hit}, "cache": str(cache.path),
        "data": {"calib": [data.calib_samples, data.calib_len], "holdout": [cfg.holdout_rows, cfg.holdout_len],
                 "fisher_rows": cfg.fisher_rows, "kl_slice": [cfg.kl_rows, cfg.kl_len], "eval_tokens": data.eval_tokens},
        "groups": [{"name": g.name, "kind": g.kind, "block": g.block, "layers": list(g.layers),
                    "candidates": [c.label for c in g.candidates], "bytes": list(g.bytes),
                    "predicted_kl": pred[i]} for i, g in enumerate(groups)],
        "front": [(c, s) for c, s, _ in sv.front(pred, costs(groups, target, fixed)[0] if target else
                                                 [list(g.bytes) for g in groups], points=16)],
        "front_cost": target.kind if target else "size", "model_spec": model_spec,
    }
    if out is not None:
        from .report import write_outputs

        res["output"] = str(write_outputs(student, tokenizer, res, recipe, out, data=data, format=format,
                                          overwrite=overwrite))
    return res
