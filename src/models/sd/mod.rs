//! Stable Diffusion v1.x (and CompVis LDM UNets, a config away): the UNet2DConditionModel, the
//! AutoencoderKL first stage, their configs, and the loaders for the published file layouts.
//! Parameter paths follow diffusers' key names, so a diffusers directory loads without renames
//! (`keymap` holds the few exceptions and the CompVis single-file mapping).

pub mod config;
pub mod keymap;
pub mod unet;
pub mod vae;
pub mod weights;

pub use config::{EmaSetting, Heads, SdConfig, SdPreset, UnetConfig, VaeConfig};

use crate::models::ModelConfig;
use crate::models::clip::{ClipTextConfig, ClipTextModel};
pub use unet::SdUnet;
pub use vae::AutoencoderKl;

use std::path::Path;

use burn::tensor::Device;

use crate::base::params::{self, NamedTensors};
use crate::error::{Error, Result};
use crate::rng::{SeededRng, stream};

/// The three networks of a preset.
#[derive(Debug, Clone, PartialEq)]
pub struct SdArch {
    pub unet: UnetConfig,
    pub vae: VaeConfig,
    pub text: ClipTextConfig,
}

impl SdArch {
    pub fn of(preset: SdPreset) -> Self {
        match preset {
            SdPreset::Sd14 | SdPreset::Sd15 => {
                Self { unet: UnetConfig::sd14(), vae: VaeConfig::sd(), text: ClipTextConfig::vit_l14() }
            }
            SdPreset::Tiny => Self {
                unet: UnetConfig {
                    block_out_channels: vec![8, 16, 16],
                    cross_attention: vec![true, true, false],
                    heads: Heads::Count(2),
                    norm_num_groups: 4,
                    cross_attention_dim: 32,
                    sample_size: 8,
                    ..UnetConfig::sd14()
                },
                vae: VaeConfig { block_out_channels: vec![8, 16], norm_num_groups: 4, ..VaeConfig::sd() },
                text: ClipTextConfig {
                    vocab_size: 1000,
                    hidden_size: 32,
                    intermediate_size: 37,
                    num_hidden_layers: 3,
                    num_attention_heads: 4,
                    ..ClipTextConfig::vit_l14()
                },
            },
        }
    }

    /// Pixels per latent position along a side (SD's VAE: 8).
    pub fn vae_factor(&self) -> usize {
        1 << (self.vae.block_out_channels.len() - 1)
    }
}

/// Image sides must be multiples of this: the VAE's factor times the UNet's downsampling.
pub fn latent_multiple(preset: SdPreset) -> usize {
    let arch = SdArch::of(preset);
    arch.vae_factor() << (arch.unet.block_out_channels.len() - 1)
}

/// The user's download named by `model.weights`, read whole (tensors by diffusers name), or
/// `None` for `model.sd.random_weights`.
fn read_weights(
    cfg: &ModelConfig,
    arch: &SdArch,
    parts: weights::Parts,
) -> Result<Option<(weights::SdWeights, std::path::PathBuf)>> {
    let path = match (&cfg.weights, cfg.sd.random_weights) {
        (_, true) | (None, _) => return Ok(None),
        (Some(path), false) => path,
    };
    if !path.exists() {
        usage!(
            "model.weights = {}: not found. Download Stable Diffusion v1.4 (the diffusers directory \
             CompVis/stable-diffusion-v1-4, or sd-v1-4.ckpt from CompVis/stable-diffusion-v-1-4-original, \
             both on huggingface.co) and point model.weights at it",
            path.display()
        );
    }
    check_diffusers_config(path, arch)?;
    let ema = match cfg.sd.ema {
        EmaSetting::Auto => weights::EmaChoice::Auto,
        EmaSetting::Ema => weights::EmaChoice::Ema,
        EmaSetting::NonEma => weights::EmaChoice::NonEma,
    };
    Ok(Some((weights::load_sd_parts(path, arch.unet.layers_per_block, ema, parts)?, path.clone())))
}

