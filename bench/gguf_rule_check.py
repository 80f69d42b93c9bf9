"""Check lmpress's per-tensor GGUF type rule against llama-quantize itself (--dry-run), type by type.

    python bench/gguf_rule_check.py --llama-quantize /work/peers/llama.cpp/build/bin/llama-quantize

Writes the default model as an F32 GGUF (a temporary file), runs ``llama-quantize --dry-run`` on it for
every file type lmpress writes, and compares the type llama.cpp chose for each tensor with
``lmpress.quant.gguf_mix.plan`` (as without an importance matrix: the dry run is given none). Prints
the mismatches (none expected) and exits 1 if there are any.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

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
    import lmpress
    from lmpress.formats.gguf import gguf_names, write_gguf
    from lmpress.quant import gguf_mix

    model, tok = lmpress.load_model()
    names = gguf_names(model)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "f32.gguf"
        write_gguf(model, tok, f32, "F32", {}, types={k: "F32" for k in names})
        for ftype in [*gguf_mix.FTYPES, *gguf_mix.ALIASES]:
            theirs = llama_types(args.llama_quantize, f32, ftype, Path(tmp) / "out.gguf")
            ours = {names[k]: v for k, v in gguf_mix.plan(model, ftype, imatrix=False).items()}
            diff = {k: (v, theirs.get(k)) for k, v in ours.items() if theirs.get(k) != v}
            bad += bool(diff)
            print(f"{ftype:7s} {len(ours)} tensors, {len(diff)} differ" + (f": {dict(list(diff.items())[:4])}" if diff else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
