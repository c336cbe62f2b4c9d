#!/bin/bash
# The HQ-DiT ablation as two concurrent one-thread workers (2 cores: two single-threaded runs
# finish sooner than one two-threaded run). Each task is the README's command restricted to one
# (row, seed); results land in results/ exactly as the single command writes them, and the last
# task's aggregate (results.md, claims.md) covers every finished result.
#   bash experiments/ablation-hqdit-tiny-dit/parallel.sh [msfp binary]
set -u
cd "$(dirname "$0")/../.."
MSFP=${1:-target/debug/msfp}
OUT=experiments/ablation-hqdit-tiny-dit
tasks=()
# The fine-tuning row first: the longest tasks start while the other worker takes the rest.
for s in 0 1 2; do tasks+=("hqdit_msfp_ft $s"); done
for s in 0 1 2; do tasks+=("teacher $s"); done
for row in int4_ptq e2m1_ptq fp4_format_ptq fp4_format_clip_ptq hqdit_ptq w4a8_hqdit; do
  for s in 0 1 2; do tasks+=("$row $s"); done
done
queue=$(mktemp)
printf '%s\n' "${tasks[@]}" > "$queue"
worker() {
  while true; do
    task=$(flock "$queue" bash -c 'head -n1 "$0" && sed -i 1d "$0"' "$queue")
    [ -z "$task" ] && break
    set -- $task
    RAYON_NUM_THREADS=1 "$MSFP" ablation --table hqdit --config configs/hqdit_tiny_dit.toml \
      --set eval.samples=200 --out $OUT --rows "$1" --seeds "$2" \
      >> "$OUT/runs/worker-$WORKER.log" 2>&1 || echo "failed: $task" >> "$OUT/runs/worker-$WORKER.log"
  done
}
mkdir -p $OUT/runs
WORKER=a worker & WORKER=b worker & wait
rm -f "$queue"
