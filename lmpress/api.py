"""The Python API that the CLI calls: evaluate and describe models."""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import arch
from .data import DataConfig
from .evaluate import as_dict, compare, peak_rss_bytes, perplexity, speed, tensor_bytes
from .counts import param_counts


def _bos(tokenizer) -> int | None:
    return tokenizer.bos_token_id


def evaluate(
    model,
    tokenizer,
    *,
    data: DataConfig | None = None,
    stream=None,
    context: int = 512,
    reference=None,
    measure_speed: bool = True,
    model_path: str | os.PathLike | None = None,
    progress: bool = True,
    compiled_decode: bool = False,
) -> dict:
    """Perplexity, (KL and top-1 agreement against ``reference``), size, bits per weight, peak
    memory, prefill and decode speed of ``model``; returns a flat dict of figures.
    ``compiled_decode``: decode through a static KV cache and ``torch.compile`` (``evaluate.speed``).
    """
    from .data import prepare
    from .io import folder_bytes

    if stream is None:
        _, stream = prepare(tokenizer, data or DataConfig(), need_calib=False)
    counts = param_counts(model)
    res: dict = {"context": context}
    ppl = perplexity(model, stream, context=context, bos=_bos(tokenizer), progress=progress)
    res.update(perplexity=ppl.ppl, nll=ppl.nll, eval_tokens=ppl.tokens, eval_seconds=ppl.seconds)
    if reference is not None:
        agr = compare(model, reference, stream, context=context, bos=_bos(tokenizer), progress=progress)
        res.update(kl=agr.kl, top1=agr.top1)
    res.update(
        params=counts.total,
        params_embedding=counts.embedding,
        params_linear=counts.linear,
        linear_bits_per_weight=counts.linear_bits_per_weight,
        tensor_bytes=tensor_bytes(model),
        disk_bytes=folder_bytes(model_path) if model_path else None,
    )
    if measure_speed:
        res.update(as_dict(speed(model, compiled=compiled_decode)), decode_path="compiled" if compiled_decode else "eager")
    res["peak_rss_bytes"] = peak_rss_bytes()
    return res


def describe(model) -> dict:
    """Architecture, layer count, parameter split and the layers compression methods touch."""
    spec = arch.spec_for(model)
    counts = param_counts(model)
    linears = arch.compressible_linears(model)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    names = sorted({n.split(".", len(spec.blocks.split(".")) + 1)[-1] for n in linears})
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "blocks": f"{spec.blocks} x {len(arch.blocks(model))}",
        "params": counts.total,
        "params_embedding": counts.embedding,
        "params_linear": counts.linear,
        "params_head": counts.head,
        "params_other": counts.other,
        "dtype": ",".join(dtypes),
        "tied_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        "compressible_linears": len(linears),
        "linear_names": names,
    }


def compress(
    recipe: list,
    model=None,
    tokenizer=None,
    *,
    model_spec=None,
    data: DataConfig | None = None,
    out=None,
    overwrite: bool = False,
    measure: bool = True,
    measure_speed: bool = True,
    context: int = 512,
    progress: bool = True,
) -> dict:
    """Apply ``recipe`` (a list of method configs) to a copy of the model, save it to ``out`` and
    measure the original and the compressed model side by side. Returns ``{"before": {...},
    "after": {...}, "methods": [...]}``. The input model is never modified.
    """
    import copy

    from . import recipe as rc
    from .data import prepare
    from .io import load_model

    if not recipe:
        from .errors import InputError

        raise InputError("empty recipe: give --method or --recipe")
    if model is None:
        model, tokenizer = load_model(model_spec)
    data = data or DataConfig()
    calib_needed = any(rc.needs_calibration(c) for c in recipe)
    calib, stream = prepare(tokenizer, data, need_calib=calib_needed, need_eval=measure)
    student = copy.deepcopy(model)
    ctx = rc.RunContext(calib=calib, tokenizer=tokenizer, teacher=model, data=data, progress=progress)
    steps = []
    for cfg in recipe:
        t0 = time.perf_counter()
        info = rc.apply(student, cfg, ctx)
        steps.append({**rc.to_dict(cfg), "seconds": time.perf_counter() - t0, "info": info})
    sparse = _store_sparse_(student, recipe)
    if sparse:
        steps[-1]["info"] = {**(steps[-1]["info"] or {}), "sparse_layers": sparse}
    saved = None
    if out is not None:
        from .formats import save_compressed

        saved = save_compressed(student, out, recipe=[rc.to_dict(c) for c in recipe], tokenizer=tokenizer, overwrite=overwrite)
    res = {"methods": steps, "output": str(saved) if saved else None}
    if measure:
        kw = dict(stream=stream, context=context, measure_speed=measure_speed, progress=progress)
        res["before"] = evaluate(model, tokenizer, model_path=_path_of(model_spec), **kw)
        res["after"] = evaluate(student, tokenizer, reference=model, model_path=saved, **kw)
    res["model"] = student
    return res


UNSTRUCTURED = ("magnitude", "wanda", "sparsegpt")


def _store_sparse_(model, recipe) -> dict[str, float]:
    """After unstructured or N:M pruning, swap the still-sparse float linears for compact
    :class:`~lmpress.prune.sparse.SparseLinear` layers (bitmask or N:M indices plus values), so the
    saved folder really is smaller. Returns ``{layer: measured sparsity}``."""
    pruned = [c for c in recipe if getattr(c, "method", "") in UNSTRUCTURED]
    if not pruned:
        return {}
    from .prune.sparse import sparsify_

    return sparsify_(model, pattern=getattr(pruned[-1], "pattern", None))


def _path_of(spec):
    from .io import resolve_model_path

    try:
        return resolve_model_path(spec)
    except Exception:
        return None


def apply_(model, cfg, calib=None, *, tokenizer=None, teacher=None, progress: bool = True) -> dict:
    """Apply one method config to ``model`` in place, e.g.
    ``lmpress.quantize_(model, GPTQConfig(bits=3, group_size=64), calib)`` with ``calib`` the (n, L)
    token ids from ``lmpress.data.prepare``. Returns the method's figures.
    """
    from . import recipe as rc
    from .errors import InputError

    if rc.needs_calibration(cfg) and calib is None:
        raise InputError(f"{cfg.method} needs calibration token ids: calib, _ = lmpress.data.prepare(tokenizer, DataConfig())")
    return rc.apply(model, cfg, rc.RunContext(calib=calib, tokenizer=tokenizer, teacher=teacher, progress=progress))


quantize_ = prune_ = factorize_ = apply_
