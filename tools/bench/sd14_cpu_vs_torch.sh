#!/usr/bin/env bash
# SD1.4 at full size on the CPU, msfp (benches/sd14_step.rs, flex) against PyTorch + diffusers
# (tools/bench/torch_sd14_qat.py --device cpu), side by side on the same machine and threads: the
# teacher's forward, the W4A4 student's forward and one QAT step, the two programs alternating
# REPEATS times (this VM's speed drifts from minute to minute, so only pairs run close together
# compare). Per repeat: `cpu-vs-torch-{msfp,torch}-rR.json`; the medians and ratios in
# experiments/bench-sd14-step/cpu-vs-torch-latent$LATENT.json.
#
#     PYTHON=/path/to/python-with-torch-and-diffusers [LATENT=32] [REPEATS=2] bash tools/bench/sd14_cpu_vs_torch.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
LATENT=${LATENT:-32}
REPEATS=${REPEATS:-2}
OUT=experiments/bench-sd14-step
TMP=$(mktemp -d)
threads=$(nproc)
cargo bench --profile dev --bench sd14_step --no-run
for r in $(seq 1 "$REPEATS"); do
  MSFP_BENCH_OUT="$TMP/msfp-r$r.json" cargo bench --profile dev --bench sd14_step -- --latent "$LATENT" --runs 3 > /dev/null 2>&1
  OMP_NUM_THREADS=$threads "$PY" tools/bench/torch_sd14_qat.py --device cpu --latent "$LATENT" --batch 1 \
    --runs 3 --warmup 1 --json "$TMP/torch-r$r.json" > /dev/null
done
"$PY" - "$TMP" "$REPEATS" "$OUT/cpu-vs-torch-latent$LATENT.json" "$threads" <<'PY'
import json, statistics, sys
tmp, repeats, out, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
keys = {"teacher_forward": ("teacher_forward_s", "teacher_forward_ms"),
        "student_forward": ("student_forward_s", "student_forward_ms"),
        "qat_step": ("qat_step_s", "qat_step_ms")}
rows = {}
for r in range(1, repeats + 1):
    m = json.load(open(f"{tmp}/msfp-r{r}.json"))
    t = json.load(open(f"{tmp}/torch-r{r}.json"))
    for k, (mk, tk) in keys.items():
        rows.setdefault(k, []).append({"msfp_s": m[mk], "torch_s": t[tk] / 1e3, "ratio": m[mk] / (t[tk] / 1e3)})
summary = {
    "command": "PYTHON=... bash tools/bench/sd14_cpu_vs_torch.sh",
    "threads": threads, "latent": json.load(open(f"{tmp}/msfp-r1.json"))["latent"], "batch": 1,
    "torch": json.load(open(f"{tmp}/torch-r1.json"))["torch"],
    "diffusers": json.load(open(f"{tmp}/torch-r1.json"))["diffusers"],
    "per_repeat": rows,
    "median_ratio_msfp_over_torch": {k: statistics.median(x["ratio"] for x in v) for k, v in rows.items()},
}
open(out, "w").write(json.dumps(summary, indent=1))
print(json.dumps(summary["median_ratio_msfp_over_torch"]))
for k, v in rows.items():
    print(k, [f'{x["msfp_s"]:.2f} s / {x["torch_s"]:.2f} s = {x["ratio"]:.2f}x' for x in v])
PY
