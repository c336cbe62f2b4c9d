#!/usr/bin/env bash
# What a second core buys the tiny teachers in msfp (benches/second_core.rs) and in the PyTorch
# replica (tools/bench/second_core_torch.py), side by side: each times short child processes at
# one and at two threads alternately (8 rounds, the order flipped every round), and the two
# programs alternate REPEATS times. Per repeat: `second-core-{msfp,torch}-rR.json`; the table
# (speedups and times, median over repeats) in experiments/bench-tiny-step/second-core.json.
#
#     PYTHON=/path/to/python-with-torch [REPEATS=2] bash tools/bench/second_core.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=experiments/bench-tiny-step
REPEATS=${REPEATS:-2}
cargo bench --profile dev --bench second_core --no-run
for r in $(seq 1 "$REPEATS"); do
  cargo bench --profile dev --bench second_core > /dev/null 2>&1
  mv "$OUT/second-core-msfp.json" "$OUT/second-core-msfp-r$r.json"
  "$PY" tools/bench/second_core_torch.py --json "$OUT/second-core-torch-r$r.json" > /dev/null
done
"$PY" - "$OUT" "$REPEATS" <<'PY'
import json, statistics, sys
out, repeats = sys.argv[1], int(sys.argv[2])
runs = {p: [{r["model"]: r for r in json.load(open(f"{out}/second-core-{p}-r{i}.json"))["results"]}
            for i in range(1, repeats + 1)] for p in ("msfp", "torch")}
rows = []
print("| model | measure | msfp 1 / 2 threads ms | PyTorch 1 / 2 threads ms | ratio 1 / 2 threads | 2nd core msfp / PyTorch |")
print("|---|---|---|---|---|---|")
for model in ("tiny_unet", "tiny_dit"):
    for key in ("train_step", "forward"):
        med = {p: {f: statistics.median(r[model][key][f] for r in runs[p]) for f in ("ms_1_thread", "ms_n_threads", "speedup")}
               for p in runs}
        row = dict(model=model, measure=key, msfp=med["msfp"], pytorch=med["torch"],
                   ratio_1_thread=med["msfp"]["ms_1_thread"] / med["torch"]["ms_1_thread"],
                   ratio_2_threads=med["msfp"]["ms_n_threads"] / med["torch"]["ms_n_threads"],
                   msfp_speedups=[r[model][key]["speedup"] for r in runs["msfp"]],
                   pytorch_speedups=[r[model][key]["speedup"] for r in runs["torch"]])
        rows.append(row)
        m, t = med["msfp"], med["torch"]
        print(f'| {model} | {key.replace("_", " ")} | {m["ms_1_thread"]:.1f} / {m["ms_n_threads"]:.1f} | '
              f'{t["ms_1_thread"]:.1f} / {t["ms_n_threads"]:.1f} | {row["ratio_1_thread"]:.2f}x / {row["ratio_2_threads"]:.2f}x | '
              f'{m["speedup"]:.2f}x / {t["speedup"]:.2f}x |')
json.dump(dict(command="PYTHON=... bash tools/bench/second_core.sh", repeats=repeats, rows=rows),
          open(f"{out}/second-core.json", "w"), indent=1)
PY
