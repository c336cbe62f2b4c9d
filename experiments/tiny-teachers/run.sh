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

# The two teachers train in parallel, one core each (3,500 steps of 32 each, from scratch).
$msfp pretrain --config configs/tiny_unet_mnist.toml --resume auto > runs/pretrain_unet.log 2>&1 &
$msfp pretrain --config configs/tiny_dit_mnist.toml --resume auto > runs/pretrain_dit.log 2>&1 &
wait
# The DiT learns far more slowly than the UNet: three more stages, each warm-started from the
# previous stage's EMA weights with the learning rate raised again (cosine from 1e-3, then 5e-4).
$msfp pretrain --config configs/tiny_dit_mnist.toml --resume auto \
  --set run.out_dir='"runs/tiny_dit_mnist_stage2"' \
  --set train.init_weights='"runs/tiny_dit_mnist/model.safetensors"' \
  --set train.steps=5000 --set train.warmup_steps=100 > runs/pretrain_dit_stage2.log 2>&1
$msfp pretrain --config configs/tiny_dit_mnist.toml --resume auto \
  --set run.out_dir='"runs/tiny_dit_mnist_stage3"' \
  --set train.init_weights='"runs/tiny_dit_mnist_stage2/model.safetensors"' \
  --set train.steps=4000 --set train.warmup_steps=100 --set train.lr=0.0005 > runs/pretrain_dit_stage3.log 2>&1
# Stage 4 (session 7): 8,000 more steps from stage 3, cosine from 1e-3 again ("4b": it beat the
# same run at 5e-4, see README).
$msfp pretrain --config configs/tiny_dit_mnist.toml --resume auto \
  --set run.out_dir='"runs/tiny_dit_mnist_stage4b"' \
  --set train.init_weights='"runs/tiny_dit_mnist_stage3/model.safetensors"' \
  --set train.steps=8000 --set train.warmup_steps=100 --set train.lr=0.001 > runs/pretrain_dit_stage4.log 2>&1
cp runs/tiny_unet_mnist/model.safetensors checkpoints/tiny_unet_mnist.safetensors
cp runs/tiny_dit_mnist_stage4b/model.safetensors checkpoints/tiny_dit_mnist.safetensors
cp runs/tiny_unet_mnist/loss.png experiments/tiny-teachers/tiny_unet_loss.png
cp runs/tiny_dit_mnist_stage4b/loss.png experiments/tiny-teachers/tiny_dit_loss.png

for m in unet dit; do
  $msfp eval --config configs/tiny_${m}_mnist.toml \
    --record experiments/tiny-teachers/results.json --label tiny_${m}
  $msfp sample --config configs/tiny_${m}_mnist.toml --out experiments/tiny-teachers/tiny_${m}_samples.png
done
# Both teachers without guidance (DDPM 100), and the DiT at guidance 1.25: the README's other rows.
for m in unet dit; do
  $msfp eval --config configs/tiny_${m}_mnist.toml --set sampler.guidance_scale=1.0 --set sampler.steps=100 \
    --record experiments/tiny-teachers/results.json --label tiny_${m}_no_guidance_ddpm100
done
$msfp eval --config configs/tiny_dit_mnist.toml --set sampler.guidance_scale=1.25 --set sampler.steps=100 \
  --record experiments/tiny-teachers/results.json --label tiny_dit_guidance1.25_ddpm100
