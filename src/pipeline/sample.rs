//! Sampling from a model into images and PNG grids.

use std::path::Path;

use burn::module::Module;
use burn::tensor::Device;

use crate::config::Config;
use crate::diffusion::{NoiseSchedule, Sampler, sample};
use crate::error::{Error, Result};
use crate::models::{Denoiser, NUM_CLASSES};
use crate::rng::SeededRng;
use crate::train::params;

/// Builds the model of `cfg` and loads weights from `weights` (or `model.weights`).
pub fn load_model(cfg: &Config, weights: Option<&Path>, device: &Device) -> Result<Denoiser> {
    let path = weights.or(cfg.model.weights.as_deref()).ok_or_else(|| {
        Error::usage("no weights given: pass --weights FILE or set model.weights in the config")
    })?;
    load_weights_into(Denoiser::new(&cfg.model, &mut SeededRng::new(0), device), path, cfg)
}

/// Loads a `model.safetensors` into `model`, refusing a file written for another model kind.
pub fn load_weights_into(model: Denoiser, path: &Path, cfg: &Config) -> Result<Denoiser> {
    let (tensors, meta) = params::load_safetensors(path)?;
    if let Some(kind) = meta.get("msfp.model") {
        let want = serde_json::to_string(&cfg.model.kind).expect("json");
        if *kind != want {
            return Err(Error::usage(format!(
                "{}: holds a {kind} model but the config's model.kind is {want}",
                path.display()
            )));
        }
    }
    params::load_into(model, &tensors, path)
}

/// Generates `n` images (classes cycling 0..9) with the config's sampler, in batches, from the
/// noise stream `seed`; returns row-major `[n * 32 * 32]` values in [-1, 1] and the labels.
pub fn generate(
    model: &Denoiser,
    cfg: &Config,
    n: usize,
    seed: u64,
    device: &Device,
) -> (Vec<f32>, Vec<usize>) {
    let schedule = NoiseSchedule::new(&cfg.diffusion);
    let sampler = Sampler::new(&schedule, &cfg.sampler);
    let labels: Vec<usize> = (0..n).map(|i| i % NUM_CLASSES).collect();
    let mut rng = SeededRng::new(seed);
    let mut images = Vec::with_capacity(n * 32 * 32);
    for chunk in labels.chunks(cfg.eval.batch_size) {
        let x = sample(model, &sampler, chunk, &mut rng, device);
        images.extend(params::host_values(x));
    }
    (images, labels)
}

/// Writes a PNG grid of `n` samples, one class per column.
pub fn write_grid(model: &Denoiser, cfg: &Config, path: &Path, n: usize) -> Result<()> {
    let device = model.devices().first().cloned().unwrap_or_else(Device::flex);
    let (images, _) = generate(model, cfg, n, cfg.eval.seed, &device);
    let grid = crate::report::grid::gray_grid(&images, 32, NUM_CLASSES);
    crate::report::grid::save_png(path, &image::DynamicImage::ImageLuma8(grid))
}
