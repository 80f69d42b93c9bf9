#!/usr/bin/env bash
# Build llama.cpp's command-line tools for the benchmarks from the source vendored in the PyPI sdist of
# llama-cpp-python==0.3.36 (llama.cpp 0c1e57098), the same source `pip install llama-cpp-python` compiles,
# so the tools and the Python bindings run identical kernels. Idempotent: a second run only checks.
#   bash bench/peers/build_llamacpp.sh [DIR]        (default /work/peers/llama.cpp)
# Leaves DIR/bin/{llama-quantize,llama-imatrix,llama-perplexity,llama-bench,llama-completion} and
# DIR/src (the vendored tree: convert_hf_to_gguf.py needs the `gguf` package, which lmpress depends on).
# GGML_NATIVE=ON with AMX off: on these CPUs ggml's AMX path crashes (SIGSEGV) on Q4_0/Q8_0/Q4_K/Q2_K
# files (../shared/PEERS.md), so -mno-amx-* go into the C and C++ flags.
set -euo pipefail
DIR="${1:-${LLAMACPP_DIR:-/work/peers/llama.cpp}}"
VERSION=0.3.36
TOOLS="llama-quantize llama-imatrix llama-perplexity llama-bench llama-completion"
JOBS="${JOBS:-$(nproc)}"

built() { for t in $TOOLS; do [ -x "$DIR/bin/$t" ] || return 1; done; }
if built && [ "$(cat "$DIR/VERSION" 2>/dev/null)" = "llama-cpp-python==$VERSION" ]; then
    echo "llama.cpp tools already built in $DIR/bin"
    exit 0
fi

mkdir -p "$DIR"
if [ ! -f "$DIR/src/CMakeLists.txt" ]; then
    DL="$(mktemp -d "$DIR/dl.XXXXXX")"
    python3 -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$DL"
    tar xzf "$DL/llama_cpp_python-$VERSION.tar.gz" -C "$DL"
    rm -rf "$DIR/src"
    mv "$DL/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DIR/src"
    rm -rf "$DL"
fi

F="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$DIR/src" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$F" -DCMAKE_CXX_FLAGS="$F" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
# shellcheck disable=SC2086
cmake --build "$DIR/build" -j "$JOBS" --target $TOOLS
mkdir -p "$DIR/bin"
for t in $TOOLS; do cp "$DIR/build/bin/$t" "$DIR/bin/$t.tmp" && mv "$DIR/bin/$t.tmp" "$DIR/bin/$t"; done
echo "llama-cpp-python==$VERSION" > "$DIR/VERSION"
"$DIR/bin/llama-quantize" --help 2>&1 | head -n 1 || true
echo "llama.cpp tools built in $DIR/bin"
