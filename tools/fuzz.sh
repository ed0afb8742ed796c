#!/usr/bin/env bash
# Fuzz the runtime with libFuzzer (clang, ASan + UBSan): runtime/fuzz/fuzz-loader.c and fuzz-tokenizer.c.
#
#   tools/fuzz.sh [SECONDS] [loader|tokenizer|all]
#
# 1. builds the targets (CMake -DPBS2P_FUZZ=ON with clang) in $PBS2P_FUZZ_BUILD (default build/fuzz),
# 2. regenerates the seed corpus with tools/make_fuzz_corpus.py (valid and corrupted model files, texts),
# 3. replays every seed, and every committed reproducer under runtime/fuzz/regressions/<target>/, once
#    (the regression test: any crash, leak, UB, timeout or >512 MB allocation fails),
# 4. fuzzes for SECONDS in total (default 60; with "all" two thirds go to the loader), growing the work corpus
#    $BUILD/work-<target> across runs, and appends the execution count to $BUILD/fuzz-stats.log.
#
# CI (tools/test.sh) runs the default bounded minute. A long campaign: tools/fuzz.sh 3600 loader.
# SECONDS = 0 replays the corpus only. Exits 0 with a message, doing nothing, when clang/libFuzzer is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SECS=${1:-60}
WHICH=${2:-all}
BUILD=${PBS2P_FUZZ_BUILD:-$ROOT/build/fuzz}
JOBS=${JOBS:-2}
# -malloc_limit_mb: a model of at most 64 KB has no business allocating 512 MB; -timeout catches hangs.
OPTS=(-timeout=10 -malloc_limit_mb=512 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1)

case "$WHICH" in loader|tokenizer) TARGETS=("$WHICH") ;; all) TARGETS=(loader tokenizer) ;;
  *) echo "usage: tools/fuzz.sh [SECONDS] [loader|tokenizer|all]" >&2; exit 2 ;; esac

if ! command -v clang >/dev/null; then
  echo "fuzz: skipped: clang not installed (apt-get install clang)"
  exit 0
fi
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
echo 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { return 0; }' >"$probe/p.c"
if ! clang -fsanitize=fuzzer,address,undefined "$probe/p.c" -o "$probe/p" 2>/dev/null; then
  echo "fuzz: skipped: clang cannot link -fsanitize=fuzzer,address,undefined (libFuzzer / compiler-rt missing)"
  exit 0
fi

CORPUS=$BUILD/corpus
mkdir -p "$BUILD"
rm -rf "$CORPUS"
python3 tools/make_fuzz_corpus.py "$CORPUS"
cmake -S . -B "$BUILD" -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPBS2P_FUZZ=ON \
  -DPBS2P_BUILD_TESTS=OFF -DPBS2P_FUZZ_MODEL="$CORPUS/tokenizer.gguf" >/dev/null
cmake --build "$BUILD" -j"$JOBS" --target "${TARGETS[@]/#/fuzz-}" >/dev/null

export PBS2P_FUZZ_MODEL=$CORPUS/tokenizer.gguf
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
mkdir -p "$BUILD/artifacts"
status=0
for t in "${TARGETS[@]}"; do
  bin=$BUILD/fuzz-$t
  seeds=("$CORPUS/$t")
  [ -d "runtime/fuzz/regressions/$t" ] && seeds+=("$ROOT/runtime/fuzz/regressions/$t")
  n=$(find "${seeds[@]}" -type f | wc -l)
  echo "fuzz-$t: replaying $n seeds and reproducers"
  if ! "$bin" "${OPTS[@]}" -runs=0 "${seeds[@]}" >"$BUILD/replay-$t.log" 2>&1; then
    tail -40 "$BUILD/replay-$t.log"
    echo "fuzz-$t: FAILED on a seed (log: $BUILD/replay-$t.log)"
    status=1
  fi
done
[ "$status" = 0 ] || exit 1

[ "$SECS" -gt 0 ] || exit 0
for t in "${TARGETS[@]}"; do
  secs=$SECS
  if [ ${#TARGETS[@]} -gt 1 ]; then
    [ "$t" = loader ] && secs=$((SECS * 2 / 3)) || secs=$((SECS - SECS * 2 / 3))
  fi
  work=$BUILD/work-$t
  mkdir -p "$work"
  cp -n "$CORPUS/$t"/* "$work"/ 2>/dev/null || true
  log=$BUILD/fuzz-$t.log
  echo "fuzz-$t: fuzzing for $secs s (work corpus $work, log $log)"
  rc=0
  nice "$BUILD/fuzz-$t" "${OPTS[@]}" -max_total_time="$secs" -artifact_prefix="$BUILD/artifacts/$t-" \
    "$work" >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  echo "$(date -u +%FT%TZ) fuzz-$t seconds=$secs execs=${execs:-?} exec_per_s=${rate:-?} rc=$rc" \
    | tee -a "$BUILD/fuzz-stats.log"
  if [ "$rc" != 0 ]; then
    grep -E "ERROR|SUMMARY|Test unit written|^    #[0-9]" "$log" | head -40
    echo "fuzz-$t: CRASH (rc $rc); reproducer under $BUILD/artifacts/, full log $log"
    status=1
  fi
done
total=$(awk '{for (i = 1; i <= NF; i++) if ($i ~ /^execs=/) { split($i, a, "="); s[$2] += a[2] }}
             END {for (k in s) printf "%s %d total executions; ", k, s[k]}' "$BUILD/fuzz-stats.log")
echo "fuzz: $total(all runs in $BUILD/fuzz-stats.log)"
exit $status
