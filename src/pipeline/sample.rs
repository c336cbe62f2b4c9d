//! Sampling from a model into images and PNG grids.

use std::path::Path;

use burn::module::Module;
use burn::tensor::Device;

use crate::base::params;
use crate::diffusion::{NoiseSchedule, Sampler, sample};
use crate::error::Result;
use crate::models::{Denoiser, Family};
use crate::pipeline::config::{Config, ModelKind};
use crate::rng::SeededRng;

/// The model family of `cfg` on `device` (`models::registry::load_family`), after checking a
/// diffusers download's own noise schedule against the job's `[diffusion]` and `[sampler]`.
pub fn load_family(cfg: &Config, device: &Device) -> Result<Family> {
    if cfg.model.kind == ModelKind::Sd {
        crate::diffusion::schedule::check_diffusers_scheduler(
            cfg.model.weights.as_deref(),
            &cfg.diffusion,
            &cfg.sampler,
        )?;
    }
    crate::models::registry::load_family(&cfg.model, device)
}

/// Generates `n` images (conditions cycling through the family's classes or prompts) with the
/// config's sampler, in batches, from the noise stream `seed`; returns row-major
/// `[n, C, H, W]` values in [-1, 1] and the condition indices.
pub fn generate(
    model: &Denoiser,
    family: &Family,
    cfg: &Config,
    n: usize,
    seed: u64,
    device: &Device,
) -> (Vec<f32>, Vec<usize>) {
    let schedule = NoiseSchedule::new(&cfg.diffusion);
    let sampler = Sampler::new(&schedule, &cfg.sampler);
    let indices: Vec<usize> = (0..n).map(|i| i % family.cycle_len()).collect();
    let mut rng = SeededRng::new(seed);
    let mut images = Vec::new();
    for chunk in indices.chunks(cfg.eval.batch_size) {
        let (cond, null) = (family.cond(chunk), family.null(chunk.len()));
        let x = sample(model, &sampler, &cond, &null, family.sample_shape, &mut rng, device);
        images.extend(params::host_values(family.to_images(x)));
    }
    (images, indices)
}

/// A PNG grid of images `[n, C, H, W]` (C = 1 or 3) in [-1, 1], `cols` per row.
pub fn image_grid(images: &[f32], shape: [usize; 3], cols: usize) -> image::DynamicImage {
    let [c, h, _] = shape;
    match c {
        1 => image::DynamicImage::ImageLuma8(crate::report::grid::gray_grid(images, h, cols)),
        _ => image::DynamicImage::ImageRgb8(crate::report::grid::rgb_grid(images, shape, cols)),
    }
}

/// Writes a PNG grid of `n` samples, one class (or prompt) per column.
pub fn write_grid(model: &Denoiser, family: &Family, cfg: &Config, path: &Path, n: usize) -> Result<()> {
    let device = model.devices().first().cloned().unwrap_or_else(Device::flex);
    let (images, _) = generate(model, family, cfg, n, cfg.eval.seed, &device);
    let cols = family.cycle_len().min(n).min(10);
    crate::report::grid::save_png(path, &image_grid(&images, family.image_shape(), cols))
}
