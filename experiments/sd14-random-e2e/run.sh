#!/usr/bin/env bash
# The full-size SD1.4 MSFP job end to end with random weights (no weights can be downloaded here).
cd "$(dirname "$0")/../.."
/usr/bin/time -v ./target/debug/msfp train --config configs/msfp_sd14.toml --set model.sd.random_weights=true --set model.sd.resolution=128 --set train.steps=2 --set finetune.calib_samples=1 --set finetune.trajectory_steps=10 --set sampler.steps=10 --set eval.samples=1 --set 'run.out_dir="runs/sd14-random"'
/usr/bin/time -v ./target/debug/msfp sample --config configs/msfp_sd14.toml --set model.sd.random_weights=true --set model.sd.resolution=128 --set sampler.steps=10 --packed runs/sd14-random/model.packed.safetensors --prompt "a red fox sitting in fresh snow" --n 1 --out runs/sd14-random/sample_packed.png
