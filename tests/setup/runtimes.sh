#!/usr/bin/env bash
# What the tests run besides Python packages, installed the way README's test command (and so CI) does:
#  - llama.cpp through llama-cpp-python, built from its source distribution with a small test build: only the
#    libraries the Python package loads (tests/setup/llama_cpp_minimal.cmake), no multimodal library, no llamafile
#    kernels, -O1. pip keeps the built wheel in its cache, so only the first install on a machine compiles.
#    `pip install 'finetune[gguf]'` without these flags gives the full -O3 build.
#  - Chromium (Debian's package) for the report test, when this runs as root with apt-get; otherwise that test skips
#    and says why.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! python -c "import llama_cpp" 2>/dev/null; then
  start=$SECONDS
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_LLAMAFILE=OFF -DCMAKE_C_FLAGS_RELEASE=-O1 -DCMAKE_CXX_FLAGS_RELEASE=-O1 \
-DCMAKE_PROJECT_llama.cpp_INCLUDE=$here/llama_cpp_minimal.cmake" \
    python -m pip install "llama-cpp-python==0.3.36"
  echo "runtimes: llama-cpp-python installed in $((SECONDS - start)) s"
fi
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    start=$SECONDS
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    echo "runtimes: chromium installed in $((SECONDS - start)) s"
  else
    echo "runtimes: no chromium and no root apt-get here: the report's browser test will skip"
  fi
fi
