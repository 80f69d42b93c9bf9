"""The ``lmpress`` command line: parses arguments and calls the Python API, nothing more."""

from __future__ import annotations

import argparse
import json
import sys


def _add_model(p, default=True):
    p.add_argument("model", nargs="?" if default else None, default=None,
                   help="local Hugging Face folder, .gguf file, or built-in name (default: smollm2-135m)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle checkpoints (*.bin); they can run code")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code to run")


def _add_data(p):
    p.add_argument("--data", default=None, help="text file, folder of .txt files, .jsonl with a 'text' field (default: built-in Wikipedia)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="evaluation tokens (default 4096)")
    p.add_argument("--context", type=int, default=512, help="perplexity context length (default 512)")


FORMAT_HELP = ("output format: auto (default: a plain Hugging Face folder, else compressed-tensors, else lmpress's own "
               "layout, whichever first holds the model), hf, compressed-tensors, lmpress, or gguf:TYPE (one .gguf file "
               "for llama.cpp, TYPE a llama-quantize type such as Q4_0, IQ4_NL, Q4_K_M; with compress the method "
               "solves on that type's grids)")


def _add_output(p):
    p.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier lmpress output at that path")
    p.add_argument("--format", default="auto", help=FORMAT_HELP)


def _parser() -> argparse.ArgumentParser:
    from .recipe import methods_help

    ap = argparse.ArgumentParser(prog="lmpress", description="Compress Transformer language models, measured honestly.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("eval", help="perplexity, size, memory and speed of a model")
    _add_model(p)
    _add_data(p)
    p.add_argument("--reference", default=None, help="a model to measure KL divergence and top-1 agreement against")
    p.add_argument("--no-speed", action="store_true", help="skip the prefill/decode speed measurement")
    p.add_argument("--compiled-decode", action="store_true",
                   help="measure decode with a static KV cache and torch.compile (transformers' fast path; compiles first)")
    p.add_argument("--task", default=None, help="zero-shot multiple-choice task: wiki_cloze (built in, offline), a BIG-bench task.json, "
                   "or social_iqa, strategyqa, ... (BIG-bench, only where lmpress's cache already holds them)")
    p.add_argument("--task-limit", type=int, default=200, help="items of the task to score (default 200)")
    p.add_argument("--lm-eval", metavar="TASK", default=None,
                   help="also score TASK (as --task) through lm-evaluation-harness on the loaded model (extra: lmpress[lm-eval])")
    p.add_argument("--engine", choices=["llama.cpp"], default=None,
                   help="also run the .gguf MODEL in llama.cpp (perplexity, KL, prefill/decode speed inside llama.cpp, "
                        "on the same windows), beside lmpress's own figures (extra: lmpress[llamacpp])")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the figures as JSON to FILE ('-' for stdout)")
    _add_memory(p, "evaluate")
    p = sub.add_parser("info", help="architecture, parameter split, and the layers compression touches")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("fetch", help="download a built-in model (default: the default model) and the corpus now")
    p.add_argument("name", nargs="?", default=None, help="built-in model name (smollm2-135m, qwen2.5-coder-0.5b)")
    from .distill import cli as distill_cli

    distill_cli.add_parser(sub)
    p = sub.add_parser("compress", help="compress a model with a method or a recipe, save it, compare before/after")
    _add_model(p)
    _add_data(p)
    p.add_argument("--method", help=methods_help())
    p.add_argument("--recipe", help="a YAML recipe: a list of method configs applied in order")
    _add_output(p)
    p.add_argument("--calib-samples", type=int, default=128, help="calibration rows (default 128)")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration row (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eval", action="store_true", help="do not measure before/after")
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the report as JSON to FILE ('-' for stdout)")
    _add_memory(p, "compress")
    g = p.add_argument_group("method options (each applies to the methods that have it)")
    g.add_argument("--bits", type=int)
    g.add_argument("--group-size", type=int, help="quantization group size (columns per scale); -1 per channel")
    g.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric grid")
    g.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (with zero points)")
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: quantize columns by decreasing Hessian diagonal (default on; --no-act-order: natural order)")
    g.add_argument("--ternary", action="store_true", default=None, help="ternary weights {-1, 0, 1} x scale")
    g.add_argument("--head-bits", type=int, help="also quantize the output head (untied) to this many bits")
    g.add_argument("--sparsity", type=float)
    g.add_argument("--pattern", help="N:M sparsity, e.g. 2:4")
    g.add_argument("--target-params", type=float, help="structured pruning: fraction of non-embedding parameters kept")
    g.add_argument("--drop-layers", type=int, help="depth pruning: number of blocks removed")
    g.add_argument("--importance", help="importance measure for structured pruning")
    g.add_argument("--ratio", type=float, help="low-rank: fraction of linear parameters kept")
    g.add_argument("--rank", type=int, help="low-rank: one rank for all layers")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config field (YAML value)")
    p = sub.add_parser("plan", help="the most accurate model within a size target and/or the smallest within an accuracy budget")
    _add_model(p)
    _add_data(p)
    _add_output(p)
    p.add_argument("--budget", help="accuracy budget: kl=0.05 (mean KL to the original, nats/token) or ppl=+5%% / ppl=+0.5")
    p.add_argument("--target", help="size target: bits=4.5 (stored bits per weight of the block linears) or size=100MB")
    p.add_argument("--calib-samples", type=int, default=128, help="GPTQ calibration rows (default 128)")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration row (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--estimator", default="auto", help="sensitivity: auto (measure fisher and kl, use the better), fisher, kl")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any PlanConfig field (YAML value), e.g. holdout_rows=8, recipes=12, rounds=3, cache_dir=DIR")
    p = sub.add_parser("export", help="convert a model or an lmpress output to another format")
    _add_model(p, default=False)
    _add_output(p)
    return ap


def _add_memory(p, verb: str) -> None:
    p.add_argument("--max-memory", metavar="SIZE", help=f"memory budget, e.g. 8GiB: {verb} block by block from the weight "
                   "files (streaming) when the model does not fit it (default: the memory available)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="force streaming (--stream) or in-memory (--no-stream); see docs/scale.md")


def _open(args, spec):
    """A model to evaluate: in memory, or streamed block by block when it does not fit (``--max-memory``, ``--stream``)."""
    from .api import open_model
    from .stream import parse_size

    budget = parse_size(args.max_memory) if args.max_memory else None
    return open_model(spec, data=_data_cfg(args), max_memory=budget, stream=args.stream, allow_pickle=args.allow_pickle,
                      trust_remote_code=args.trust_remote_code)


def _data_cfg(args):
    from .data import DataConfig

    return DataConfig(corpus=args.data, eval_tokens=args.eval_tokens)


def cmd_eval(args) -> None:
    from .api import evaluate
    from .io import model_input_path, resolve_model_path
    from .report import table

    reference = model_input_path(args.reference) if args.reference else None
    check_json_dest(args.json, inputs=[model_input_path(args.model), reference, args.data, args.task])
    if args.engine:
        from . import llamacpp

        llamacpp.require()
        llamacpp.check_gguf(args.model or "")
    model, tok = _open(args, args.model)
    if getattr(model, "streamed", False) and (args.task or args.lm_eval or args.engine):
        from .errors import InputError

        raise InputError("--task, --lm-eval and --engine need the whole model in memory, and it does not fit the memory "
                         "budget (--max-memory, or the memory available): drop them to stream perplexity and KL, or "
                         "raise --max-memory")
    ref = _open(args, args.reference)[0] if args.reference else None
    stream = None
    if args.engine:  # both engines score the same token ids
        from .data import prepare

        _, stream = prepare(tok, _data_cfg(args), need_calib=False)
    res = evaluate(model, tok, data=_data_cfg(args), stream=stream, context=args.context, reference=ref,
                   measure_speed=not args.no_speed, model_path=resolve_model_path(args.model), compiled_decode=args.compiled_decode)
    if args.task:
        from .evaluate import multiple_choice
        from .tasks import load_task

        mc = multiple_choice(model, tok, load_task(args.task, args.task_limit), progress=True)
        res.update({"task": args.task, "mc_acc": mc.acc, "mc_acc_norm": mc.acc_norm, "mc_items": mc.items})
    if args.lm_eval:
        from .lmeval import evaluate_lm_eval

        res.update(evaluate_lm_eval(model, tok, args.lm_eval, limit=args.task_limit))
    res["model"] = str(args.model or "smollm2-135m")
    columns = {res["model"]: res}
    if args.engine:
        from .llamacpp import evaluate_gguf

        res["llama.cpp"] = evaluate_gguf(args.model, stream, context=args.context, bos=tok.bos_token_id, reference=ref,
                                         measure_speed=not args.no_speed, progress=True)
        columns = {"lmpress (dequantized, PyTorch)": res, "llama.cpp": res["llama.cpp"]}
    print(table(columns))
    _emit(args.json, res)  # after the table: a failed write still leaves the figures on screen


def _emit(dest, res) -> None:
    if dest == "-":
        print(json.dumps(res, indent=2))
    elif dest:
        write_json(dest, res)


def write_json(dest, obj) -> None:
    """Write ``obj`` as JSON to ``dest`` atomically: a full disk leaves no empty or partial file."""
    import os
    import tempfile
    from pathlib import Path

    from .errors import LmpressError
    from .io import umask, write_failure

    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, dest)
    except BaseException as e:
        os.unlink(tmp)
        reason = write_failure(e, dest.parent)
        if reason:
            raise LmpressError(f"could not write {dest} ({reason}); the figures are printed above") from None
        raise


def cmd_info(args) -> None:
    from .api import describe
    from .io import load_model

    model, _ = load_model(args.model, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                          tokenizer=False)  # info needs no tokenizer
    d = describe(model)
    if args.json:
        print(json.dumps(d, indent=2))
        return
    for k, v in d.items():
        v = ", ".join(v) if isinstance(v, list) else (f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v)
        print(f"{k:22s} {v}")


def cmd_fetch(args) -> None:
    from . import assets

    from .io import builtin_model_dir

    print(builtin_model_dir(args.name or assets.DEFAULT_MODEL_NAME))
    print(assets.default_corpus_path())


METHOD_OPTIONS = ("bits", "group_size", "sym", "act_order", "ternary", "head_bits", "sparsity", "pattern", "target_params",
                  "drop_layers", "importance", "ratio", "rank")


def _recipe_from_args(args) -> list:
    from . import recipe as rc
    from .errors import InputError

    if bool(args.method) == bool(args.recipe):
        raise InputError("give exactly one of --method NAME or --recipe FILE")
    if args.recipe:
        return rc.load_recipe(args.recipe)
    fields = {k: getattr(args, k) for k in METHOD_OPTIONS if getattr(args, k) is not None}
    return [rc.make_config(args.method, **fields, **set_fields(args.set))]


def set_fields(pairs: list[str]) -> dict:
    """``--set KEY=VALUE`` options (YAML values) as config fields."""
    import yaml

    from .errors import InputError

    fields = {}
    for kv in pairs:
        key, sep, val = kv.partition("=")
        if not sep:
            raise InputError(f"--set takes KEY=VALUE, got {kv!r}")
        try:
            fields[key.replace("-", "_")] = yaml.safe_load(val)
        except yaml.YAMLError as e:
            raise InputError(f"--set {kv!r}: the value is not valid YAML ({str(e).splitlines()[0]})")
    return fields


def check_json_dest(dest, inputs=()) -> None:
    """Check a ``--json FILE`` destination before any work: its folder must exist and be writable, and
    it must not be, or lie inside, one of ``inputs`` (the model, corpus, recipe...)."""
    import os
    from pathlib import Path

    from .errors import InputError
    from .io import overlapping_input

    if dest in (None, "-"):
        return
    given, relation = overlapping_input(dest, inputs)
    if given:
        raise InputError(f"--json {dest} {relation} the input {given}; write the report somewhere else")
    parent = Path(dest).expanduser().parent
    if not parent.is_dir():
        raise InputError(f"--json {dest}: the folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise InputError(f"--json {dest}: cannot write to {parent} (no write permission, or a read-only disk)")


def cmd_compress(args) -> None:
    from .api import compress
    from .data import DataConfig
    from .errors import LmpressError
    from .io import check_output, model_input_path
    from .report import table

    inputs = [model_input_path(args.model), args.data, args.recipe]
    check_json_dest(args.json, inputs)
    check_output(args.output, overwrite=args.overwrite, inputs=inputs)  # the recipe too, which compress() never sees
    recipe = _recipe_from_args(args)
    data = DataConfig(corpus=args.data, calib_samples=args.calib_samples, calib_len=args.calib_len,
                      eval_tokens=args.eval_tokens, seed=args.seed)
    from .distill.parallel import dist_setup
    from .stream import parse_size

    rank, _ = dist_setup()  # under torchrun: calibration rows and layer solves shared by the processes
    budget = parse_size(args.max_memory) if args.max_memory else None
    _, res = compress(args.model, recipe, data=data, out=args.output, format=args.format, overwrite=args.overwrite,
                      measure=not args.no_eval, measure_speed=not args.no_speed, context=args.context,
                      allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                      max_memory=budget, stream=args.stream)
    if rank > 0:
        return  # rank 0 reports
    for step in res["methods"]:
        print(f"{step['method']}: {step['seconds']:.1f} s")
        sparse = (step.get("info") or {}).get("sparse_layers")
        if sparse:
            print(_sparsity_summary(sparse))
        final = (step.get("info") or {}).get("final_sparsity")
        if final:
            asked = ", ".join(f"{s['method']} {s.get('pattern') or s.get('sparsity')}" for s in res["methods"]
                              if s.get("info", {}).get("sparse_layers"))
            print(_sparsity_summary(final, f"zeros after all steps ({asked} asked; later steps may round "
                                           "weights to or away from zero)"))
    if res["output"]:
        print(f"saved to {res['output']}")
    mem = res.get("memory", {})
    if mem:
        streamed = f" (streamed block by block, budget {mem['budget_bytes'] / 2**30:.2f} GiB)" if mem["mode"] == "streaming" else ""
        print(f"peak memory (RSS): {mem['peak_rss_bytes'] / 2**30:.2f} GiB{streamed}")
    if "not_measured" in res:
        print(f"note: {res['not_measured']}")
    if "after" in res:
        print(table({"original": res["before"], "compressed": res["after"]}))
    try:
        _emit(args.json, res)  # after the table: a failed write still leaves the figures on screen
    except LmpressError as e:
        saved = f"; the model is saved in {res['output']} (a rerun replaces it with --overwrite)" if res["output"] else ""
        raise LmpressError(f"{e}{saved}") from None


def _sparsity_summary(sparse: dict[str, float], what: str = "stored sparse") -> str:
    """Measured sparsity per layer kind (min / mean / max over blocks); every layer is in --json."""
    kinds: dict[str, list[float]] = {}
    for name, v in sparse.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(v)
    lines = [f"{what}: {len(sparse)} layers (measured sparsity min / mean / max per layer kind)"]
    for k, vs in kinds.items():
        lines.append(f"  {k:<12} {min(vs):.3f} / {sum(vs) / len(vs):.3f} / {max(vs):.3f}  ({len(vs)} layers)")
    return "\n".join(lines)


def cmd_plan(args) -> None:
    import dataclasses

    from .data import DataConfig
    from .errors import InputError
    from .planner.config import PlanConfig, parse_budget, parse_target
    from .planner.run import plan

    if args.budget is None and args.target is None:
        raise InputError("give --budget (kl=0.05, ppl=+5%), --target (bits=4.5, size=100MB), or both")
    budget = parse_budget(args.budget) if args.budget is not None else None  # checked before any work
    target = parse_target(args.target) if args.target is not None else None
    fields = set_fields(args.set)
    known = {f.name for f in dataclasses.fields(PlanConfig)}
    if set(fields) - known:
        raise InputError(f"plan has no option(s) {', '.join(sorted(set(fields) - known))}; its options: {', '.join(sorted(known))}")
    cfg = PlanConfig(estimator=args.estimator, **fields)
    data = DataConfig(corpus=args.data, calib_samples=args.calib_samples, calib_len=args.calib_len,
                      eval_tokens=args.eval_tokens, seed=args.seed)
    res = plan(args.model, budget=budget, target=target, out=args.output, data=data, config=cfg, format=args.format,
               overwrite=args.overwrite, context=args.context)
    last = res["rounds"][-1]
    for e, q in res["estimators"].items():
        print(f"estimator {e}: Spearman {q['spearman']:.3f} against {len(res['recipes'])} measured recipes"
              + (" (used)" if e == res["estimator"] else ""))
    for r in res["rounds"]:
        print(f"round {r['round']}: predicted KL {r['predicted_kl']:.5f}, measured KL {r['kl']:.5f}, perplexity "
              f"{r['perplexity']:.3f}, {r['bits']:.3f} bits/weight, {r['tensor_bytes']:,} bytes, met: {r['met']}")
    print(("met" if res["met"] else "NOT met") + f": {' and '.join(x for x in (res['budget'], res['target']) if x)}; "
          f"original perplexity {res['original']['perplexity']:.3f}; plan {res['seconds']['plan']:.1f} s "
          f"(cached measurements: {res['seconds']['cached']})")
    print(f"saved to {res['output']} (recipe.yaml, report.md, report.html)")
    if not res["met"]:
        raise InputError(f"the confirmed model misses {res['budget']} after {len(res['rounds'])} rounds (last KL "
                         f"{last['kl']:.5f}); it is saved with the report; loosen the budget or raise --set rounds=")


def cmd_export(args) -> None:
    from .io import export

    out = export(args.model, args.output, format=args.format, overwrite=args.overwrite,
                 allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    print(f"saved to {out}")


def cmd_distill(args) -> None:
    from .distill import cli as distill_cli

    distill_cli.run(args)


COMMANDS = {"eval": cmd_eval, "info": cmd_info, "fetch": cmd_fetch, "compress": cmd_compress, "distill": cmd_distill,
            "export": cmd_export, "plan": cmd_plan}


def main(argv=None) -> int:
    from .errors import LmpressError

    import signal

    args = _parser().parse_args(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _terminated)  # a kill cleans up as Ctrl-C does
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        COMMANDS[args.cmd](args)
    except LmpressError as e:
        print(f"lmpress: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        print(f"lmpress: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a kill, a job scheduler's stop), raised where the process is so that it unwinds and
    cleans up as Ctrl-C does."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminated(signum, frame):
    raise Terminated(signum)


if __name__ == "__main__":
    sys.exit(main())
