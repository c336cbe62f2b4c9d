//! CUDA against the CPU: the tiny UNet and DiT forward close to flex (TF32 tolerance: see
//! `gpu_parity::forward_tolerance`), the fused
//! quantizer's CubeCL kernels with the same values (exact ties included) and STE / LSQ gradients,
//! HQ-DiT's rotation kernel with the same bits, and four QAT steps of the quickstart with the same losses as on flex. Built only
//! with `--features cuda` (or `cuda-llvm`); on a machine without a CUDA GPU each test prints why
//! it skipped and passes. `MSFP_REQUIRE_CUDA=1` turns a skip into a failure (the GPU check
//! script sets it, so a broken driver cannot pass as "no GPU").
#![cfg(feature = "cuda-runtime")]

use burn::tensor::Device;

#[path = "common/gpu_parity.rs"]
mod gpu_parity;

fn cuda_or_skip(test: &str) -> Option<Device> {
    match msfp::device::make_device("cuda") {
        Ok(d) => Some(d),
        Err(e) if std::env::var("MSFP_REQUIRE_CUDA").is_ok_and(|v| v == "1") => {
            panic!("{test}: MSFP_REQUIRE_CUDA=1 but CUDA is not usable: {e}")
        }
        Err(e) => {
            eprintln!("skipping {test}: no usable CUDA GPU here ({e})");
            None
        }
    }
}

#[test]
fn tiny_models_on_cuda_match_flex() {
    if let Some(gpu) = cuda_or_skip("tiny_models_on_cuda_match_flex") {
        gpu_parity::tiny_models_match_flex(&gpu, "cuda");
    }
}

#[test]
fn fused_quantizer_on_cuda_matches_flex() {
    if let Some(gpu) = cuda_or_skip("fused_quantizer_on_cuda_matches_flex") {
        gpu_parity::fused_quantizer_matches_flex(&gpu, "cuda");
    }
}

#[test]
fn fused_quantizer_long_blocks_on_cuda_match_flex() {
    if let Some(gpu) = cuda_or_skip("fused_quantizer_long_blocks_on_cuda_match_flex") {
        gpu_parity::fused_quantizer_long_blocks_match_flex(&gpu, "cuda");
    }
}

#[test]
fn adamw_step_on_cuda_matches_flex() {
    if let Some(gpu) = cuda_or_skip("adamw_step_on_cuda_matches_flex") {
        gpu_parity::adamw_step_matches_flex(&gpu, "cuda");
    }
}

#[test]
fn norms_on_cuda_match_flex() {
    if let Some(gpu) = cuda_or_skip("norms_on_cuda_match_flex") {
        gpu_parity::norms_match_flex(&gpu, "cuda");
    }
}

#[test]
fn softmax_on_cuda_matches_flex() {
    if let Some(gpu) = cuda_or_skip("softmax_on_cuda_matches_flex") {
        gpu_parity::softmax_matches_flex(&gpu, "cuda");
    }
}

#[test]
fn slot_on_cuda_matches_flex() {
    if let Some(gpu) = cuda_or_skip("slot_on_cuda_matches_flex") {
        gpu_parity::slot_matches_flex(&gpu, "cuda");
    }
}

#[test]
fn hadamard_rotation_on_cuda_matches_flex() {
    if let Some(gpu) = cuda_or_skip("hadamard_rotation_on_cuda_matches_flex") {
        gpu_parity::hadamard_rotation_matches_flex(&gpu, "cuda");
    }
}

#[test]
fn quickstart_qat_steps_on_cuda_match_flex() {
    if cuda_or_skip("quickstart_qat_steps_on_cuda_match_flex").is_none() {
        return;
    }
    gpu_parity::quickstart_qat_matches_flex("cuda");
}