/// The UNet of `[model.sd]`: from the user's weights, or seeded random ones.
pub fn load_sd_unet(cfg: &ModelConfig, device: &Device) -> Result<SdUnet> {
    let arch = SdArch::of(cfg.sd.preset);
    match read_weights(cfg, &arch, weights::Parts::UNET)? {
        Some((w, path)) => load_unet(&arch.unet, w.unet, &path, device),
        None => Ok(SdUnet::new(&arch.unet, &mut SeededRng::derived(0, stream::SD_RANDOM_UNET), device)),
    }
}

/// The text encoder and VAE of `[model.sd]` (they stay in full precision).
pub fn load_sd_conditioning(cfg: &ModelConfig, device: &Device) -> Result<(ClipTextModel, AutoencoderKl)> {
    let arch = SdArch::of(cfg.sd.preset);
    match read_weights(cfg, &arch, weights::Parts::CONDITIONING)? {
        Some((w, path)) => Ok((
            load_text_encoder(&arch.text, w.text_encoder, &path, device)?,
            load_vae(&arch.vae, w.vae, &path, device)?,
        )),
        None => Ok((
            ClipTextModel::new(&arch.text, &mut SeededRng::derived(0, stream::SD_RANDOM_TEXT), device),
            AutoencoderKl::new(&arch.vae, &mut SeededRng::derived(0, stream::SD_RANDOM_VAE), device),
        )),
    }
}

/// A diffusers directory's `unet/config.json` must describe the preset's UNet: a v2.x or
/// fine-tuned variant with another architecture is refused by name instead of failing on shapes.
fn check_diffusers_config(path: &Path, arch: &SdArch) -> Result<()> {
    let json = path.join("unet").join("config.json");
    if !json.is_file() {
        return Ok(());
    }
    let found = UnetConfig { sample_size: arch.unet.sample_size, ..UnetConfig::from_diffusers_json(&json)? };
    if found != arch.unet {
        usage!(
            "{}: describes a UNet other than model.sd.preset's ({found:?} vs {:?}); set model.sd.preset to the model you downloaded",
            json.display(),
            arch.unet
        );
    }
    Ok(())
}

/// The model parameter path of a diffusers UNet key: diffusers' GEGLU feed-forward is
/// `ff.net.0.proj` / `ff.net.2` (a list with a dropout between), msfp's `ff.proj` / `ff.out`.
pub fn unet_param_path(diffusers_key: &str) -> String {
    diffusers_key.replace(".ff.net.0.proj.", ".ff.proj.").replace(".ff.net.2.", ".ff.out.")
}

/// Loads diffusers-named tensors into a module built from its config; a missing, unexpected or
/// mis-shaped tensor is one usage error naming `origin`, the tensor and the expected shape.
fn load_named<M: burn::module::Module>(module: M, tensors: NamedTensors, origin: &Path) -> Result<M> {
    params::load_into(module, &tensors, origin).map_err(|e| Error::usage(e.message))
}

/// A UNet of `cfg` with the weights of `tensors` (diffusers key names).
pub fn load_unet(cfg: &UnetConfig, tensors: NamedTensors, origin: &Path, device: &Device) -> Result<SdUnet> {
    let renamed = tensors.into_iter().map(|(k, v)| (unet_param_path(&k), v)).collect();
    load_named(SdUnet::new(cfg, &mut SeededRng::new(0), device), renamed, origin)
}

/// A VAE of `cfg` with the weights of `tensors` (diffusers key names).
pub fn load_vae(
    cfg: &VaeConfig,
    tensors: NamedTensors,
    origin: &Path,
    device: &Device,
) -> Result<AutoencoderKl> {
    load_named(AutoencoderKl::new(cfg, &mut SeededRng::new(0), device), tensors, origin)
}

