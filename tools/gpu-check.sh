#!/usr/bin/env bash
# The GPU check, run on a GPU machine from the repository root with the binary that
# tools/build-gpu-check.sh made (in gpu-check/, carried; the machine has no Rust toolchain).
# A few minutes: the CUDA parity checks (tiny UNet/DiT forward, the fused quantizer's values and
# gradients, four quickstart QAT steps, all against flex), the fused fake-quant fwd+bwd on 256M
# floats against a copy on the GPU, one tiny-UNet W4A4 QAT step against the same model in
# PyTorch CUDA, and wgpu (Vulkan) on the GPU when the binary has it. Results go to
# ${OUT:-experiments}/bench-cuda/ with the GPU named.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-experiments}/bench-cuda"
mkdir -p "$out"
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
echo "gpu-check: ${gpu:-no nvidia-smi}"
export MSFP_GPU_NAME="$gpu"
bin=gpu-check/msfp-gpu
[ -x "$bin" ] || { xz -dkf gpu-check/msfp-gpu.xz && chmod +x "$bin"; } || { echo "gpu-check: no $bin(.xz): run tools/build-gpu-check.sh first"; exit 2; }
status=0
MSFP_REQUIRE_CUDA=1 MSFP_BENCH_OUT="$out/msfp-cuda.json" timeout 300 "$bin" --parity --device cuda 2>&1 \
  | tee "$out/msfp-cuda.log" || status=1
if command -v python3 >/dev/null && python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  timeout 120 python3 tools/bench/torch_tiny_qat.py --device cuda --json "$out/torch-cuda.json" 2>&1 \
    | tee "$out/torch-cuda.log" || status=1
else
  echo "gpu-check: no PyTorch with CUDA here; the PyTorch baseline is skipped" | tee "$out/torch-cuda.log"
fi
if grep -q wgpu gpu-check/features 2>/dev/null; then
  MSFP_BENCH_OUT="$out/msfp-wgpu.json" timeout 240 "$bin" --device wgpu --elements 67108864 2>&1 \
    | tee "$out/msfp-wgpu.log" || echo "gpu-check: wgpu on the GPU failed (see msfp-wgpu.log)"
fi
echo "$gpu" > "$out/gpu.txt"
echo "gpu-check: done (status $status); results in $out"
exit $status
