#!/bin/bash
# The quickstart without x0 clipping (issue 28's protocol for latent models: `sampler.clip_x0 =
# false` in sampling and in the distillation target), on three seeds as
# experiments/quickstart/seeds.sh runs them (`run.seed` = k, `eval.seed` = 1234 + k), with one
# candidate change given as --set overrides:
#   bash experiments/unclipped-finetune/run.sh NAME [--set key=value ...]
# Writes experiments/unclipped-finetune/NAME/seed<k>/{summary.json,error_by_timestep.json,time}
# and NAME/gains.json (PTQ and fine-tuned PSNR vs the teacher per seed, the gain and its spread).
#   MSFP=path/to/msfp to use a built binary; SEEDS="0 1 2" by default; CONFIG=configs/other.toml
#   for another model (default configs/quickstart.toml).
set -euo pipefail
cd "$(dirname "$0")/../.."
name=$1; shift
MSFP=${MSFP:-"cargo run --quiet --"}
dir="experiments/unclipped-finetune/$name"
for seed in ${SEEDS:-0 1 2}; do
  out="runs/unclipped-$name-seed$seed"
  mkdir -p "$dir/seed$seed"
  /usr/bin/time -f "%e s wall, %M KB peak" -o "$dir/seed$seed/time" \
    $MSFP train --config "${CONFIG:-configs/quickstart.toml}" --set sampler.clip_x0=false \
    --set "run.seed=$seed" --set "eval.seed=$((1234 + seed))" --set "run.out_dir=\"$out\"" "$@" \
    > "$out.log" 2>&1 || { tail -20 "$out.log"; exit 1; }
  cp "$out/summary.json" "$out/error_by_timestep.json" "$dir/seed$seed/"
done
python3 - "$dir" "$*" <<'PY'
import json, glob, sys, statistics as st
d, sets = sys.argv[1], sys.argv[2]
rows = []
for f in sorted(glob.glob(f"{d}/seed*/summary.json")):
    s = json.load(open(f))
    rows.append({"seed": int(f.split("seed")[-1].split("/")[0]),
                 "ptq_psnr": s["ptq"]["psnr_vs_teacher"], "finetuned_psnr": s["finetuned"]["psnr_vs_teacher"],
                 "ptq_ssim": s["ptq"]["ssim_vs_teacher"], "finetuned_ssim": s["finetuned"]["ssim_vs_teacher"],
                 "ptq_fid": s["ptq"]["fid"], "finetuned_fid": s["finetuned"]["fid"], "teacher_fid": s["teacher"]["fid"]})
gain = [r["finetuned_psnr"] - r["ptq_psnr"] for r in rows]
out = {"sets": sets, "runs": rows, "gain_db": gain, "gain_min_db": min(gain), "gain_mean_db": st.mean(gain),
       "ptq_psnr_spread_db": max(r["ptq_psnr"] for r in rows) - min(r["ptq_psnr"] for r in rows)}
json.dump(out, open(f"{d}/gains.json", "w"), indent=2)
print(d, "gains", [round(g, 2) for g in gain], "PTQ spread", round(out["ptq_psnr_spread_db"], 2))
PY
