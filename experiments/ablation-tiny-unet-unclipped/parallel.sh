#!/bin/bash
# The unclipped ablation as two concurrent one-thread workers (tools/ablation_workers.sh), the
# rows MSFP's claims compare, seed by seed (so a cut-off run leaves whole seeds). Results land in
# results/ exactly as `msfp ablation` writes them, and resume per (row, seed).
#   bash experiments/ablation-tiny-unet-unclipped/parallel.sh [msfp binary]
set -u
cd "$(dirname "$0")/../.."
OUT=experiments/ablation-tiny-unet-unclipped
{
  for s in 0 1 2; do
    for row in teacher msfp_ptq msfp_lora msfp_talora msfp_full fp4_signed_ptq int4_ft; do echo "$row $s"; done
  done
} | bash tools/ablation_workers.sh "${1:-target/debug/msfp}" $OUT --config $OUT/config.toml
