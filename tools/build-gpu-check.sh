#!/usr/bin/env bash
# Builds, here on a CPU machine, what tools/gpu-check.sh runs on a GPU machine (which has no Rust
# toolchain and takes at most 64 MiB of carried files): the `gpu` bench binary with `--features
# cuda` (it holds the parity checks of tests/cuda_parity.rs and the measurements), stripped and
# xz-compressed into gpu-check/msfp-gpu.xz (git-ignored; carry `gpu-check`).
#   tools/build-gpu-check.sh            # cuda (NVRTC)
#   FEATURES=cuda,wgpu tools/build-gpu-check.sh   # also wgpu (Vulkan) on the GPU
set -euo pipefail
cd "$(dirname "$0")/.."
features="${FEATURES:-cuda}"
tools/setup-cuda-build.sh
exe=$(cargo bench --profile dev --features "$features" --bench gpu --no-run --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4)
[ -x "$exe" ] || { echo "build-gpu-check: no bench executable built"; exit 1; }
mkdir -p gpu-check
strip -o gpu-check/msfp-gpu "$exe"
xz -T2 -6 -f gpu-check/msfp-gpu
echo "$features" > gpu-check/features
ls -l gpu-check
