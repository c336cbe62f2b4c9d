#!/bin/bash
# The HQ-DiT ablation as two concurrent one-thread workers (tools/ablation_workers.sh). Each task
# is the README's command restricted to one (row, seed); results land in results/ exactly as the
# single command writes them, and the last task's aggregate (results.md, claims.md) covers every
# finished result.
#   bash experiments/ablation-hqdit-tiny-dit/parallel.sh [msfp binary]
set -u
cd "$(dirname "$0")/../.."
OUT=experiments/ablation-hqdit-tiny-dit
{
  # The fine-tuning row first: the longest tasks start while the other worker takes the rest.
  for s in 0 1 2; do echo "hqdit_msfp_ft $s"; done
  for s in 0 1 2; do echo "teacher $s"; done
  for row in int4_ptq e2m1_ptq fp4_format_ptq fp4_format_clip_ptq hqdit_ptq w4a8_hqdit; do
    for s in 0 1 2; do echo "$row $s"; done
  done
} | bash tools/ablation_workers.sh "${1:-target/debug/msfp}" $OUT --table hqdit \
  --config configs/hqdit_tiny_dit.toml --set eval.samples=200
