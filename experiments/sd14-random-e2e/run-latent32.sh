#!/usr/bin/env bash
# The full-size SD1.4 MSFP job end to end with random weights at 256 px (latent 32 x 32), one
# sample per fine-tuning pass (finetune.micro_batch = 1) so that it fits in 24 GB.
cd "$(dirname "$0")/../.."
set -e
out=runs/sd14-random-l32
common=(--config configs/msfp_sd14.toml --set model.sd.random_weights=true --set model.sd.resolution=256 --set sampler.steps=10)
/usr/bin/time -v ./target/debug/msfp train "${common[@]}" --set train.steps=2 --set finetune.calib_samples=1 \
  --set finetune.trajectory_steps=10 --set finetune.micro_batch=1 --set eval.samples=1 --set "run.out_dir=\"$out\""
/usr/bin/time -v ./target/debug/msfp sample "${common[@]}" --packed $out/model.packed.safetensors \
  --prompt "a red fox sitting in fresh snow" --n 1 --out $out/sample_packed.png
