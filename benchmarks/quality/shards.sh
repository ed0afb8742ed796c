#!/bin/bash
# Run several benchmarks/quality/run.py processes side by side on one accelerator (on the 1.5B run, six shards
# kept one H200 ~100 % busy), then merge their results.
#
#   benchmarks/quality/shards.sh MODEL OUTDIR NSAMPLES SEQLEN EVALWIN EVALSEQ THREADS "cfg,cfg" "cfg,cfg" ...
#
# One shard per quoted config list. Each shard holds its own copy of the original weights on the device
# (--original device): ~7 GB per shard for a 1.5B model. Results go to OUTDIR/results.jsonl (merged every 15 s
# and at the end, so a run stopped by a time limit keeps what finished), the tail of each shard's log to
# OUTDIR/logs.txt. Environment: DEVICE (default cuda), CALIB and WIKI (default ../shared/data's files).
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
M=$1; O=$2; NS=$3; SL=$4; EW=$5; ES=$6; TH=$7; shift 7
DEVICE=${DEVICE:-cuda}
CALIB=${CALIB:-$root/../shared/data/c4/c4-train.00000-of-01024.first1000.jsonl}
WIKI=${WIKI:-$root/../shared/data/wikitext-2-raw/wiki.test.raw}
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
mkdir -p "$O"
work=$(mktemp -d)
pids=()
i=0
for cfgs in "$@"; do
  python3 "$here/run.py" "$M" --configs "$cfgs" --out "$work/r$i.jsonl" --calib "$CALIB" --wiki "$WIKI" \
    --nsamples "$NS" --seqlen "$SL" --eval-windows "$EW" --eval-seqlen "$ES" --threads "$TH" --device "$DEVICE" \
    --quiet --scratch "$work/s$i" --original device > "$work/log$i.txt" 2>&1 &
  pids+=($!)
  i=$((i + 1))
done
collect() {
  cat "$work"/r*.jsonl > "$O/results.jsonl" 2>/dev/null
  for f in "$work"/log*.txt; do
    echo "== shard $(basename "$f" .txt)"
    grep -v '^{' "$f" | tr '\r' '\n' | grep -v '^Loading\|^Converting\|^$' | tail -n 8
  done > "$O/logs.txt"
}
( while sleep 15; do collect; echo "$(date +%T) $(cat "$work"/r*.jsonl 2>/dev/null | wc -l) configs done"; done ) &
mon=$!
wait "${pids[@]}"
kill $mon
collect
cat "$O/logs.txt"
rm -rf "$work"
