//! The tiny teachers' training step and forward pass as the flex benches time them (and as the
//! PyTorch replica does: batch of the config, random timesteps and labels, AdamW).

#![allow(dead_code)] // each bench uses part of it

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use msfp::config::Config;
use msfp::data::{Mnist, Split};
use msfp::diffusion::NoiseSchedule;
use msfp::models::Denoiser;
use msfp::pipeline::pretrain::diffusion_loss;
use msfp::rng::SeededRng;
use msfp::train::optim::AdamW;

/// The shipped teachers: bench name and config.
pub const MODELS: [(&str, &str); 2] =
    [("tiny_unet", "configs/tiny_unet_mnist.toml"), ("tiny_dit", "configs/tiny_dit_mnist.toml")];

pub struct Setup {
    pub cfg: Config,
    pub data: Mnist,
    pub schedule: NoiseSchedule,
    pub device: Device,
}

pub fn setup(config: &str) -> Setup {
    let cfg = Config::load(Path::new(config), &[]).expect("config");
    let data = Mnist::from_config(&cfg.data, Split::Train).expect("data");
    Setup { schedule: NoiseSchedule::new(&cfg.diffusion), data, device: Device::flex().autodiff(), cfg }
}

/// One training step on a random batch: loss, backward, AdamW.
pub fn step(s: &Setup, model: Denoiser, optim: &mut AdamW, rng: &mut SeededRng) -> Denoiser {
    let idx: Vec<usize> = (0..s.cfg.train.batch_size).map(|_| rng.below(s.data.len())).collect();
    let loss = diffusion_loss(&model, &s.schedule, &s.data, &idx, 0.1, rng, &s.device);
    let grads = loss.backward();
    optim.step(model, &grads, 1e-4).0
}

/// One forward pass without autodiff on a random batch at t = 500.
pub fn forward(s: &Setup, model: &Denoiser, rng: &mut SeededRng) -> f32 {
    let b = s.cfg.train.batch_size;
    let dev = s.device.clone().inner();
    let x = Tensor::<4>::from_data(TensorData::new(rng.normals(b * 1024), [b, 1, 32, 32]), &dev);
    let t = Tensor::<1>::full([b], 500.0, &dev);
    let y = Tensor::<1, burn::tensor::Int>::zeros([b], &dev);
    model.forward(x, t, y, &msfp::nn::StepCtx::at(500)).sum().into_scalar::<f32>()
}

/// One step as fine-tuning runs the student: a random batch noised to one random timestep for
/// all samples (a TALoRA router and per-timestep activation scales need the step's timestep),
/// the noise MSE, backward, AdamW on whatever is trainable.
pub fn step_at_one_t(s: &Setup, model: Denoiser, optim: &mut AdamW, rng: &mut SeededRng) -> Denoiser {
    let b = s.cfg.train.batch_size;
    let idx: Vec<usize> = (0..b).map(|_| rng.below(s.data.len())).collect();
    let (x0, labels) = s.data.batch(&idx, &s.device);
    let t = rng.below(s.schedule.timesteps());
    let noise = Tensor::<4>::from_data(TensorData::new(rng.normals(b * 1024), [b, 1, 32, 32]), &s.device);
    let xt = s.schedule.add_noise(x0, noise.clone(), &vec![t; b]);
    let tt = Tensor::<1>::full([b], t as f32, &s.device);
    let pred = model.forward(xt, tt, labels, &msfp::nn::StepCtx::at(t));
    let grads = (pred - noise).square().mean().backward();
    optim.step(model, &grads, 1e-4).0
}
