#!/bin/sh
# Build and run the kernel benchmark against the repository sources (single thread, GEMV and 8-token GEMM),
# write results.csv next to the binary and, if matplotlib is importable, the plot (plot.py).
set -e
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${TMPDIR:-/tmp}/pbs2p-bench-kernels
gcc -std=c11 -D_GNU_SOURCE -O2 -ffp-contract=off -I"$ROOT/runtime/include" -I"$ROOT/runtime/src" \
    "$ROOT/benchmarks/kernels/bench-kernels.c" "$ROOT/runtime/src/kernels-ref.c" "$ROOT/runtime/src/kernels.c" \
    "$ROOT/runtime/src/kernels-x86.c" "$ROOT/runtime/src/kernels-arm.c" "$ROOT/runtime/src/common.c" \
    -o "$OUT" -lpthread -lm
echo "load: $(uptime)"
"$OUT" "$OUT.csv"
echo "load: $(uptime)"
if python3 -c "import matplotlib" 2>/dev/null; then
    python3 "$ROOT/benchmarks/kernels/plot.py" "$OUT.csv" "${PLOT:-$OUT.png}"
fi
