#!/bin/bash
# The ablation as two concurrent one-thread workers (tools/ablation_workers.sh). Each task is the
# README's command restricted to one (row, seed); results land in results/ exactly as the single
# command writes them, and the last task's aggregate (results.md, claims.md) covers every
# finished result.
#   bash experiments/ablation-tiny-unet/parallel.sh [msfp binary]
set -u
cd "$(dirname "$0")/../.."
OUT=experiments/ablation-tiny-unet
{
  for s in 0 1 2; do echo "teacher $s"; done
  for row in msfp_ptq fp4_signed_ptq msfp_lora msfp_talora msfp_full msfp_talora_learned int4_ft \
      msfp_talora_noise msfp_full_noise w4a8_msfp_full w8a8_msfp_full; do
    for s in 0 1 2; do echo "$row $s"; done
  done
} | bash tools/ablation_workers.sh "${1:-target/debug/msfp}" $OUT --config $OUT/config.toml
