"""``lmpress distill``: parse the arguments, call :func:`lmpress.distill.engine.distill`, save the student.

    lmpress distill --teacher T --student S --data D -o OUT [--loss fkl|rkl|jsd|tv|skl|srkl|tsld|cakld|ce]
                    [--hidden-loss mse|cosine] [--on-policy 0.5] [--tokens 2M] [--qat-bits 2] ...

Without ``--student`` the student starts as a copy of the teacher (self-distillation, e.g. with
``--qat-bits``). Under ``torchrun --nproc-per-node N lmpress distill ...`` the same command trains
with N processes (gloo); rank 0 prints and saves.
"""

from __future__ import annotations

import json
import re

SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_tokens(text: str) -> int:
    """``"2M"`` -> 2_000_000, ``"500k"``, ``"1.5e6"``, ``"4096"``."""
    from ..errors import InputError

    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kmgb]?)\s*", str(text), flags=re.I)
    if not m:
        raise InputError(f"--tokens takes a count such as 2M, 500k or 100000, got {text!r}")
    return int(float(m.group(1)) * SUFFIX[m.group(2).lower()])


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("distill", help="train a student model to match a teacher (distillation, QAT)")
    p.add_argument("--teacher", default=None, help="teacher model: folder, .gguf or built-in name (default: smollm2-135m)")
    p.add_argument("--student", default=None, help="student model folder (default: a copy of the teacher)")
    p.add_argument("--data", default=None, help="corpus: text file, folder of .txt, .jsonl (default: built-in Wikipedia)")
    p.add_argument("-o", "--output", required=True, help="output folder for the trained student (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier lmpress output at that path")
    p.add_argument("--format", default="auto", help="output format: auto, hf, compressed-tensors, lmpress")
    p.add_argument("--loss", default="fkl", help="fkl, rkl, jsd, tv, skl, srkl, tsld, cakld, or ce (no teacher)")
    p.add_argument("--hidden-loss", choices=["mse", "cosine"], default=None, help="add a hint loss on hidden states")
    p.add_argument("--on-policy", type=float, default=0.0, help="fraction of steps on student-sampled continuations")
    p.add_argument("--tokens", default="2M", help="training tokens, e.g. 2M, 500k (default 2M)")
    p.add_argument("--source", choices=["corpus", "teacher"], default="corpus",
                   help="train on corpus text, or on teacher-written continuations (sequence-level KD)")
    p.add_argument("--topk", type=int, default=0, help="cache the teacher's top-k log-probs once and train from them")
    p.add_argument("--topk-cache", default=None, help="folder of the top-k cache (written when missing)")
    for flag, typ, help_ in [("--temperature", float, "softmax temperature"), ("--lr", float, "peak learning rate"),
                             ("--batch-size", int, "global windows per step"), ("--seq-len", int, "tokens per window"),
                             ("--grad-accum", int, "micro-batches per process per step"),
                             ("--eval-every", int, "steps between evaluations (perplexity, KL to the teacher)"),
                             ("--checkpoint-every", int, "steps between checkpoints"), ("--seed", int, "random seed"),
                             ("--qat-bits", int, "fake-quantize the student's linears to this many bits (QAT)"),
                             ("--qat-group-size", int, "QAT group size (columns per scale)")]:
        p.add_argument(flag, type=typ, default=None, help=help_)
    p.add_argument("--checkpoint-dir", default=None, help="folder for checkpoints; a run resumes from the one there")
    p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast for the forward passes")
    p.add_argument("--fsdp", action="store_true", default=None, help="under torchrun: shard the student (FSDP2)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="evaluation tokens (default 4096)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other DistillConfig field (YAML value)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the figures as JSON to FILE ('-' for stdout)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle checkpoints (*.bin); they can run code")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code to run")


OPTIONS = ("loss", "hidden_loss", "on_policy", "temperature", "lr", "batch_size", "seq_len", "grad_accum", "eval_every",
           "checkpoint_every", "checkpoint_dir", "seed", "qat_bits", "qat_group_size", "bf16", "fsdp", "topk", "topk_cache")


