"""Check lmpress's per-tensor GGUF type rule against llama-quantize itself (--dry-run), type by type.

    python bench/gguf_rule_check.py --llama-quantize /work/peers/llama.cpp/build/bin/llama-quantize

Writes random 30-layer Llama models as F32 GGUF files (temporary; rows of 96, not a multiple of 256,
and an MLP of 256, so the fallbacks and the K types both occur; 3 query heads per key-value head with
tied embeddings, and 4 with an untied head), runs ``llama-quantize --dry-run`` on each for every file type
lmpress writes, and compares the type llama.cpp chose for each tensor with
``lmpress.quant.gguf_mix.plan`` (as without an importance matrix: the dry run is given none). Prints
the mismatches (none expected) and exits 1 if there are any. The rule reads only names and shapes, so
small random weights test it as well as the default model would.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# bench/kernels.py would shadow the `kernels` package transformers probes for: bench/ leaves the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
LINE = re.compile(r"\]\s+(\S+)\s+- \[.*?\], type =\s+(\w+), size = .*?(?:\((\w+)\))?\s*$")


def llama_types(binary: str, f32: Path, ftype: str, out: Path) -> dict[str, str]:
    res = subprocess.run([binary, "--dry-run", str(f32), str(out), ftype], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"llama-quantize {ftype} failed:\n{res.stderr[-2000:]}")
    types = {}
    for line in (res.stdout + res.stderr).splitlines():
        m = LINE.search(line)
        if m:
            types[m.group(1)] = (m.group(3) or m.group(2)).upper()
    return types


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-quantize", required=True)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmpress.formats.gguf import gguf_names, write_gguf
    from lmpress.quant import gguf_mix

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.test_gguf_writer import bpe_tokenizer

    tok, bad = bpe_tokenizer(), 0
    for heads, kv, tied in ((3, 1, True), (4, 1, False)):
        cfg = LlamaConfig(hidden_size=96, intermediate_size=256, num_hidden_layers=30, num_attention_heads=heads,
                          num_key_value_heads=kv, head_dim=32, vocab_size=320, tie_word_embeddings=tied,
                          bos_token_id=1, eos_token_id=2)
        model = AutoModelForCausalLM.from_config(cfg)
        names = gguf_names(model)
        with tempfile.TemporaryDirectory() as tmp:
            f32 = Path(tmp) / "f32.gguf"
            write_gguf(model, tok, f32, "F32", {}, pre="default", types={k: "F32" for k in names})
            for ftype in [*gguf_mix.FTYPES, *gguf_mix.ALIASES]:
                theirs = llama_types(args.llama_quantize, f32, ftype, Path(tmp) / "out.gguf")
                ours = {names[k]: v for k, v in gguf_mix.plan(model, ftype, imatrix=False).items()}
                diff = {k: (v, theirs.get(k)) for k, v in ours.items() if theirs.get(k) != v}
                bad += bool(diff)
                print(f"gqa {heads // kv} tied {tied!s:5} {ftype:7s} {len(ours)} tensors, {len(diff)} differ"
                      + (f": {dict(list(diff.items())[:4])}" if diff else ""), flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
