//! Sampling from a model into images and PNG grids.

use std::path::Path;

use burn::module::Module;
use burn::tensor::Device;

use crate::base::params;
use crate::config::{Config, ModelKind};
use crate::diffusion::{NoiseSchedule, Sampler, sample};
use crate::error::{Error, Result};
use crate::models::sd::{load_sd_conditioning, load_sd_unet};
use crate::models::{Denoiser, Family};
use crate::rng::SeededRng;

/// Builds the model of `cfg` and loads weights from `weights` (or `model.weights`). For SD, the
/// UNet of the user's download (or of `model.sd.random_weights`); a DiT loads msfp's own
/// safetensors or a published checkpoint (facebookresearch `.pt`, diffusers directory).
pub fn load_model(cfg: &Config, weights: Option<&Path>, device: &Device) -> Result<Denoiser> {
    if cfg.model.kind == ModelKind::Sd {
        let mut model = cfg.model.clone();
        if let Some(w) = weights {
            model.weights = Some(w.to_path_buf());
            model.sd.random_weights = false;
        }
        return Ok(Denoiser::Sd(load_sd_unet(&model, device)?));
    }
    let path = weights.or(cfg.model.weights.as_deref()).ok_or_else(|| {
        Error::usage("no weights given: pass --weights FILE or set model.weights in the config")
    })?;
    if cfg.model.kind == ModelKind::TinyDit && crate::models::dit_weights::is_published(path) {
        return Ok(Denoiser::Dit(crate::models::dit_weights::load_published(&cfg.model.dit, path, device)?));
    }
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

/// The model family of `cfg` on `device`: for SD the text encoder and VAE of the user's
/// download (or random ones with `model.sd.random_weights`).
pub fn load_family(cfg: &Config, device: &Device) -> Result<Family> {
    match cfg.model.kind {
        ModelKind::TinyUnet => Ok(Family::tiny(device)),
        ModelKind::TinyDit => {
            let dit = &cfg.model.dit;
            let vae = match &dit.vae {
                Some(path) => Some(crate::models::dit_weights::load_sd_vae(path, device)?),
                None if dit.in_channels == 1 => None,
                None => {
                    return Err(Error::usage(
                        "model.dit.vae is not set: a latent DiT's samples are decoded by the SD VAE (stabilityai/sd-vae-ft-ema)",
                    ));
                }
            };
            Ok(Family::dit(dit, vae, device))
        }
        ModelKind::Sd => {
            crate::diffusion::schedule::check_diffusers_scheduler(
                cfg.model.weights.as_deref(),
                &cfg.diffusion,
                &cfg.sampler,
            )?;
            let (text_encoder, vae) = load_sd_conditioning(&cfg.model, device)?;
            Family::sd(&cfg.model.sd, text_encoder, vae, device)
        }
    }
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