def config_from_args(args):
    from .. import recipe as rc
    from ..cli import set_fields

    fields = {k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None}
    fields["tokens"] = parse_tokens(args.tokens)
    fields["data"] = args.source
    return rc.make_config("distill", **{**fields, **set_fields(args.set)})


def run(args) -> None:
    """The distill command: a one-entry recipe through :func:`lmpress.api.compress`, the teacher given
    as the model to learn from. Under torchrun every rank trains and rank 0 saves; with FSDP the
    sharded student is rebuilt whole from the gathered state before it is saved."""
    import torch.distributed as dist

    from ..api import compress
    from ..cli import check_json_dest
    from ..data import DataConfig
    from ..io import check_output, load_model, model_input_path, save_model
    from .engine import dist_setup, finish_fake_quant_

    cfg = config_from_args(args)
    inputs = [model_input_path(args.teacher), model_input_path(args.student) if args.student else None, args.data]
    check_output(args.output, overwrite=args.overwrite, inputs=inputs)
    check_json_dest(args.json, inputs)
    rank, world = dist_setup()
    kw = dict(allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    teacher, tok = load_model(args.teacher, **kw)
    student = args.student or args.teacher  # a spec: compress loads the student's own copy
    data = DataConfig(corpus=args.data, eval_tokens=args.eval_tokens, seed=cfg.seed)
    _topk_cache_first(cfg, teacher, tok, args.data, rank)
    sharded = world > 1 and cfg.fsdp
    save = rank == 0 and not sharded
    _, report = compress(student, [cfg], tok, teacher=teacher, data=data, out=args.output if save else None,
                         format=args.format, overwrite=args.overwrite, measure=False, progress=rank == 0, **kw)
    res = report["methods"][0]["info"]
    res["output"] = report["output"]
    if sharded:  # FSDP left the student sharded: rebuild it whole from the gathered state
        whole = _whole_student(student, kw, cfg, res.pop("student_state"))
        finish_fake_quant_(whole, cfg)
        if rank == 0:
            res["output"] = str(save_model(whole, args.output, tokenizer=tok, format=args.format,
                                           recipe=[cfg], data=data, overwrite=args.overwrite))
    if rank == 0:
        _report(res, args.json)
    if dist.is_initialized():
        dist.barrier()  # every rank done (rank 0 saving) before the process group goes
        dist.destroy_process_group()


def _topk_cache_first(cfg, teacher, tok, corpus, rank: int) -> None:
    """Under torchrun rank 0 writes the top-k cache while the others wait; then every rank reads it."""
    import torch.distributed as dist

    from .engine import training_data

    if cfg.topk and dist.is_initialized():
        if rank == 0:
            training_data(cfg, teacher, tok, corpus, progress=True)
        dist.barrier()


def _whole_student(spec, kw, cfg, state):
    from ..io import load_model
    from .qat import to_fake_quant_

    student, _ = load_model(spec, **kw)
    if cfg.qat_bits:
        to_fake_quant_(student, cfg.qat_bits, cfg.qat_group_size, learn_clip=cfg.qat_learn_clip)
    student.load_state_dict(state)
    return student


def _report(res: dict, dest) -> None:
    print(f"{res['steps']} steps, {res['tokens']:,} tokens ({res['epochs']:.2f} epochs), "
          f"{res['tokens_per_s'] or 0:.0f} tokens/s (teacher included), loss {res['loss_first']:.4f} -> {res['loss_last']:.4f}")
    for e in res["evals"]:
        kl = f", KL to teacher {e['kl']:.4f}, top-1 {e['top1']:.3f}" if "kl" in e else ""
        print(f"  step {e['step']}: perplexity {e['perplexity']:.3f}{kl}")
    print(f"saved to {res['output']}")
    if dest == "-":
        print(json.dumps(res, indent=2))
    elif dest:
        from ..cli import write_json

        write_json(dest, res)
