#!/usr/bin/env bash
# The GPU check, run on a GPU machine from the repository root with the binary that
# tools/build-gpu-check.sh made (in gpu-check/, carried; the machine has no Rust toolchain).
# A few minutes, each part under its own time limit so that one slow part loses only itself:
#   1. the CUDA parity checks (tiny UNet/DiT forward, the fused quantizer's values and gradients,
#      four quickstart QAT steps, all against flex), the fused fake-quant fwd+bwd on 256M floats
#      against a copy, one tiny-UNet W4A4 QAT step;
#   2. the same tiny QAT step in PyTorch CUDA (tools/bench/torch_tiny_qat.py);
#   3. full-size SD1.4 (random weights): teacher forward, W4A4 student forward and one QAT step at
#      latent ${SD_LATENT:-64}, batch 2, in PyTorch + diffusers (tools/bench/torch_sd14_qat.py;
#      diffusers from wheels in .whl/ when the machine lacks it) and in msfp;
#   4. full-size DiT-XL/2 (random weights) at ${DIT_IMAGE:-256} px, batch 2: fp32 forward, W4A4 forward
#      without and with HQ-DiT's Hadamard rotation, one QAT step with adapters, the rotation's cost;
#   5. wgpu (Vulkan) on the GPU when the binary has it.
# Results go to ${OUT:-experiments}/bench-cuda/ (ten files at most) with the GPU named.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-experiments}/bench-cuda"
mkdir -p "$out"
latent="${SD_LATENT:-64}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1
  command -v nvcc >/dev/null && nvcc --version | tail -2
  nproc
} > "$out/gpu.txt"
gpu=$(head -1 "$out/gpu.txt")
echo "gpu-check: $gpu"
export MSFP_GPU_NAME="$gpu"
# cubecl-cuda compiles its kernels with NVRTC at run time (dlopen'd) and includes CUDA's headers.
if [ -z "${CUDA_PATH:-}" ] && command -v nvcc >/dev/null; then
  export CUDA_PATH=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi
nvrtc_dirs=$(find "${CUDA_PATH:-/usr/local/cuda}"/ /usr/local/cuda*/ /usr/lib/x86_64-linux-gnu \
  -name 'libnvrtc.so*' -not -path '*/stubs/*' -printf '%h\n' 2>/dev/null | sort -u | head -1)
export LD_LIBRARY_PATH="${nvrtc_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "gpu-check: CUDA_PATH=${CUDA_PATH:-unset} nvrtc in ${nvrtc_dirs:-nowhere found}"
bin=gpu-check/msfp-gpu
[ -x "$bin" ] || { xz -dkf gpu-check/msfp-gpu.xz && chmod +x "$bin"; } || { echo "gpu-check: no $bin(.xz): run tools/build-gpu-check.sh first"; exit 2; }
status=0
MSFP_REQUIRE_CUDA=1 MSFP_BENCH_OUT="$out/msfp-cuda.json" timeout "${T_MSFP:-300}" "$bin" --parity --device cuda 2>&1 \
  | tee "$out/msfp-cuda.log" || status=1
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  if ! python3 -c 'import diffusers' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  {
    timeout 90 python3 tools/bench/torch_tiny_qat.py --device cuda --json "$out/torch-cuda.json" || status=1
    timeout "${T_TORCH_SD:-150}" python3 tools/bench/torch_sd14_qat.py --device cuda --latent "$latent" \
      --json "$out/torch-sd14.json" || status=1
  } 2>&1 | tee "$out/torch.log"
else
  echo "gpu-check: no PyTorch with CUDA here; the PyTorch baselines are skipped" | tee "$out/torch.log"
fi
MSFP_BENCH_OUT="$out/msfp-sd14.json" timeout "${T_MSFP_SD:-240}" "$bin" --device cuda --sd-only --sd-latent "$latent" 2>&1 \
  | tee "$out/msfp-sd14.log" || status=1
MSFP_BENCH_OUT="$out/msfp-dit-xl2.json" timeout "${T_MSFP_DIT:-150}" "$bin" --device cuda --dit-only \
  --dit-image "${DIT_IMAGE:-256}" 2>&1 | tee "$out/msfp-dit-xl2.log" || status=1
if grep -q wgpu gpu-check/features 2>/dev/null; then
  MSFP_BENCH_OUT="$out/msfp-wgpu.json" timeout 240 "$bin" --device wgpu --elements 67108864 2>&1 \
    | tail -5 || echo "gpu-check: wgpu on the GPU failed"
fi
echo "gpu-check: done (status $status); results in $out"
exit $status
