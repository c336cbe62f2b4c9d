//! Typed configs of SD's UNet and VAE, with presets for the published models and a reader for
//! the `config.json` diffusers writes beside the weights.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which published Stable Diffusion architecture `[model.sd]` builds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SdPreset {
    Sd14,
    Sd15,
    /// A test-size SD (the layout of `tests/fixtures/sd/tiny/diffusers`): 3-level UNet of 8/16/16
    /// channels, 2-level VAE, 3-layer CLIP with a 1,000-token vocabulary (token ids are folded
    /// into it).
    Tiny,
}

/// Which UNet weights of a CompVis checkpoint that holds both to use.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EmaSetting {
    /// EMA weights when the file has them.
    Auto,
    Ema,
    NonEma,
}

/// `[model.sd]`: Stable Diffusion v1.x. `model.weights` is the user's download: a diffusers
/// directory or a CompVis single file (`sd-v1-4.ckpt`, `.safetensors`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SdConfig {
    pub preset: SdPreset,
    pub ema: EmaSetting,
    /// Image side in pixels (SD1.x: 512); latents are `resolution / 8` for the SD VAE.
    pub resolution: usize,
    /// Prompts, one per line (`#` comments and blank lines skipped): the distillation
    /// trajectories draw from them, evaluation and calibration cycle through them.
    pub prompts: PathBuf,
    /// The unconditional branch of classifier-free guidance (SD: the empty prompt).
    pub negative_prompt: String,
    /// Builds the architecture with random weights instead of loading `model.weights`: for
    /// tests and benchmarks only (the samples are noise).
    pub random_weights: bool,
}

impl Default for SdConfig {
    fn default() -> Self {
        Self {
            preset: SdPreset::Sd14,
            ema: EmaSetting::Auto,
            resolution: 512,
            prompts: "configs/prompts/sd_prompts.txt".into(),
            negative_prompt: String::new(),
            random_weights: false,
        }
    }
}

impl SdConfig {
    /// `[model.sd]`'s ranges; `weights` is `model.weights`.
    pub fn validate(&self, weights: Option<&Path>) -> Result<()> {
        if weights.is_none() && !self.random_weights {
            usage!(
                "model.weights is not set: download Stable Diffusion v1.4 (the diffusers directory \
                 CompVis/stable-diffusion-v1-4, or sd-v1-4.ckpt from CompVis/stable-diffusion-v-1-4-original, \
                 both on huggingface.co; v1.5 works too) and set model.weights to its path \
                 (model.sd.random_weights = true builds random weights, for tests only)"
            );
        }
        if weights.is_some() && self.random_weights {
            usage!("model.sd.random_weights = true and model.weights are both set: choose one");
        }
        let multiple = super::latent_multiple(self.preset);
        if self.resolution == 0 || !self.resolution.is_multiple_of(multiple) {
            usage!(
                "model.sd.resolution = {} is out of range: it must be a positive multiple of {multiple} for this preset",
                self.resolution
            );
        }
        Ok(())
    }
}

/// How many heads each level's attention has: a fixed count (diffusers' SD1.x configs call it
/// `attention_head_dim`, but it is the number of heads: 8; CompVis' `num_heads`) or a fixed head
/// width (CompVis' `num_head_channels`, which overrides `num_heads` when set).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Heads {
    Count(usize),
    Width(usize),
}

impl Heads {
    /// `(heads, head_dim)` for `channels`.
    pub fn split(self, channels: usize) -> (usize, usize) {
        match self {
            Heads::Count(h) => (h, channels / h),
            Heads::Width(d) => (channels / d, d),
        }
    }
}

