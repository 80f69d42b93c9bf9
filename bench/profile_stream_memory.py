"""Where a streamed GPTQ run's peak resident memory sits, per stage, and the effect of glibc's mmap
threshold on it (the experiment docs/scale.md reports; the setting itself was reverted).

    python bench/profile_stream_memory.py --rows 128 --heap default   # glibc's adaptive threshold
    python bench/profile_stream_memory.py --rows 128 --heap 1MiB      # mallopt(M_MMAP_THRESHOLD, 1 MiB)

Default model, GPTQ W4 g64, ``--rows`` x 512 calibration tokens, streamed, one thread. A sampler thread
reads the resident size every 10 ms and keeps the highest per stage (stages: the BlockStream steps, the
first inputs, the output's finish; "after X" is the time until the next step starts). Prints ru_maxrss
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
    ap.add_argument("--out", default="/tmp/lmpress-stream-memory")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.heap == "1MiB":
        assert ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20) == 1  # M_MMAP_THRESHOLD
    import lmpress.calib as C
    import lmpress.stream as S
    from lmpress.api import compress
    from lmpress.data import DataConfig
    from lmpress.io import resolve_model_path
    from lmpress.recipe import make_config

    stage, peaks = ["start"], {}

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
            stage[0] = name
            try:
                return f(*a, **k)
            finally:
                stage[0] = f"after {name}"
        setattr(obj, name, g)

    for n in ("resume", "captured", "load", "release", "done"):
        wrap(S.BlockStream, n)
    wrap(S.OutputShards, "finish")
    wrap(C, "first_inputs")
    threading.Thread(target=sample, daemon=True).start()
    stage[0] = "compress"
    _, rep = compress(str(resolve_model_path(None)), [make_config("gptq", bits=4, group_size=64)],
                      data=DataConfig(calib_samples=args.rows, calib_len=512), out=args.out, overwrite=True,
                      measure=False, progress=False, stream=True)
    print(f"heap {args.heap}, {args.rows} x 512: ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3f} GiB")
    for k, v in sorted(peaks.items(), key=lambda kv: -kv[1]):
        print(f"{v / 2**30:.3f} GiB  {k}")
    print(rep["memory"])


if __name__ == "__main__":
    main()