/// The SD AutoencoderKL of a diffusers VAE folder (`stabilityai/sd-vae-ft-ema` or `-mse`: the
/// weights at its top level, or in `vae/` of a pipeline), which decodes DiT-XL/2's latents (`model.dit.vae`).
pub fn load_vae_folder(path: &Path, device: &Device) -> Result<AutoencoderKl> {
    let dir = if path.join("vae").is_dir() { path.join("vae") } else { path.to_path_buf() };
    let file = weights::pick_file(
        &dir,
        weights::DIFFUSERS_MODEL_FILES,
        "the folder of stabilityai/sd-vae-ft-ema (model.dit.vae)",
    )?;
    let tensors = weights::load_diffusers_file(&file, keymap::Component::Vae)?;
    // The folder's own config.json when it has one (the published VAEs: SD's), else SD's.
    let json = dir.join("config.json");
    let cfg = if json.is_file() { VaeConfig::from_diffusers_json(&json)? } else { VaeConfig::sd() };
    load_vae(&cfg, tensors, &file, device)
}

/// A CLIP text model of `cfg` with the weights of `tensors` (`text_model.*` keys).
pub fn load_text_encoder(
    cfg: &crate::models::clip::ClipTextConfig,
    tensors: NamedTensors,
    origin: &Path,
    device: &Device,
) -> Result<crate::models::clip::ClipTextModel> {
    load_named(crate::models::clip::ClipTextModel::new(cfg, &mut SeededRng::new(0), device), tensors, origin)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use burn::tensor::{Int, Tensor, TensorData};

    use super::*;
    use crate::base::params::{HostTensor, load_safetensors};
    use crate::models::clip::ClipTextConfig;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd/tiny")
    }

    fn tensor<const D: usize>(t: &HostTensor, device: &Device) -> Tensor<D> {
        Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), device)
    }

    /// max |got - want| / max |want|.
    fn rel_err<const D: usize>(got: Tensor<D>, want: &HostTensor) -> f32 {
        assert_eq!(got.dims().to_vec(), want.shape, "output shape");
        let got = params::host_values(got);
        let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got.iter().zip(&want.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        diff / scale
    }

    fn component(name: &str, file: &str) -> (PathBuf, NamedTensors) {
        let path = fixtures().join("diffusers").join(name).join(file);
        let kind = match name {
            "unet" => keymap::Component::Unet,
            "vae" => keymap::Component::Vae,
            _ => keymap::Component::TextEncoder,
        };
        (path.clone(), weights::load_diffusers_file(&path, kind).unwrap())
    }

    #[test]
    fn unet_vae_and_clip_match_diffusers_on_the_tiny_fixture() {
        let device = Device::flex();
        let (reference, _) = load_safetensors(&fixtures().join("parity.safetensors")).unwrap();
        let r = |k: &str| reference.get(k).unwrap_or_else(|| panic!("parity tensor {k}"));

        let cfg = UnetConfig::from_diffusers_json(&fixtures().join("diffusers/unet/config.json")).unwrap();
        let (path, w) = component("unet", "diffusion_pytorch_model.safetensors");
        let unet = load_unet(&cfg, w, &path, &device).unwrap();
        let eps = unet.forward(
            tensor(r("unet.sample"), &device),
            tensor(r("unet.timestep"), &device),
            tensor(r("unet.encoder_hidden_states"), &device),
            &crate::nn::StepCtx::default(),
        );
        let err = rel_err(eps, r("unet.out"));
        assert!(err < 1e-4, "UNet eps: relative error {err}");

        let cfg = VaeConfig::from_diffusers_json(&fixtures().join("diffusers/vae/config.json")).unwrap();
        let (path, w) = component("vae", "diffusion_pytorch_model.safetensors");
        let vae = load_vae(&cfg, w, &path, &device).unwrap();
        let err = rel_err(vae.decode(tensor(r("vae.latent"), &device)), r("vae.decoded"));
        assert!(err < 1e-4, "VAE decode: relative error {err}");
        let (mean, logvar) = vae.encode(tensor(r("vae.image"), &device));
        let (e_mean, e_logvar) =
            (rel_err(mean, r("vae.posterior_mean")), rel_err(logvar, r("vae.posterior_logvar")));
        assert!(e_mean < 1e-4 && e_logvar < 1e-4, "VAE encode: relative errors {e_mean} / {e_logvar}");

        let cfg = ClipTextConfig::from_json(&fixtures().join("diffusers/text_encoder/config.json")).unwrap();
        let (path, w) = component("text_encoder", "model.safetensors");
        let clip = load_text_encoder(&cfg, w, &path, &device).unwrap();
        let ids = r("clip.input_ids");
        let ids = Tensor::<2, Int>::from_data(
            TensorData::new(ids.data.iter().map(|&v| v as i64).collect::<Vec<_>>(), ids.shape.clone()),
            &device,
        );
        let err = rel_err(clip.forward(ids), r("clip.last_hidden_state"));
        assert!(err < 1e-4, "CLIP last hidden state: relative error {err}");
    }

    #[test]
    fn a_missing_or_misshaped_tensor_is_a_usage_error_naming_it() {
        let device = Device::flex();
        let cfg = UnetConfig::from_diffusers_json(&fixtures().join("diffusers/unet/config.json")).unwrap();
        let (path, mut w) = component("unet", "diffusion_pytorch_model.safetensors");
        let t = w.get_mut("conv_in.weight").unwrap();
        t.shape = vec![t.shape.iter().product()];
        let err = load_unet(&cfg, w.clone(), &path, &device).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.message.contains("conv_in.weight") && err.message.contains("diffusion_pytorch_model"),
            "{err}"
        );
        w.remove("conv_in.weight");
        let err = load_unet(&cfg, w, &path, &device).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.message.contains("conv_in.weight"), "{err}");
    }
}

