#!/usr/bin/env bash
# Trains the MNIST classifier and both tiny teachers from scratch on the CPU, ships their weights
# under checkpoints/, and evaluates the teachers into experiments/tiny-teachers/results.json.
# Every step resumes (`--resume auto`), so the script can be interrupted and run again.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build
msfp=target/debug/msfp
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1}

$msfp train-classifier --config configs/mnist_classifier.toml
cp runs/mnist_classifier/classifier.safetensors checkpoints/mnist_classifier.safetensors

# The two teachers train in parallel, one core each.
$msfp pretrain --config configs/tiny_unet_mnist.toml --resume auto > runs/pretrain_unet.log 2>&1 &
$msfp pretrain --config configs/tiny_dit_mnist.toml --resume auto > runs/pretrain_dit.log 2>&1 &
wait
cp runs/tiny_dit_mnist/model.safetensors checkpoints/tiny_dit_mnist.safetensors

# UNet stage 2: warm start from stage 1's EMA weights for 3,000 more steps (LR 1e-3, EMA 0.999).
cp runs/tiny_unet_mnist/model.safetensors runs/tiny_unet_stage1.safetensors
$msfp pretrain --config configs/tiny_unet_mnist.toml --resume auto \
  --set run.out_dir='"runs/tiny_unet_stage2"' --set train.init_weights='"runs/tiny_unet_stage1.safetensors"' \
  --set train.steps=3000 --set train.lr=1e-3 --set train.warmup_steps=50 --set train.ema_decay=0.999
cp runs/tiny_unet_stage2/model.safetensors checkpoints/tiny_unet_mnist.safetensors

for m in unet dit; do
  $msfp eval --config configs/tiny_${m}_mnist.toml \
    --record experiments/tiny-teachers/results.json --label tiny_${m}
  $msfp sample --config configs/tiny_${m}_mnist.toml --out experiments/tiny-teachers/tiny_${m}_samples.png
done
