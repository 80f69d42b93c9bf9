#!/usr/bin/env bash
# Install llm-compressor into its own virtual environment, outside the repository (idempotent).
# Its pins (transformers 5.15-5.17, compressed-tensors) clash with lmpress's, so it never shares a venv.
# CPU torch stays pinned (torch==2.13.0) so pip does not pull a multi-GB CUDA build.
#   bash bench/peers/setup_llmcompressor.sh [VENV]      (default /work/peers/llmc)
set -euo pipefail
VENV="${1:-${LLMC_VENV:-/work/peers/llmc}}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llmcompressor, torch; assert torch.__version__.startswith('2.13.0')" >/dev/null 2>&1; then
    echo "llm-compressor already installed in $VENV"
    exit 0
fi
python3 -m venv "$VENV"
CONSTRAINTS="$(mktemp)"
echo "torch==2.13.0" > "$CONSTRAINTS"
"$VENV/bin/pip" install -q "llmcompressor" "torch==2.13.0" "numpy" -c "$CONSTRAINTS"
rm -f "$CONSTRAINTS"
"$VENV/bin/python" -c "import llmcompressor, torch; print('llm-compressor', llmcompressor.__version__, 'torch', torch.__version__)"
