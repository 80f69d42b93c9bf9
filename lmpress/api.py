"""The Python API that the CLI calls: evaluate and describe models."""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import arch
from .data import DataConfig
from .evaluate import as_dict, compare, peak_rss_bytes, perplexity, speed, tensor_bytes
from .counts import param_counts, stored_dtypes


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
    A streamed model (:func:`open_model`) gives perplexity and KL block by block, and no speed.
    """
    from .data import prepare
    from .io import folder_bytes

    streamed = getattr(model, "streamed", False)
    arch.check_positions(model, context, "--context")
    if stream is None:
        _, stream = prepare(tokenizer, data or DataConfig(), need_calib=False)
    counts = param_counts(model.skeleton if streamed else model)
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
        tensor_bytes=None if streamed else tensor_bytes(model),
        disk_bytes=folder_bytes(model_path) if model_path else None,
    )
    if streamed:
        res["streamed"] = "block by block; no speed measured"
    elif measure_speed:
        res.update(as_dict(speed(model, compiled=compiled_decode)), decode_path="compiled" if compiled_decode else "eager")
    res["peak_rss_bytes"] = peak_rss_bytes()
    return res


def open_model(spec=None, *, data: DataConfig | None = None, max_memory: int | None = None, stream: bool | None = None,
               allow_pickle: bool = False, trust_remote_code: bool = False):
    """``(model, tokenizer)`` to evaluate: loaded in memory (:func:`lmpress.load_model`), or with
    ``stream`` (None: when the in-memory estimate exceeds ``max_memory`` bytes, default the memory
    available) a :class:`lmpress.stream.StreamedModel` that :func:`evaluate` runs block by block."""
    from . import stream as st
    from .io import _load_tokenizer, _stored_dtypes, load_model

    found = None if stream is False else _streamable(spec, stream, allow_pickle, trust_remote_code, "evaluate")
    if found is not None:
        path, skel = found
        go, _ = st.decide(skel, data or DataConfig(), max_memory, evaluation=True)
        if stream or go:
            model = st.StreamedModel(path, trust_remote_code, shaped=skel)
            model.skeleton.lmpress_stored_dtypes = _stored_dtypes(path, model.skeleton)
            return model, _load_tokenizer(path, config=skel.config, trust_remote_code=trust_remote_code)
    return load_model(spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def describe(model) -> dict:
    """Architecture, layer count, parameter split and the layers compression methods touch."""
    spec = arch.spec_for(model)
    counts = param_counts(model)
    linears = arch.compressible_linears(model)
    stored = stored_dtypes(model)
    held = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    dtypes = sorted({str(stored.get(n, p.dtype)).removeprefix("torch.") for n, p in model.named_parameters()})
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
        "dtype": ",".join(dtypes),  # as stored in the checkpoint
        **({"dtype_in_memory": ",".join(held)} if held != dtypes else {}),
        "linear_bits_per_weight": round(counts.linear_bits_per_weight, 3),
        "tied_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        "compressible_linears": len(linears),
        "linear_names": names,
    }


def compress(
    model=None,
    recipe: list | None = None,
    tokenizer=None,
    *,
    teacher=None,
    data: DataConfig | None = None,
    out=None,
    format: str = "auto",
    overwrite: bool = False,
    measure: bool = True,
    measure_speed: bool = True,
    context: int = 512,
    progress: bool = True,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    max_memory: int | None = None,
    stream: bool | None = None,
):
    """Apply ``recipe`` (a list of method configs) to a copy of ``model``, save it to ``out`` (in
    ``format``, see :func:`lmpress.save_model`) and measure the original and the compressed model side
    by side. ``model`` is a loaded model (give its ``tokenizer``) or a spec for
    :func:`lmpress.load_model` (a folder, a ``.gguf`` file, a built-in name; None: the default model).
    ``teacher`` (distillation): the model to learn from, by default the original ``model``.

    Returns ``(compressed_model, report)`` with ``report = {"methods": [...], "output": path,
    "before": {...}, "after": {...}, "memory": {...}}``. The input model is never modified.

    ``stream``: compress block by block from the weight files (:mod:`lmpress.stream`; a model folder
    and ``out`` needed); None (default): stream when the in-memory estimate exceeds ``max_memory``
    bytes (default: the memory available now). A streamed run returns the model's skeleton (its
    blocks on the meta device) and measures nothing but the peak memory: ``lmpress eval OUT`` after.

    Example::

        model, report = lmpress.compress("smollm2-135m", [lmpress.GPTQConfig(bits=4)], out="w4")
    """
    import copy

    from . import recipe as rc
    from .data import prepare
    from .errors import InputError
    from .io import check_gguf_output, check_output, gguf_format, load_model, model_input_path

    if not recipe:
        raise InputError("empty recipe: give --method or --recipe")
    from .calib import ranks

    stream_out = out  # a streamed run under torchrun: every rank checkpoints its own rows there, rank 0 writes
    if ranks()[0] > 0:  # under torchrun: every rank compresses its share, rank 0 saves and measures
        out, measure = None, False
    data = data or DataConfig()
    spec = None if hasattr(model, "config") else model
    gguf_type, to_gguf = gguf_format(format), format.partition(":")[0] == "gguf"
    if gguf_type:
        recipe = [solve_for_gguf(c, gguf_type) for c in recipe]
    if to_gguf and stream:
        raise InputError("GGUF output is solved and written in memory; drop --stream (or choose another --format)")
    owned = spec is not None or model is None  # loaded here, so ours to change
    if out is not None:
        check = check_gguf_output if to_gguf else check_output
        check(out, overwrite=overwrite, inputs=[model_input_path(spec) if owned else None, data.corpus])
    if owned and stream is not False and not to_gguf:
        streamed = _maybe_stream(spec, recipe, data, stream_out, format, progress, max_memory, stream,
                                 allow_pickle, trust_remote_code)
        if streamed is not None:
            return streamed
    before_disk = _disk_bytes(spec) if owned else None  # before anything is written
    if owned:
        model, tokenizer = load_model(spec, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if gguf_type and out is not None:  # what the GGUF writer would refuse, refused before the work
        from .formats.gguf import architecture, check_tokenizer

        architecture(model)
        check_tokenizer(tokenizer)
    calib_needed = any(rc.needs_calibration(c) for c in recipe)
    if calib_needed:
        arch.check_positions(model, data.calib_len, "--calib-len")
    if measure:
        arch.check_positions(model, context, "--context")
    for c in recipe:
        if hasattr(c, "seq_len"):
            arch.check_positions(model, c.seq_len, "--seq-len")
    calib, stream = prepare(tokenizer, data, need_calib=calib_needed, need_eval=measure)
    # the original stays for measuring, as the default teacher, and whenever the caller owns it
    student = copy.deepcopy(model) if measure or teacher is None or not owned else model
    ctx = rc.RunContext(calib=calib, tokenizer=tokenizer, teacher=teacher if teacher is not None else model,
                        data=data, progress=progress)
    steps = []
    for cfg in recipe:
        t0 = time.perf_counter()
        info = rc.apply(student, cfg, ctx)
        steps.append({**rc.to_dict(cfg), "seconds": time.perf_counter() - t0, "info": info})
    pruned = [i for i, c in enumerate(recipe) if rc.entry(c.method).finish]
    if pruned and pruned[-1] < len(recipe) - 1:  # later steps may not keep the zeros: say what is left
        steps[-1]["info"] = {**steps[-1]["info"], "final_sparsity": measured_sparsity(student)}
    saved = None
    if out is not None:
        from .io import save_model

        made = list(getattr(model, "lmpress_recipe", []))  # the steps that made the input, if lmpress did
        saved = save_model(student, out, tokenizer=tokenizer, format=format, recipe=made + list(recipe), data=data,
                           overwrite=overwrite)
    report = {"methods": steps, "output": str(saved) if saved else None}
    report["memory"] = {"mode": "in-memory", "peak_rss_bytes": peak_rss_bytes()}
    if measure:
        kw = dict(stream=stream, context=context, measure_speed=measure_speed, progress=progress)
        report["before"] = evaluate(model, tokenizer, **kw)
        report["before"]["disk_bytes"] = before_disk
        report["after"] = evaluate(student, tokenizer, reference=model, model_path=saved, **kw)
    return student, report


def _maybe_stream(spec, recipe, data, out, format, progress, max_memory, stream, allow_pickle, trust_remote_code):
    """``(skeleton, report)`` of a streamed run when ``stream`` or the memory budget asks for one, else None."""
    from . import stream as st
    from .data import prepare
    from .errors import InputError
    from .io import _load_tokenizer, _metadata

    found = _streamable(spec, stream, allow_pickle, trust_remote_code, "compress")
    if found is None:
        return None
    path, skel = found
    go, plan = st.decide(skel, data, max_memory)
    go = _same_on_every_rank(bool(stream or go))  # under torchrun rank 0 decides: all stream or none
    if not go:
        return None
    if out is None:
        raise InputError("a streamed compression writes its result block by block: give an output folder (-o)")
    st.check_streamable(recipe)
    arch.check_positions(skel, data.calib_len, "--calib-len")
    tokenizer = _load_tokenizer(path, config=skel.config, trust_remote_code=trust_remote_code)
    calib, _ = prepare(tokenizer, data, need_calib=True, need_eval=False)
    t0 = time.perf_counter()
    model, info = st.compress(path, recipe, tokenizer, calib, data, Path(out), format=format,
                              metadata=_metadata(recipe, data), progress=progress, trust_remote_code=trust_remote_code)
    from . import recipe as rc

    steps = [{**rc.to_dict(recipe[0]), "seconds": time.perf_counter() - t0, "info": info}]
    memory = {"mode": "streaming", "peak_rss_bytes": peak_rss_bytes(), "budget_bytes": plan["budget"],
              "estimate_in_memory_bytes": plan["in_memory"], "estimate_streaming_bytes": plan["streaming"]}
    return model, {"methods": steps, "output": info["streamed"]["output"], "memory": memory,
                   "not_measured": "a streamed run measures no perplexity; run lmpress eval on the output"}


def _same_on_every_rank(value):
    """``value`` as rank 0 has it, on every rank of a torch.distributed group (as it is in one process)."""
    from .calib import ranks

    if ranks()[1] == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _streamable(spec, stream, allow_pickle, trust_remote_code, verb: str):
    """``(path, skeleton)`` of a model folder that can be read block by block, or None (it is loaded
    in memory instead); with ``stream`` True, a clear error for one that cannot."""
    from . import formats
    from . import stream as st
    from .errors import InputError
    from .io import _check_folder, _check_remote_code, resolve_model_path

    path = resolve_model_path(spec)
    if not path.is_file():
        raw = _check_folder(path, allow_pickle)
        _check_remote_code(path, raw, trust_remote_code)
    readable = ("hf", "compressed-tensors") if verb == "evaluate" else ("hf",)  # compress reads float weights
    if path.is_file() or formats.detect(raw) not in readable or not any(path.glob("*.safetensors")):
        if stream:
            what = ("a Hugging Face safetensors folder (float weights, or compressed-tensors for evaluation)"
                    if verb == "evaluate" else "a Hugging Face safetensors folder of float weights")
            raise InputError(f"{path}: streaming reads {what}; this is a GGUF file, pickle weights or an lmpress output "
                             f"whose layers are not read block by block (lmpress's own layout{'' if verb == 'evaluate' else ', compressed-tensors'}): "
                             f"convert it (lmpress export IN --format hf) or {verb} it in memory")
        return None
    try:
        skel = st.skeleton(path, trust_remote_code)
        shards = st.open_shards(path)
        if isinstance(shards, st.PackedShards):
            shards.shape_layers(skel)  # the in-memory estimate counts packed layers as stored
        return path, skel
    except (ValueError, KeyError, OSError, InputError):
        if stream:
            raise
        return None  # the in-memory load says what is wrong with the folder


def solve_for_gguf(cfg, gguf_type: str):
    """``cfg`` set to solve on llama.cpp's grids of ``gguf_type`` (``--format gguf:TYPE``), if it is a
    quantization config; an error if it already names another GGUF type."""
    import dataclasses

    from .errors import InputError
    from .quant import gguf_mix

    if "gguf" not in {f.name for f in dataclasses.fields(cfg)}:
        return cfg
    if cfg.gguf is not None and gguf_mix.ftype(cfg.gguf) != gguf_type:
        raise InputError(f"the recipe's {cfg.method} step solves for gguf={cfg.gguf}, but the output asks gguf:{gguf_type}; "
                         "make them the same")
    return dataclasses.replace(cfg, gguf=gguf_type)


def measured_sparsity(model) -> dict[str, float]:
    """Fraction of exact zeros in each block linear's (dequantized) weight."""
    return {n: float((arch.linear_weight(m) == 0).float().mean()) for n, m in arch.compressible_linears(model).items()}


