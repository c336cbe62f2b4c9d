#!/bin/bash
# Runs `msfp ablation` as two concurrent one-thread workers (2 cores: two single-threaded runs
# finish sooner than one two-threaded run), one (row, seed) task at a time, tasks read as
# "row seed" lines from standard input in order. Results land in OUT/results/ exactly as the
# single command writes them; the last task's aggregate covers every finished result.
#   ... | bash tools/ablation_workers.sh MSFP OUT ablation-args...
# (used by experiments/ablation-*/parallel.sh, which list their tasks)
set -u
MSFP=$1
OUT=$2
shift 2
queue=$(mktemp)
cat > "$queue"
worker() {
  while true; do
    task=$(flock "$queue" bash -c 'head -n1 "$0" && sed -i 1d "$0"' "$queue")
    [ -z "$task" ] && break
    set -- $task "${ARGS[@]}"
    local row=$1 seed=$2
    shift 2
    RAYON_NUM_THREADS=1 "$MSFP" ablation "$@" --out "$OUT" --rows "$row" --seeds "$seed" \
      >> "$OUT/runs/worker-$WORKER.log" 2>&1 || echo "failed: $row $seed" >> "$OUT/runs/worker-$WORKER.log"
  done
}
ARGS=("$@")
mkdir -p "$OUT/runs"
WORKER=a worker & WORKER=b worker & wait
rm -f "$queue"
