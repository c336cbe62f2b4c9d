//! A published DiT (random weights; `DitConfig::published`) and its W4A4 FP4 student as the
//! benches measure them (`dit_xl2` on flex, `gpu --dit-image` on a GPU): signed e2m1 weights per
//! output channel and inputs per tensor, patch embedding and final layer at e4m3, optionally
//! HQ-DiT's Hadamard rotation on the attention and MLP inputs and MSFP's adapters for a QAT step.
//! Scales are plausible, not calibrated: the cost does not depend on them.

#![allow(dead_code)] // each bench uses part of it

use burn::tensor::{Device, Int, Tensor, TensorData};
use msfp::base::params;
use msfp::config::{DitConfig, ModelConfig, ModelKind};
use msfp::lora::{LoraConfig, Placement, RouterKind};
use msfp::models::Denoiser;
use msfp::nn::StepCtx;
use msfp::pipeline::student::{self, ParamGroups, StudentPlan};
use msfp::quant::hadamard::HadamardSpec;
use msfp::quant::plan::SiteReport;
use msfp::rng::SeededRng;
use msfp::train::optim::AdamW;

#[path = "scales.rs"]
mod scales;

/// The model config of preset `name` ("DiT-XL/2", ...) at `image` pixels.
pub fn config(name: &str, image: usize) -> ModelConfig {
    let dit = DitConfig::published(name, image).expect("a published DiT preset");
    ModelConfig { kind: ModelKind::TinyDit, dit, ..Default::default() }
}

/// The model's inputs at t = 500: seeded latents, timesteps, class labels (ImageNet's 207, and
/// the null class 1000 for a second sample: DiT's classifier-free guidance batch), a target.
pub struct Inputs {
    pub x: Tensor<4>,
    pub t: Tensor<1>,
    pub y: Tensor<1, Int>,
    pub target: Tensor<4>,
}

impl Inputs {
    pub fn new(cfg: &ModelConfig, batch: usize, device: &Device) -> Self {
        let (c, s) = (cfg.dit.in_channels, cfg.dit.input_size);
        let mut rng = SeededRng::new(2);
        let n = batch * c * s * s;
        let labels: Vec<i64> = (0..batch).map(|i| if i % 2 == 0 { 207 } else { 1000 }).collect();
        Self {
            x: Tensor::from_data(TensorData::new(rng.normals(n), [batch, c, s, s]), device),
            t: Tensor::full([batch], 500.0, device),
            y: Tensor::from_data(TensorData::new(labels, [batch]), device),
            target: Tensor::from_data(TensorData::new(rng.normals(n), [batch, c, s, s]), device),
        }
    }

    /// The eps half of the learned-sigma output.
    pub fn forward(&self, m: &Denoiser) -> Tensor<4> {
        let out = m.forward(self.x.clone(), self.t.clone(), self.y.clone(), &StepCtx::at(500));
        assert_eq!(out.dims(), self.x.dims(), "eps half of the learned-sigma output");
        out
    }
}

/// The W4A4 student of `cfg` on `device`: rotated attention and MLP inputs with `hadamard`, and
/// `lora_rank > 0` attaches two timestep-routed adapters of that rank per layer (MSFP on top of
/// HQ-DiT). For a QAT step, on an autodiff device, pass it through [`trainable`].
pub fn student(
    cfg: &ModelConfig,
    hadamard: bool,
    lora_rank: usize,
    device: &Device,
) -> (Denoiser, StudentPlan) {
    let mut model = Denoiser::new(cfg, &mut SeededRng::new(1), device);
    let eight_bit = |p: &str| p == "patch_embed" || p == "final_linear";
    let rotated =
        |p: &str| hadamard && ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"].iter().any(|k| p.ends_with(k));
    let sites = model
        .quant_sites()
        .into_iter()
        .filter(|s| s.layer.has_weight())
        .map(|s| {
            let format = if eight_bit(&s.path) { "e4m3" } else { "e2m1" };
            SiteReport {
                hadamard: rotated(&s.path)
                    .then(|| HadamardSpec::for_width(s.layer.weight_dims()[1], 7).unwrap()),
                weight_format: Some(format.into()),
                act_format: Some(format.into()),
                path: s.path,
                ..Default::default()
            }
        })
        .collect();
    let lora = LoraConfig {
        rank: lora_rank,
        adapters: 2,
        router: RouterKind::Range,
        placement: Placement::Branch,
        ..Default::default()
    };
    let plan = StudentPlan { sites, act_timestep_slots: 1, timesteps: 1000, lora };
    student::build(&mut model, &plan, 0).expect("student");
    (scales::plausible(model, 0.005), plan)
}

/// The student with its adapters and quantizer scales trainable, the rest frozen.
pub fn trainable(mut model: Denoiser) -> Denoiser {
    let groups = ParamGroups::of(&mut model);
    params::set_trainable(model, |p| groups.group(p).is_some())
}

/// One QAT step: forward, MSE against the target, backward, AdamW on the student's groups.
pub fn qat_step(model: Denoiser, inputs: &Inputs, optim: &mut AdamW) -> Denoiser {
    let pred = inputs.forward(&model);
    let grads = (pred - inputs.target.clone()).square().mean().backward();
    // Only the trainable parameters have gradients.
    optim.step_groups(model, &grads, |_| 1e-5).0
}
