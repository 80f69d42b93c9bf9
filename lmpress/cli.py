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


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lmpress", description="Compress Transformer language models, measured honestly.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("eval", help="perplexity, size, memory and speed of a model")
    _add_model(p)
    _add_data(p)
    p.add_argument("--reference", default=None, help="a model to measure KL divergence and top-1 agreement against")
    p.add_argument("--no-speed", action="store_true", help="skip the prefill/decode speed measurement")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the figures as JSON to FILE ('-' for stdout)")
    p = sub.add_parser("info", help="architecture, parameter split, and the layers compression touches")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("fetch", help="download the built-in model and corpus into the cache now")
    return ap


def _load(args):
    from .io import load_model

    return load_model(args.model, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)


def _data_cfg(args):
    from .data import DataConfig

    return DataConfig(corpus=args.data, eval_tokens=args.eval_tokens)


def cmd_eval(args) -> None:
    from .api import evaluate
    from .io import resolve_model_path
    from .report import table

    model, tok = _load(args)
    ref = None
    if args.reference:
        from .io import load_model

        ref, _ = load_model(args.reference, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    res = evaluate(model, tok, data=_data_cfg(args), context=args.context, reference=ref,
                   measure_speed=not args.no_speed, model_path=resolve_model_path(args.model))
    res["model"] = str(args.model or "smollm2-135m")
    _emit(args.json, res)
    print(table({res["model"]: res}))


def _emit(dest, res) -> None:
    if dest == "-":
        print(json.dumps(res, indent=2))
    elif dest:
        with open(dest, "w") as f:
            json.dump(res, f, indent=2)


def cmd_info(args) -> None:
    from .api import describe

    model, _ = _load(args)
    d = describe(model)
    if args.json:
        print(json.dumps(d, indent=2))
        return
    for k, v in d.items():
        v = ", ".join(v) if isinstance(v, list) else (f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v)
        print(f"{k:22s} {v}")


def cmd_fetch(args) -> None:
    from . import assets

    print(assets.default_model_dir())
    print(assets.default_corpus_path())


COMMANDS = {"eval": cmd_eval, "info": cmd_info, "fetch": cmd_fetch}


def main(argv=None) -> int:
    from .errors import LmpressError

    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.cmd](args)
    except LmpressError as e:
        print(f"lmpress: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmpress: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
