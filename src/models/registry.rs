//! The model families' registry: builds a family's denoiser and loads its weights (msfp's own
//! safetensors or the published layout), and its conditioner and first stage. A new family adds
//! its arm here and its folder beside; the pipeline stages only call these.

use std::path::Path;

use burn::tensor::Device;

use super::sd::{load_sd_conditioning, load_sd_unet};
use super::{Denoiser, Family, ModelConfig, ModelKind, dit_weights};
use crate::base::params;
use crate::error::{Error, Result};
use crate::rng::SeededRng;

/// Builds the denoiser of `cfg` and loads weights from `weights` (or `model.weights`). For SD, the
/// UNet of the user's download (or of `model.sd.random_weights`); a DiT loads msfp's own
/// safetensors or a published checkpoint (facebookresearch `.pt`, diffusers directory).
pub fn load_denoiser(cfg: &ModelConfig, weights: Option<&Path>, device: &Device) -> Result<Denoiser> {
    if cfg.kind == ModelKind::Sd {
        let mut model = cfg.clone();
        if let Some(w) = weights {
            model.weights = Some(w.to_path_buf());
            model.sd.random_weights = false;
        }
        return Ok(Denoiser::Sd(load_sd_unet(&model, device)?));
    }
    let path = weights.or(cfg.weights.as_deref()).ok_or_else(|| {
        Error::usage("no weights given: pass --weights FILE or set model.weights in the config")
    })?;
    if cfg.kind == ModelKind::TinyDit && dit_weights::is_published(path) {
        return Ok(Denoiser::Dit(dit_weights::load_published(&cfg.dit, path, device)?));
    }
    load_weights_into(Denoiser::new(cfg, &mut SeededRng::new(0), device), path, cfg.kind)
}

/// Loads a `model.safetensors` into `model`, refusing a file written for another model kind.
pub fn load_weights_into(model: Denoiser, path: &Path, expected: ModelKind) -> Result<Denoiser> {
    let (tensors, meta) = params::load_safetensors(path)?;
    if let Some(kind) = meta.get("msfp.model") {
        let want = serde_json::to_string(&expected).expect("json");
        if *kind != want {
            return Err(Error::usage(format!(
                "{}: holds a {kind} model but the config's model.kind is {want}",
                path.display()
            )));
        }
    }
    let tensors =
        if expected == ModelKind::TinyUnet { super::unet::upgrade_legacy_names(tensors) } else { tensors };
    params::load_into(model, &tensors, path)
}

/// The model family of `cfg` on `device`: its conditioner and first stage (for SD the text
/// encoder and VAE of the user's download, or random ones with `model.sd.random_weights`).
pub fn load_family(cfg: &ModelConfig, device: &Device) -> Result<Family> {
    match cfg.kind {
        ModelKind::TinyUnet => Ok(Family::tiny(device)),
        ModelKind::TinyDit => {
            let dit = &cfg.dit;
            let vae = match &dit.vae {
                Some(path) => Some(super::sd::load_vae_folder(path, device)?),
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
            let (text_encoder, vae) = load_sd_conditioning(cfg, device)?;
            Family::sd(&cfg.sd, text_encoder, vae, device)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped tiny UNet teacher was written with the tiny UNet's own ResNet-block names
    /// (`emb_proj`, `skip`); it loads into the shared block (`time_emb_proj`, `conv_shortcut`)
    /// with every tensor placed.
    #[test]
    fn shipped_tiny_unet_loads_under_the_shared_block_names() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("checkpoints/tiny_unet_mnist.safetensors");
        let (tensors, _) = params::load_safetensors(&path).unwrap();
        assert!(tensors.keys().any(|k| k.ends_with(".res.emb_proj.weight")), "a file of the old names");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let job =
            crate::pipeline::config::Config::load(&root.join("configs/tiny_unet_mnist.toml"), &[]).unwrap();
        let cfg = ModelConfig { weights: Some(path.clone()), ..job.model };
        let model = load_denoiser(&cfg, None, &Device::flex()).unwrap();
        let loaded = params::collect(&model);
        let key = "down.0.res.time_emb_proj.weight";
        assert_eq!(loaded[key].data, tensors["down.0.res.emb_proj.weight"].data);
        assert!(!loaded.keys().any(|k| k.contains("emb_proj") && !k.contains("time_emb_proj")));
    }
}