/// UNet2DConditionModel (diffusers) = CompVis `openaimodel.UNetModel` with a spatial transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct UnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Channels of each resolution level (SD: 320, 640, 1280, 1280).
    pub block_out_channels: Vec<usize>,
    /// Whether each down level has transformer blocks (SD: true, true, true, false); the up
    /// levels mirror them.
    pub cross_attention: Vec<bool>,
    pub layers_per_block: usize,
    pub heads: Heads,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    /// Width of the conditioning tokens (SD1.x: CLIP ViT-L/14's 768; LDM cin256: 512).
    pub cross_attention_dim: usize,
    /// Transformer blocks per attention (SD1.x: 1).
    pub transformer_layers: usize,
    /// `proj_in`/`proj_out` as linear layers (SD2.x) instead of 1x1 convolutions (SD1.x).
    pub use_linear_projection: bool,
    /// Sinusoidal timestep embedding: `[cos | sin]` (true) or `[sin | cos]`.
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    /// Latent side the model was trained at (SD1.x: 64 for 512 px).
    pub sample_size: usize,
}

impl UnetConfig {
    /// Stable Diffusion v1.4 (CompVis/stable-diffusion-v1-4): 859,520,964 parameters.
    pub fn sd14() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            cross_attention: vec![true, true, true, false],
            layers_per_block: 2,
            heads: Heads::Count(8),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: 768,
            transformer_layers: 1,
            use_linear_projection: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            sample_size: 64,
        }
    }

    /// Stable Diffusion v1.5: the v1.4 architecture (different weights).
    pub fn sd15() -> Self {
        Self::sd14()
    }

    /// CompVis LDM-4 ImageNet (`cin256-v2.yaml`): class-conditional through a 512-d class token
    /// in cross-attention, 192 channels, multipliers (1, 2, 3, 5), attention at downsampling
    /// factors 2, 4, 8, on VQ-f4 latents (3 x 64 x 64). The yaml sets `num_heads: 1` and no
    /// `num_head_channels`, so openaimodel builds ONE head as wide as the layer (384, 576, 960).
    pub fn ldm_cin256_v2() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![192, 384, 576, 960],
            cross_attention: vec![false, true, true, true],
            layers_per_block: 2,
            heads: Heads::Count(1),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: 512,
            transformer_layers: 1,
            use_linear_projection: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            sample_size: 64,
        }
    }

    /// Width of the timestep embedding MLP (4x the first level, as in both codebases).
    pub fn time_embed_dim(&self) -> usize {
        4 * self.block_out_channels[0]
    }

    /// Reads a diffusers `unet/config.json`. Keys msfp does not model must have SD1.x's values;
    /// anything else is refused by name rather than silently mis-built.
    pub fn from_diffusers_json(path: &Path) -> Result<Self> {
        let raw: DiffusersUnet = read_json(path)?;
        let levels = raw.block_out_channels.len();
        if raw.down_block_types.len() != levels || raw.up_block_types.len() != levels {
            return Err(Error::usage(format!(
                "{}: down_block_types/up_block_types need one entry per block_out_channels ({levels})",
                path.display()
            )));
        }
        let mut cross_attention = Vec::with_capacity(levels);
        for (i, kind) in raw.down_block_types.iter().enumerate() {
            let up = &raw.up_block_types[levels - 1 - i];
            let (down_cross, up_cross) = match (kind.as_str(), up.as_str()) {
                ("CrossAttnDownBlock2D", u) => (true, u == "CrossAttnUpBlock2D"),
                ("DownBlock2D", u) => (false, u == "CrossAttnUpBlock2D"),
                (other, _) => usage!(
                    "{}: down block type `{other}` is not supported (CrossAttnDownBlock2D, DownBlock2D)",
                    path.display()
                ),
            };
            if down_cross != up_cross {
                usage!("{}: up block `{up}` does not mirror down block `{kind}`", path.display());
            }
            cross_attention.push(down_cross);
        }
        if raw.mid_block_type.as_deref().is_some_and(|m| m != "UNetMidBlock2DCrossAttn") {
            usage!(
                "{}: mid_block_type {:?} is not supported (UNetMidBlock2DCrossAttn)",
                path.display(),
                raw.mid_block_type
            );
        }
        let unsupported = [
            ("act_fn", raw.act_fn.as_deref().is_some_and(|a| a != "silu")),
            ("class_embed_type", raw.class_embed_type.is_some()),
            ("addition_embed_type", raw.addition_embed_type.is_some()),
            ("num_class_embeds", raw.num_class_embeds.is_some()),
            ("upcast_attention", raw.upcast_attention == Some(true)),
            ("dual_cross_attention", raw.dual_cross_attention == Some(true)),
            (
                "only_cross_attention",
                raw.only_cross_attention.as_ref().is_some_and(|v| v.as_bool() != Some(false)),
            ),
        ];
        if let Some((key, _)) = unsupported.iter().find(|(_, bad)| *bad) {
            usage!(
                "{}: `{key}` has a value msfp's SD UNet does not implement (it implements SD1.x/2.x UNets)",
                path.display()
            );
        }
        let heads = match raw.attention_head_dim {
            serde_json::Value::Number(n) => Heads::Count(n.as_u64().unwrap_or(8) as usize),
            serde_json::Value::Array(v) if v.windows(2).all(|w| w[0] == w[1]) && !v.is_empty() => {
                Heads::Count(v[0].as_u64().unwrap_or(8) as usize)
            }
            other => usage!(
                "{}: attention_head_dim {other} (per-level head counts) is not supported",
                path.display()
            ),
        };
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            block_out_channels: raw.block_out_channels,
            cross_attention,
            layers_per_block: raw.layers_per_block,
            heads,
            norm_num_groups: raw.norm_num_groups,
            norm_eps: raw.norm_eps,
            cross_attention_dim: raw.cross_attention_dim,
            transformer_layers: raw.transformer_layers_per_block.unwrap_or(1),
            use_linear_projection: raw.use_linear_projection.unwrap_or(false),
            flip_sin_to_cos: raw.flip_sin_to_cos.unwrap_or(true),
            freq_shift: raw.freq_shift.unwrap_or(0.0),
            sample_size: raw.sample_size.unwrap_or(64),
        })
    }
}

