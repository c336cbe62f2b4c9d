#!/usr/bin/env bash
# The tiny teachers' forward and training step in msfp (benches/tiny_step.rs) and in the PyTorch
# replica (../shared/tools/torch_tiny_replica.py, same parameter counts), interleaved at 1 and
# 2 threads on an idle machine, ROUNDS times (this VM's speed drifts by tens of percent over
# minutes, so each figure is the median over rounds of each run's median); ratios in
# experiments/bench-tiny-step/summary.json.
#
#     PYTHON=/path/to/python-with-torch [ROUNDS=3] bash tools/bench/tiny_step_vs_torch.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
REPLICA=${REPLICA:-../shared/tools/torch_tiny_replica.py}
OUT=experiments/bench-tiny-step
mkdir -p "$OUT"
cargo bench --profile dev --bench tiny_step --no-run
ROUNDS=${ROUNDS:-3}
for r in $(seq 1 "$ROUNDS"); do
  for t in 1 2; do
    "$PY" "$REPLICA" --threads "$t" --runs 9 --json "$OUT/torch-${t}t-r$r.json" > /dev/null
    RAYON_NUM_THREADS=$t cargo bench --profile dev --bench tiny_step -- --measurement-time 10 > /dev/null 2>&1
    cp "$OUT/results.json" "$OUT/msfp-${t}t-r$r.json"
  done
done
"$PY" - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rows = []
for t in (1, 2):
    torch = [{r["model"]: r for r in json.load(open(f"{out}/torch-{t}t-r{i}.json"))["rows"]} for i in range(1, rounds + 1)]
    msfp = [{r["model"]: r for r in json.load(open(f"{out}/msfp-{t}t-r{i}.json"))["results"]} for i in range(1, rounds + 1)]
    for model in ("tiny_unet", "tiny_dit"):
        for what, m_key, t_key in (("forward", "forward_ms", "forward_ms_median"), ("train step", "train_step_ms", "train_step_ms_median")):
            ms = [r[model][m_key] for r in msfp]
            ps = [r[model][t_key] for r in torch]
            m, p = statistics.median(ms), statistics.median(ps)
            rows.append(dict(model=model, measure=what, threads=t, msfp_ms=round(m, 1), pytorch_ms=round(p, 1), ratio=round(m / p, 2),
                             msfp_rounds=[round(v, 1) for v in ms], pytorch_rounds=[round(v, 1) for v in ps]))
for model in ("tiny_unet", "tiny_dit"):
    for what in ("forward", "train step"):
        one, two = (next(r for r in rows if r["model"] == model and r["measure"] == what and r["threads"] == t) for t in (1, 2))
        two["msfp_speedup_from_second_core"] = round(one["msfp_ms"] / two["msfp_ms"], 2)
        two["pytorch_speedup_from_second_core"] = round(one["pytorch_ms"] / two["pytorch_ms"], 2)
json.dump(dict(command="PYTHON=... bash tools/bench/tiny_step_vs_torch.sh", rounds=rounds, rows=rows), open(f"{out}/summary.json", "w"), indent=1)
print("| model | measure | threads | msfp ms | PyTorch ms | ratio | 2nd core msfp / PyTorch |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    sc = f'{r["msfp_speedup_from_second_core"]}x / {r["pytorch_speedup_from_second_core"]}x' if r["threads"] == 2 else ""
    print(f'| {r["model"]} | {r["measure"]} | {r["threads"]} | {r["msfp_ms"]} | {r["pytorch_ms"]} | {r["ratio"]}x | {sc} |')
PY
