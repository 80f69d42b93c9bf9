"""Models larger than memory: peak memory of streamed (block-by-block) compression.

    flock /tmp/lmpress-heavy.lock python bench/scale.py --part default          # ~10 min on 2 busy cores
    flock /tmp/lmpress-heavy.lock python bench/scale.py --part big --calib-samples 16
    python bench/scale.py --write                                               # the 'scale' section

``--part default``: the default model (SmolLM2-135M), GPTQ W4 g64 with 128 x 512 calibration tokens,
compressed in memory and streamed, each in its own process (no before/after measurement in either);
peak RSS of each, and whether the two outputs hold the same bytes (the shards' tensors merged into
one file vs the in-memory ``model.safetensors``, and ``config.json``).

``--part big``: a random-weight decoder with Qwen2-1.5B's shapes (hidden 1536, MLP 8960, 28 blocks,
151,936-token vocabulary, tied head) written once as bf16 safetensors shards (the weights do not
matter for memory and time), compressed streamed with GPTQ W4 g64 in a process whose memory is
capped by a cgroup (``memory.limit_in_bytes``, 3 GiB: the kernel kills it past the cap) where one
can be created, else only measured; peak RSS against the sum of its parts, wall time per block,
size on disk. Results go to ``bench/results/scale.json``; ``--write`` renders the section with a
paper plan for a 70B model from the measured per-block figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# run as a script, bench/ is first on sys.path, and its kernels.py shadows the package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
RESULTS = HERE / "results" / "scale.json"
BIG = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
           vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
           rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
GiB = 2**30


def _status(key: str) -> int:
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024


# ---- child processes: one measured run each -------------------------------------------------------
def child(args: dict) -> dict:
    """Runs in its own process: ``baseline`` (imports, tokenizer, calibration ids) or ``compress``."""
    import torch

    torch.set_num_threads(int(os.environ.get("LMPRESS_THREADS", "2")))
    from lmpress.api import compress
    from lmpress.data import DataConfig, prepare
    from lmpress.io import _load_tokenizer, resolve_model_path
    from lmpress.recipe import make_config

    data = DataConfig(calib_samples=args["calib_samples"], calib_len=512)
    if args["mode"] == "baseline":
        import lmpress.quant.gptq  # noqa: F401
        import lmpress.stream  # noqa: F401
        import transformers.models.qwen2.modeling_qwen2  # noqa: F401

        tok = _load_tokenizer(resolve_model_path(args["model"]))
        prepare(tok, data, need_calib=True, need_eval=False)
        return {"baseline_rss": _status("VmHWM")}
    cfg = make_config("gptq", bits=4, group_size=64)
    t0 = time.perf_counter()
    _, rep = compress(args["model"], [cfg], data=data, out=args["out"], overwrite=True, measure=False, progress=False,
                      stream=args["stream"], max_memory=args.get("max_memory"))
    info = rep["methods"][0]["info"]
    return {"seconds": time.perf_counter() - t0, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "memory": rep["memory"], "streamed": info.get("streamed"), "threads": torch.get_num_threads()}


def run_child(args: dict, cap: int | None = None) -> dict:
    """``child(args)`` in a fresh process (in a memory cgroup of ``cap`` bytes when one can be made)."""
    group = _cgroup(cap) if cap else None
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pre = None
    if group:
        def pre():  # join the capped group before exec
            (group / "cgroup.procs").write_text(str(os.getpid()))
    try:
        r = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True, env=env,
                           preexec_fn=pre)
        if r.returncode != 0:
            raise SystemExit(f"child failed ({r.returncode}{', killed at the memory cap' if r.returncode == -9 else ''}): "
                             f"{r.stderr[-3000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["cgroup_cap"] = cap if group else None
        return res
    finally:
        if group:
            group.rmdir()


def _cgroup(cap: int) -> Path | None:
    """A fresh cgroup (v1 memory controller, or v2) capping memory at ``cap`` bytes, or None."""
    for root, limit in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"), (Path("/sys/fs/cgroup"), "memory.max")):
        g = root / f"lmpress-bench-{os.getpid()}"
        try:
            g.mkdir(exist_ok=True)
            (g / limit).write_text(str(cap))
            return g
        except OSError:
            try:
                g.rmdir()
            except OSError:
                pass
    return None


# ---- the parts -------------------------------------------------------------------------------------
def part_default(calib_samples: int, work: Path) -> dict:
    from lmpress.io import resolve_model_path

    model = str(resolve_model_path(None))
    base = run_child({"mode": "baseline", "model": model, "calib_samples": calib_samples})
    runs = {}
    for stream in (False, True):
        runs["streamed" if stream else "in_memory"] = run_child(
            {"mode": "compress", "model": model, "calib_samples": calib_samples, "stream": stream,
             "out": str(work / ("st" if stream else "mem"))})
    return {**base, **runs, "identical": same_output(work / "mem", work / "st"), "calib_samples": calib_samples,
            "model": "SmolLM2-135M-Instruct (built-in)"}


def same_output(mem: Path, st: Path) -> bool:
    """The streamed shards merged into one file equal the in-memory model.safetensors byte for byte,
    and config.json is the same."""
    from safetensors.torch import load_file, save_file

    state = {}
    for f in sorted(st.glob("model-*.safetensors")):
        state.update(load_file(str(f)))
    merged = st.parent / "merged.safetensors"
    save_file(dict(sorted(state.items())), str(merged), metadata={"format": "pt"})
    same = merged.read_bytes() == (mem / "model.safetensors").read_bytes()
    merged.unlink()
    return same and (mem / "config.json").read_bytes() == (st / "config.json").read_bytes()


def write_big_model(folder: Path, blocks: int) -> Path:
    """Random bf16 weights of Qwen2-1.5B's shapes, one shard per 4 blocks plus one for the embedding,
    written tensor group by tensor group (never the whole model in memory); the default model's tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lmpress.io import _load_tokenizer, resolve_model_path

    if (folder / "model.safetensors.index.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config = Qwen2Config(**{**BIG, "num_hidden_layers": blocks})
    from accelerate import init_empty_weights

    with init_empty_weights():
        skel = AutoModelForCausalLM.from_config(config)
    shapes = {k: v.shape for k, v in skel.state_dict().items() if k != "lm_head.weight"}
    g = torch.Generator().manual_seed(0)
    groups: dict[str, list[str]] = {}
    for k in shapes:
        i = int(k.split(".")[2]) // 4 if k.startswith("model.layers.") else -1
        groups.setdefault("emb" if i < 0 else f"b{i}", []).append(k)
    names = sorted(groups, key=lambda n: (n != "emb", int(n[1:]) if n != "emb" else 0))
    weight_map, total = {}, 0
    for j, gname in enumerate(names):
        file = f"model-{j + 1:05d}-of-{len(names):05d}.safetensors"
        state = {}
        for k in groups[gname]:
            shape = shapes[k]
            t = torch.ones(shape) if k.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
            state[k] = t.to(torch.bfloat16)
            weight_map[k] = file
            total += state[k].numel() * 2
        save_file(state, str(tmp / file), metadata={"format": "pt"})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(tmp)
    _load_tokenizer(resolve_model_path(None)).save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def part_big(calib_samples: int, blocks: int, cap: int, work: Path) -> dict:
    folder = write_big_model(work / f"qwen2-1.5b-shapes-{blocks}blocks", blocks)
    disk_in = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    base = run_child({"mode": "baseline", "model": str(folder), "calib_samples": calib_samples})
    res = run_child({"mode": "compress", "model": str(folder), "calib_samples": calib_samples, "stream": True,
                     "max_memory": cap, "out": str(work / "big-out")}, cap=cap)
    out = Path(res["streamed"]["output"])
    res["disk_out"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    res["disk_block_shard"] = (out / "model-00001-of-{:05d}.safetensors".format(blocks + 1)).stat().st_size
    return {**base, "run": res, "calib_samples": calib_samples, "blocks": blocks, "cap": cap, "disk_in": disk_in,
            "parts": parts(calib_samples)}


def parts(calib_samples: int, shape: dict = BIG, calib_len: int = 512) -> dict:
    """The sum of its parts: the largest block in float32, its Hessians (one per input group, float32),
    the calibration activations (float32) and the embedding as stored (bf16); the baseline is measured."""
    h, m, heads, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    kv_dim = h // heads * kv
    block = (h * h * 2 + h * kv_dim * 2 + 3 * h * m + 2 * h + (h + 2 * kv_dim)) * 4  # q, o, k, v, MLP, norms, q/k/v biases
    hessians = (3 * h * h + m * m) * 4  # q/k/v, o, gate/up read hidden-wide inputs; down an MLP-wide one
    return {"block_f32": block, "hessians": hessians, "activations": calib_samples * calib_len * h * 4,
            "embedding_stored": shape["vocab_size"] * h * 2}


# ---- the section -------------------------------------------------------------------------------------
def plan_70b(per_block_s: float, calib_samples: int) -> str:
    """Paper plan: a Llama-3-70B-shaped model from the measured 1.5B per-block time, scaled by work."""
    big = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
    p70, p15 = parts(128, big), parts(calib_samples)

    def work(shape, tokens):  # multiply-adds of one block: two passes, the X^T X sums, the solves (Cholesky ~ in^3)
        h, m = shape["hidden_size"], shape["intermediate_size"]
        kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
        params = h * h * 2 + h * kv * 2 + 3 * h * m
        return 2 * params * tokens + tokens * (3 * h * h + m * m) + (h * (h + 2 * kv) * h + h * h * h + 2 * m * h * h + h * m * m) \
            + 3 * (3 * h**3 + m**3)
    t70 = per_block_s * work(big, 128 * 512) / work(BIG, calib_samples * 512)
    mem70 = p70["block_f32"] + 2 * p70["hessians"] + p70["activations"]
    return "\n".join([
        "**70B on paper** (Llama-3-70B shapes: hidden 8192, MLP 28,672, 80 blocks, vocabulary 128,256; GPTQ W4 g64, "
        "128 x 512 calibration tokens), from the measured 1.5B per-block time scaled by each block's multiply-adds "
        "(two passes, the X^T X sums, the factorizations and sweeps):",
        f"- one machine: peak about {mem70 / GiB:.1f} GiB + the process (a block in float32 {p70['block_f32'] / GiB:.1f} GiB, "
        f"its Hessians {p70['hessians'] / GiB:.1f} GiB plus the widest one's factor, activations {p70['activations'] / GiB:.1f} GiB; "
        f"the embedding {2 * big['vocab_size'] * big['hidden_size'] / GiB:.1f} GiB in bf16 is held only before the "
        f"first block and after the last); about {t70 / 60:.0f} min per block on these 2 cores, "
        f"{80 * t70 / 3600:.0f} h for 80 blocks; output about {80 * 855.6e6 * 4.5 / 8 / 1e9 + 2 * big['vocab_size'] * 8192 * 4 / 1e9:.0f} GB "
        "(4.5 bits per block weight, float32 embedding and head).",
        "- N machines (torchrun): each rank runs 1/N of the rows through the passes and the X^T X sums (the bulk of the "
        "work at 128 x 512 tokens), so those parts shrink N-fold; the four input groups' solves run on up to 4 ranks at "
        "once (the 28,672-wide down_proj one, ~70% of the solve work, bounds it); each block all-reduces its Hessians "
        f"({p70['hessians'] / GiB:.1f} GiB: ~3 s per block at 10 Gbit/s ring all-reduce, ~4 min over 80 blocks) and "
        "broadcasts the codes (~0.5 GB). Memory per rank is the one-machine figure less (N-1)/N of the activations. "
        "Not measured beyond 2 processes on one machine.",
    ])


def _common():
    """bench/common.py, imported by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_common", HERE / "common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def render(res: dict, note: str = "") -> str:
    environment = _common().environment
    lines = ["## Scale: models larger than memory (streaming, block by block)", "",
             f"`python bench/scale.py --part default`, `--part big`, then `--write`; {environment()}. "
             "Peak RSS is the process's ru_maxrss; times are wall clock with other jobs running at the same time "
             "(2 shared cores), so they are upper bounds." + (f" {note}" if note else ""), ""]
    d = res.get("default")
    if d:
        gi = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        lines += [f"**Default model** ({d['model']}, GPTQ W4 g64, {d['calib_samples']} x 512 calibration tokens, "
                  "no before/after measurement):", "",
                  "| path | peak RSS | wall time | output |", "|---|---|---|---|",
                  f"| in memory | {gi(d['in_memory']['peak_rss'])} | {d['in_memory']['seconds']:.0f} s | model.safetensors |",
                  f"| streamed | {gi(d['streamed']['peak_rss'])} | {d['streamed']['seconds']:.0f} s | "
                  f"{d['streamed']['streamed']['blocks'] + 1} shards + index |",
                  "", f"Process baseline (imports, tokenizer, calibration ids): {gi(d['baseline_rss'])}. Same bytes "
                  f"(shards merged vs model.safetensors, and config.json): **{'yes' if d['identical'] else 'NO'}**.", ""]
    b = res.get("big")
    if b and b["blocks"] < BIG["num_hidden_layers"]:  # a smoke run of a few blocks is no figure of the 1.5B model
        lines += [f"**Qwen2-1.5B shapes**: not measured in full yet (the results hold a smoke run of {b['blocks']} "
                  f"block(s) with {b['calib_samples']} x 512 calibration tokens, not reported).", ""]
    elif b:
        r, p = b["run"], b["parts"]
        secs = r["streamed"]["block_seconds"]
        total = p["block_f32"] + p["hessians"] + p["activations"] + p["embedding_stored"] + b["baseline_rss"]
        cap = f"{b['cap'] / GiB:.0f} GiB cgroup cap (memory.limit_in_bytes; the kernel kills the process past it)" \
            if r.get("cgroup_cap") else f"no cgroup could be made: budget {b['cap'] / GiB:.0f} GiB only measured"
        lines += [f"**Qwen2-1.5B shapes, random bf16 weights** ({b['blocks']} blocks, {b['disk_in'] / 1e9:.2f} GB on disk in bf16, "
                  f"{2 * b['disk_in'] / 1e9:.1f} GB in float32), GPTQ W4 g64 streamed under a {cap}; "
                  f"**{b['calib_samples']} x 512 calibration tokens**"
                  + (" (fewer than the 64 x 512 asked, to keep the run short on 2 shared cores)" if b["calib_samples"] < 64 else "")
                  + ":", "",
                  "| part | size |", "|---|---|",
                  f"| process baseline (imports, tokenizer, calibration ids; measured) | {p and b['baseline_rss'] / GiB:.2f} GiB |",
                  f"| largest block in float32 | {p['block_f32'] / GiB:.2f} GiB |",
                  f"| its Hessians (float32) | {p['hessians'] / GiB:.2f} GiB |",
                  f"| calibration activations ({b['calib_samples']} x 512 x 1536, float32) | {p['activations'] / GiB:.2f} GiB |",
                  f"| embedding as stored (bf16) | {p['embedding_stored'] / GiB:.2f} GiB |",
                  f"| **sum of the parts** | **{total / GiB:.2f} GiB** |",
                  f"| **measured peak RSS** | **{r['peak_rss'] / GiB:.2f} GiB ({r['peak_rss'] / total:.2f}x the sum)** |", "",
                  f"Wall time per block: median {sorted(secs)[len(secs) // 2]:.0f} s (min {min(secs):.0f}, max {max(secs):.0f}); "
                  f"{r['seconds'] / 60:.0f} min in all. Output on disk: {r['disk_out'] / 1e9:.2f} GB "
                  f"({r['disk_block_shard'] / 1e6:.1f} MB per block shard; the float32 embedding "
                  f"{BIG['vocab_size'] * 1536 * 4 / 1e9:.2f} GB, as the in-memory path writes it).", "",
                  plan_70b(sorted(secs)[len(secs) // 2], b["calib_samples"]), ""]
    m = res.get("multiprocess")
    if m:
        lines += [m, ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=["default", "big"])
    ap.add_argument("--calib-samples", type=int, default=None, help="default part: 128; big part: 64")
    ap.add_argument("--blocks", type=int, default=28, help="big part: decoder blocks of the written model")
    ap.add_argument("--cap", default="3GiB", help="big part: memory cap (cgroup) and --max-memory")
    ap.add_argument("--work", default="/tmp/lmpress-scale", help="where models and outputs are written")
    ap.add_argument("--note", default="", help="with --write: a sentence on what ran beside the parts")
    ap.add_argument("--write", action="store_true", help="write the 'scale' section of BENCHMARKS.md from the results")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    sys.path.insert(0, str(ROOT))  # not bench/: its kernels.py would shadow the kernels package transformers imports
    from lmpress.stream import parse_size

    res = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.part == "default":
        res["default"] = part_default(args.calib_samples or 128, work)
    elif args.part == "big":
        res["big"] = part_big(args.calib_samples or 64, args.blocks, parse_size(args.cap), work)
    if args.part:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(res, indent=1, sort_keys=True))
        print(json.dumps(res, indent=1, sort_keys=True))
    if args.write:
        _common().write_section("scale", render(res, args.note))


if __name__ == "__main__":
    main()