/// AutoencoderKL (SD's first stage; also sd-vae-ft-ema/mse for DiT).
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// Latents are multiplied by this before diffusion (SD: 0.18215).
    pub scaling_factor: f64,
}

impl VaeConfig {
    pub fn sd() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
        }
    }

    pub fn from_diffusers_json(path: &Path) -> Result<Self> {
        let raw: DiffusersVae = read_json(path)?;
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            block_out_channels: raw.block_out_channels,
            layers_per_block: raw.layers_per_block,
            latent_channels: raw.latent_channels,
            norm_num_groups: raw.norm_num_groups,
            scaling_factor: raw.scaling_factor.unwrap_or(0.18215),
        })
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::usage(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::usage(format!("{}: not a diffusers config this model reads ({e})", path.display()))
    })
}

#[derive(Deserialize)]
struct DiffusersUnet {
    in_channels: usize,
    out_channels: usize,
    block_out_channels: Vec<usize>,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    mid_block_type: Option<String>,
    layers_per_block: usize,
    attention_head_dim: serde_json::Value,
    norm_num_groups: usize,
    norm_eps: f64,
    cross_attention_dim: usize,
    transformer_layers_per_block: Option<usize>,
    use_linear_projection: Option<bool>,
    flip_sin_to_cos: Option<bool>,
    freq_shift: Option<f64>,
    sample_size: Option<usize>,
    act_fn: Option<String>,
    class_embed_type: Option<String>,
    addition_embed_type: Option<String>,
    num_class_embeds: Option<usize>,
    upcast_attention: Option<bool>,
    dual_cross_attention: Option<bool>,
    only_cross_attention: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct DiffusersVae {
    in_channels: usize,
    out_channels: usize,
    block_out_channels: Vec<usize>,
    layers_per_block: usize,
    latent_channels: usize,
    norm_num_groups: usize,
    scaling_factor: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cin256-v2.yaml`'s `num_heads: 1` without `num_head_channels`: one full-width head at
    /// every attention level (shapes cannot tell this from 32-wide heads).
    #[test]
    fn cin256_v2_attends_with_one_full_width_head() {
        let cfg = UnetConfig::ldm_cin256_v2();
        for (&c, &attn) in cfg.block_out_channels.iter().zip(&cfg.cross_attention) {
            if attn {
                assert_eq!(cfg.heads.split(c), (1, c), "level of {c} channels");
            }
        }
    }
}