#[cfg(test)]
mod full_size {
    use std::collections::BTreeMap;

    use super::*;
    use crate::models::clip::{ClipTextConfig, ClipTextModel};

    /// `name -> shape` of a committed SD1.4 key list (`name<TAB>d0,d1,...`).
    fn published(file: &str) -> BTreeMap<String, Vec<usize>> {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd/sd14_keys").join(file);
        std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .filter(|l| !l.ends_with("position_ids\t1,77"))
            .map(|l| {
                let (name, shape) = l.split_once('\t').unwrap();
                (
                    name.to_string(),
                    shape.split(',').filter(|s| !s.is_empty()).map(|d| d.parse().unwrap()).collect(),
                )
            })
            .collect()
    }

    fn shapes<M: burn::module::Module>(m: &M) -> BTreeMap<String, Vec<usize>> {
        let mut out = BTreeMap::new();
        params::for_each_param(m, |path, _, dims| {
            out.insert(path.to_string(), dims.to_vec());
        });
        out
    }

    /// The presets build exactly the published SD1.4 tensors (names and shapes), so the real
    /// files load; the UNet has the published 859,520,964 parameters.
    #[test]
    fn sd14_presets_have_every_published_tensor_and_no_other() {
        let device = Device::flex();
        let rng = &mut SeededRng::new(0);
        let unet = shapes(&SdUnet::new(&UnetConfig::sd14(), rng, &device));
        let want: BTreeMap<_, _> =
            published("diffusers_unet.txt").into_iter().map(|(k, v)| (unet_param_path(&k), v)).collect();
        assert_eq!(unet, want);
        assert_eq!(unet.values().map(|s| s.iter().product::<usize>()).sum::<usize>(), 859_520_964);
        assert_eq!(
            shapes(&AutoencoderKl::new(&VaeConfig::sd(), rng, &device)),
            published("diffusers_vae.txt")
        );
        let clip = ClipTextModel::new(&ClipTextConfig::vit_l14(), rng, &device);
        assert_eq!(shapes(&clip), published("diffusers_text_encoder.txt"));
    }
}
