//! The full-size SD1.4 UNet (random weights) and its W4A4 student as the benches measure them
//! (`sd14_step` on flex, `gpu --sd-latent` on CUDA): the job's structure
//! (`configs/msfp_sd14.toml`, built by `student.rs`: conv_in and conv_out at e4m3, TALoRA 2
//! adapters of rank 16, branch placement) with plausible scales instead of calibrated ones.
//! `tools/bench/torch_sd14_qat.py` builds the same student in PyTorch + diffusers.

#![allow(dead_code)] // each bench uses part of it

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use msfp::base::params;
use msfp::lora::{LoraConfig, Placement, RouterKind};
use msfp::models::{Cond, Denoiser};
use msfp::nn::StepCtx;
use msfp::pipeline::student::StudentPlan;
use msfp::rng::SeededRng;
use msfp::train::optim::AdamW;

#[path = "student.rs"]
mod student;

/// `configs/msfp_sd14.toml` with random weights at `latent` (the image is 8x larger).
pub fn config(latent: usize) -> msfp::Config {
    msfp::Config::load(
        Path::new("configs/msfp_sd14.toml"),
        &["model.sd.random_weights=true".into(), format!("model.sd.resolution={}", latent * 8)],
    )
    .expect("configs/msfp_sd14.toml (run from the repository root)")
}

/// The UNet's inputs at t = 500: latents, timesteps, a random 77-token text context, and a
/// target for the QAT loss.
pub struct Inputs {
    pub x: Tensor<4>,
    pub t: Tensor<1>,
    pub context: Tensor<3>,
    pub target: Tensor<4>,
}

impl Inputs {
    /// Seeded: the same values on every device.
    pub fn new(batch: usize, latent: usize, device: &Device) -> Self {
        Self::with_context(batch, latent, 768, device)
    }

    /// [`Self::new`] with a text context of width `context_dim` (the tiny SD's is 32).
    pub fn with_context(batch: usize, latent: usize, context_dim: usize, device: &Device) -> Self {
        let mut rng = SeededRng::new(1);
        let n = batch * 4 * latent * latent;
        let shape = [batch, 4, latent, latent];
        Self {
            x: Tensor::from_data(TensorData::new(rng.normals(n), shape), device),
            t: Tensor::full([batch], 500.0, device),
            context: Tensor::from_data(
                TensorData::new(rng.normals(batch * 77 * context_dim), [batch, 77, context_dim]),
                device,
            ),
            target: Tensor::from_data(TensorData::new(rng.normals(n), shape), device),
        }
    }

    /// The model's noise prediction.
    pub fn forward(&self, m: &Denoiser) -> Tensor<4> {
        m.forward(self.x.clone(), self.t.clone(), Cond::Tokens(self.context.clone()), &StepCtx::at(500))
    }
}

/// The W4A4 student on `device` (an autodiff device) with its adapters and quantizer scales
/// trainable; also the plan (for export) and the number of trainable parameters.
pub fn student(cfg: &msfp::Config, device: &Device) -> (Denoiser, StudentPlan, usize) {
    student_of(msfp::models::registry::load_denoiser(&cfg.model, None, device).expect("SD UNet"), cfg)
}

/// [`student`] built on `teacher`'s own weights: autodiff enabled on the same tensors, so the
/// frozen base weights are one copy in memory.
pub fn student_of(teacher: Denoiser, cfg: &msfp::Config) -> (Denoiser, StudentPlan, usize) {
    let lora = LoraConfig {
        rank: 16,
        adapters: 2,
        router: RouterKind::Range,
        placement: Placement::Branch,
        ..cfg.lora.clone()
    };
    student::w4a4(teacher, lora, |p| p == "conv_in" || p == "conv_out")
}

/// One QAT step as fine-tuning runs it: forward, MSE against the target, backward, AdamW on the
/// student's groups, then the loss and the gradient norm read in one read (the step's only one).
pub fn qat_step(model: Denoiser, inputs: &Inputs, optim: &mut AdamW) -> Denoiser {
    let pred = inputs.forward(&model);
    let loss = (pred - inputs.target.clone()).square().mean();
    let grads = params::collect_grads(&model, &loss.backward());
    // Only the student's trainable parameters have gradients.
    let lr = |_: &str| 1e-5;
    let (model, squared_norm) = optim.step_deferred(model, grads, lr, |_| false);
    let _ = params::host_values(Tensor::cat(vec![loss.inner().reshape([1]), squared_norm], 0));
    model
}
