#!/bin/bash
# The quickstart on three seeds: `run.seed` (calibration data, adapter initialisation, the
# fine-tuning trajectories) and the evaluation noise (`eval.seed = 1234 + seed`) both change.
# Each run's summary.json and error_by_timestep.json are copied to experiments/quickstart/seed<k>/
# and seeds.json collects PTQ and fine-tuned PSNR / SSIM against the teacher.
#   bash experiments/quickstart/seeds.sh            (MSFP=path/to/msfp to use a built binary)
set -euo pipefail
cd "$(dirname "$0")/../.."
MSFP=${MSFP:-"cargo run --quiet --"}
for seed in ${SEEDS:-0 1 2}; do
  out="runs/quickstart-seed$seed"
  /usr/bin/time -f "%e s wall, %M KB peak" -o "$out.time" \
    $MSFP train --config configs/quickstart.toml --set "run.seed=$seed" --set "eval.seed=$((1234 + seed))" \
    --set "run.out_dir=\"$out\"" > "$out.log" 2>&1 || { cat "$out.log"; exit 1; }
  mkdir -p "experiments/quickstart/seed$seed"
  cp "$out/summary.json" "$out/error_by_timestep.json" "$out/error_by_timestep.png" \
    "$out/drift_by_timestep.png" "$out/samples.png" "$out.time" "experiments/quickstart/seed$seed/"
done
python3 - <<'PY'
import json, glob, statistics as st
rows = []
for d in sorted(glob.glob("experiments/quickstart/seed*/summary.json")):
    s = json.load(open(d))
    seed = int(d.split("seed")[1].split("/")[0])
    rows.append({"seed": seed,
                 "ptq_psnr": s["ptq"]["psnr_vs_teacher"], "finetuned_psnr": s["finetuned"]["psnr_vs_teacher"],
                 "ptq_ssim": s["ptq"]["ssim_vs_teacher"], "finetuned_ssim": s["finetuned"]["ssim_vs_teacher"],
                 "teacher_fid": s["teacher"]["fid"], "ptq_fid": s["ptq"]["fid"], "finetuned_fid": s["finetuned"]["fid"],
                 "eps_mse_vs_teacher": s["eps_mse_vs_teacher"], "seconds": s["seconds"]})
gain = [r["finetuned_psnr"] - r["ptq_psnr"] for r in rows]
summary = {"runs": rows,
           "ptq_psnr_mean": st.mean(r["ptq_psnr"] for r in rows),
           "ptq_psnr_std": st.stdev(r["ptq_psnr"] for r in rows) if len(rows) > 1 else None,
           "finetuned_psnr_mean": st.mean(r["finetuned_psnr"] for r in rows),
           "finetuned_psnr_std": st.stdev(r["finetuned_psnr"] for r in rows) if len(rows) > 1 else None,
           "gain_db": gain}
json.dump(summary, open("experiments/quickstart/seeds.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
PY
