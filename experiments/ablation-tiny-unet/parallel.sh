#!/bin/bash
# The ablation as two concurrent one-thread workers (2 cores: two single-threaded runs finish
# sooner than one two-threaded run). Each task is the README's command restricted to one
# (row, seed); results land in results/ exactly as the single command writes them, and the last
# task's aggregate (results.md, claims.md) covers every finished result.
#   bash experiments/ablation-tiny-unet/parallel.sh [msfp binary]
set -u
cd "$(dirname "$0")/../.."
MSFP=${1:-target/debug/msfp}
OUT=experiments/ablation-tiny-unet
tasks=()
for s in 0 1 2; do tasks+=("teacher $s"); done
for row in msfp_ptq fp4_signed_ptq msfp_lora msfp_talora msfp_full msfp_talora_learned int4_ft \
    msfp_talora_noise msfp_full_noise w4a8_msfp_full w8a8_msfp_full; do
  for s in 0 1 2; do tasks+=("$row $s"); done
done
queue=$(mktemp)
printf '%s\n' "${tasks[@]}" > "$queue"
worker() {
  while true; do
    task=$(flock "$queue" bash -c 'head -n1 "$0" && sed -i 1d "$0"' "$queue")
    [ -z "$task" ] && break
    set -- $task
    RAYON_NUM_THREADS=1 "$MSFP" ablation --config $OUT/config.toml --out $OUT --rows "$1" --seeds "$2" \
      >> "$OUT/runs/worker-$WORKER.log" 2>&1 || echo "failed: $task" >> "$OUT/runs/worker-$WORKER.log"
  done
}
mkdir -p $OUT/runs
WORKER=a worker & WORKER=b worker & wait
rm -f "$queue"