def _disk_bytes(spec):
    from .io import folder_bytes, model_input_path, resolve_model_path

    path = model_input_path(spec)
    if path is not None and not path.exists():
        path = resolve_model_path(spec)  # a built-in model, fetched once
    return folder_bytes(path) if path is not None else None


def apply_(model, cfg, calib=None, *, tokenizer=None, teacher=None, progress: bool = True) -> dict:
    """Apply one method config to ``model`` in place (then the method's finishing step, as in a
    recipe), e.g. ``lmpress.quantize_(model, GPTQConfig(bits=3, group_size=64), calib)`` with ``calib``
    the (n, L) token ids from ``lmpress.data.prepare``. Returns the method's figures.
    """
    from . import recipe as rc
    from .errors import InputError

    if rc.needs_calibration(cfg) and calib is None:
        raise InputError(f"{cfg.method} needs calibration token ids: calib, _ = lmpress.prepare(tokenizer, lmpress.DataConfig())")
    return rc.apply(model, cfg, rc.RunContext(calib=calib, tokenizer=tokenizer, teacher=teacher, progress=progress))


def _family_verb(family: str, verb: str):
    def fn(model, cfg, calib=None, **kw) -> dict:
        from . import recipe as rc
        from .errors import InputError

        if rc.family(cfg) != family:
            raise InputError(f"lmpress.{verb} takes a {family} config, got {type(cfg).__name__} "
                             f"({rc.family(cfg)}); use lmpress.apply_ or the matching verb")
        return apply_(model, cfg, calib, **kw)

    fn.__name__ = fn.__qualname__ = verb
    fn.__doc__ = f"Apply a {family} method config to ``model`` in place; see :func:`apply_`."
    return fn


quantize_ = _family_verb("quant", "quantize_")
prune_ = _family_verb("prune", "prune_")
factorize_ = _family_verb("lowrank", "factorize_")
