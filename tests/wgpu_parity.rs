//! The GPU code path against the CPU: the tiny UNet and DiT (full precision, perturbed weights)
//! on `wgpu-cpu` (Mesa lavapipe, the wgpu backend on a machine without a GPU) give the same
//! output as on flex within 1e-4, and the fused quantizer's kernels the same values and
//! gradients, and HQ-DiT's rotation kernel the same bits. Built only with `--features wgpu`.
#![cfg(feature = "wgpu")]

#[path = "common/gpu_parity.rs"]
mod gpu_parity;

fn lavapipe() -> burn::tensor::Device {
    msfp::device::make_device("wgpu-cpu")
        .unwrap_or_else(|e| panic!("wgpu-cpu is not available ({e}); install mesa-vulkan-drivers"))
}

#[test]
fn tiny_models_on_wgpu_cpu_match_flex() {
    gpu_parity::tiny_models_match_flex(&lavapipe(), "wgpu-cpu");
}

#[test]
fn fused_quantizer_on_wgpu_cpu_matches_flex() {
    gpu_parity::fused_quantizer_matches_flex(&lavapipe(), "wgpu-cpu");
}

#[test]
fn fused_quantizer_long_blocks_on_wgpu_cpu_match_flex() {
    gpu_parity::fused_quantizer_long_blocks_match_flex(&lavapipe(), "wgpu-cpu");
}

#[test]
fn adamw_step_on_wgpu_cpu_matches_flex() {
    gpu_parity::adamw_step_matches_flex(&lavapipe(), "wgpu-cpu");
}

#[test]
fn norms_on_wgpu_cpu_match_flex() {
    gpu_parity::norms_match_flex(&lavapipe(), "wgpu-cpu");
}

#[test]
fn softmax_on_wgpu_cpu_matches_flex() {
    gpu_parity::softmax_matches_flex(&lavapipe(), "wgpu-cpu");
}

#[test]
fn slot_on_wgpu_cpu_matches_flex() {
    gpu_parity::slot_matches_flex(&lavapipe(), "wgpu-cpu");
}

#[test]
fn hadamard_rotation_on_wgpu_cpu_matches_flex() {
    gpu_parity::hadamard_rotation_matches_flex(&lavapipe(), "wgpu-cpu");
}
