"""Where a streamed GPTQ run's peak resident memory sits, per stage, and the effect of glibc's mmap
threshold on it (the experiment docs/scale.md reports; the setting itself was reverted).

    python bench/profile_stream_memory.py --rows 128 --heap default   # glibc's adaptive threshold
    python bench/profile_stream_memory.py --rows 128 --heap 1MiB      # mallopt(M_MMAP_THRESHOLD, 1 MiB)
    python bench/profile_stream_memory.py --rows 128 --batch 2        # block passes over batches of 2 rows
    python bench/profile_stream_memory.py --rows 128 --blocks 6       # the default model's first 6 blocks only
    python bench/profile_stream_memory.py --rows 64 --model /tmp/lmpress-scale/qwen2-1.5b-shapes-2blocks

``--blocks K`` writes (once) a copy of the default model cut to its first K blocks: a block pass's peak
does not depend on the number of blocks, and the whole model at one thread takes about an hour.

Default model, GPTQ W4 g64, ``--rows`` x 512 calibration tokens, streamed, one thread. A sampler thread
reads the resident size every 10 ms and keeps the highest per stage (stages: the BlockStream steps, the
first inputs, the output's finish, and inside a block the statistics pass, GPTQ's inverse Hessian and solve,
the outputs for the next block; "after X" is the time until the next step starts). Prints ru_maxrss
and the per-stage peaks.
"""

import argparse
import ctypes
import resource
import threading
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--heap", choices=["default", "1MiB"], default="default")
    ap.add_argument("--batch", type=int, default=None, help="rows per block-pass batch (default: walk_blocks' own)")
    ap.add_argument("--blocks", type=int, default=None, help="the default model cut to its first K blocks")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="another model folder (e.g. bench/scale.py's Qwen2-1.5B shapes)")
    ap.add_argument("--by-block", action="store_true", help="the stages of each block apart")
    ap.add_argument("--out", default="/tmp/lmpress-stream-memory")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.heap == "1MiB":
        assert ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20) == 1  # M_MMAP_THRESHOLD
    import lmpress.calib as C
    import lmpress.stream as S
    from lmpress.api import compress
    from lmpress.data import DataConfig
    from lmpress.recipe import make_config

    if args.batch:
        C.walk_blocks.__kwdefaults__["batch_size"] = args.batch
    stage, peaks, block = ["start"], {}, [""]

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def sample():
        while True:
            peaks[stage[0]] = max(peaks.get(stage[0], 0), rss())
            time.sleep(0.01)

    def wrap(obj, name):
        f = getattr(obj, name)

        def g(*a, **k):
            if name == "load" and args.by_block:  # every stage of each block's turn on its own
                block[0] = f"block {a[1]:02d}: "
            elif name == "done":
                block[0] = ""
            stage[0] = block[0] + name
            try:
                return f(*a, **k)
            finally:
                stage[0] = f"{block[0]}after {name}"
        setattr(obj, name, g)

    for n in ("resume", "captured", "load", "release", "done"):
        wrap(S.BlockStream, n)
    wrap(S.OutputShards, "finish")
    wrap(C, "first_inputs")
    import lmpress.quant.gptq as G
    import lmpress.stats as St

    wrap(St, "collect")  # inside a block: statistics pass, the solve's parts, the outputs for the next block
    wrap(G, "inverse_hessian")
    wrap(G, "gptq_solve")
    wrap(C.BlockContext, "advance")
    path = args.model or model_path(args.blocks)  # before the sampler: a cut copy is written in a child process
    threading.Thread(target=sample, daemon=True).start()
    stage[0] = "compress"
    t0 = time.perf_counter()
    _, rep = compress(str(path), [make_config("gptq", bits=4, group_size=64)],
                      data=DataConfig(calib_samples=args.rows, calib_len=512), out=args.out, overwrite=True,
                      measure=False, progress=False, stream=True)
    print(f"heap {args.heap}, batch {C.walk_blocks.__kwdefaults__['batch_size']}, {args.rows} x 512: ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3f} GiB, "
          f"{time.perf_counter() - t0:.0f} s")
    for k, v in sorted(peaks.items(), key=lambda kv: -kv[1]):
        print(f"{v / 2**30:.3f} GiB  {k}")
    print(rep["memory"])


def model_path(blocks: int | None):
    """The default model's folder, or a copy of it cut to its first ``blocks`` blocks (written once, by
    a child process, so that reading the whole model leaves this process's peak alone)."""
    import subprocess
    import sys
    from pathlib import Path

    from lmpress.io import resolve_model_path

    if not blocks:
        return resolve_model_path(None)
    dst = Path(f"/tmp/lmpress-profile-model-{blocks}")
    if not dst.exists():
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import profile_stream_memory as p; p.write_cut({blocks}, {str(dst)!r})"], check=True)
    return dst


def write_cut(blocks: int, dst: str) -> None:
    """The default model with its first ``blocks`` decoder blocks only, written to ``dst``."""
    import json
    import shutil
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import save_file

    from lmpress.io import resolve_model_path

    src, dst = resolve_model_path(None), Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["num_hidden_layers"] = blocks
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        keep = {k: f.get_tensor(k) for k in f.keys()
                if not k.startswith("model.layers.") or int(k.split(".")[2]) < blocks}
    save_file(keep, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(dst)


if __name__ == "__main__":
    main()
