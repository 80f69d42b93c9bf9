"""Run under ``torchrun --nproc-per-node N`` by tests/test_distributed.py: compress a saved tiny model
with one method config on N processes, then write each rank's compressed state digest (and rank 0's
perplexity on a fixed token stream) to OUT/rank<r>.json. With N = 1 it runs without torchrun. With a
fifth argument ``stream`` the compression streams block by block into OUT/model, and the figures are
of that folder as loaded back (on every rank, once rank 0 has written it)."""

import hashlib
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from lmpress import recipe as rc  # noqa: E402
from lmpress.api import compress  # noqa: E402
from lmpress.data import DataConfig  # noqa: E402
from lmpress.distill.parallel import dist_setup  # noqa: E402
from lmpress.evaluate import perplexity  # noqa: E402


def main(src: str, corpus: str, out: str, cfg: str, mode: str = "memory") -> None:
    rank, world = dist_setup()
    data = DataConfig(corpus=corpus, calib_samples=32, calib_len=32, eval_tokens=256)
    if mode == "stream":
        from lmpress.io import load_model

        compress(src, [rc.from_dict(json.loads(cfg))], data=data, out=str(Path(out, "model")), stream=True,
                 measure=False, progress=False)
        model, _ = load_model(str(Path(out, "model")))
    else:
        model, _ = compress(src, [rc.from_dict(json.loads(cfg))], data=data, measure=False, progress=False)
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    stream = torch.randint(3, 200, (1024,), generator=torch.Generator().manual_seed(5))
    res = {"world": world, "digest": h.hexdigest(), "ppl": perplexity(model, stream, context=64, bos=1, progress=False).ppl,
           "state": {k: v.float().tolist() for k, v in model.state_dict().items() if k.endswith(("qweight", "weight"))
                     and "layers.0.mlp.down_proj" in k}}
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main(*sys.argv[1:6])
