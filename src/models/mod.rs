//! Model definitions. Every model is built from `crate::nn` layers.

pub mod blocks;
pub mod classifier;
pub mod clip;
pub mod dit;
pub mod dit_weights;
pub mod family;
pub mod registry;
pub mod sd;
pub mod unet;

use std::path::PathBuf;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use classifier::Classifier;
pub use dit::Dit;
pub use family::{Cond, Family};
pub use sd::SdUnet;
pub use unet::TinyUnet;

pub use dit::DitConfig;
pub use sd::{SdConfig, SdPreset};
pub use unet::UnetConfig;

use crate::error::Result;
use crate::nn::StepCtx;
use crate::rng::SeededRng;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    TinyUnet,
    /// The DiT code: the tiny MNIST DiT or, with `[model.dit]` set so, DiT-XL/2 as published.
    #[serde(alias = "dit")]
    TinyDit,
    /// Stable Diffusion v1.x (`[model.sd]`): text-conditioned latent diffusion.
    Sd,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub kind: ModelKind,
    /// Weights to load for `sample`/`eval` (safetensors written by `pretrain`).
    pub weights: Option<PathBuf>,
    pub unet: UnetConfig,
    pub dit: DitConfig,
    pub sd: SdConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::TinyUnet,
            weights: None,
            unet: UnetConfig::default(),
            dit: DitConfig::default(),
            sd: SdConfig::default(),
        }
    }
}

impl ModelConfig {
    /// The smallest tiny UNet the unit tests build (8 base channels, two levels).
    #[cfg(test)]
    pub fn test_unet() -> Self {
        let mut cfg = Self::default();
        cfg.unet.base_channels = 8;
        cfg.unet.channel_mult = vec![1, 2];
        cfg.unet.attention_heads = 2;
        cfg.unet.groups = 4;
        cfg
    }

    /// `[model]` and its family's section (a kind's own checks only for that kind).
    pub fn validate(&self) -> Result<()> {
        if self.kind == ModelKind::TinyDit {
            self.dit.validate_files(self.weights.as_deref())?;
        }
        if self.kind == ModelKind::Sd {
            self.sd.validate(self.weights.as_deref())?;
        }
        self.unet.validate()?;
        self.dit.validate()
    }
}

/// Number of classes of the tiny models (MNIST digits); label `NUM_CLASSES` is the null label.
pub const NUM_CLASSES: usize = 10;

/// A noise-prediction network `eps(x_t, t, c)`: the model families msfp quantizes. The pipeline
/// stages see only this type, a [`Cond`] and a [`Family`]; a new family adds a variant here and
/// its loader.
#[derive(Module, Debug)]
pub enum Denoiser {
    Unet(TinyUnet),
    Dit(Dit),
    Sd(SdUnet),
}

impl Denoiser {
    /// The architecture of `cfg` with seeded random weights (loading replaces them).
    pub fn new(cfg: &ModelConfig, rng: &mut SeededRng, device: &Device) -> Self {
        match cfg.kind {
            ModelKind::TinyUnet => Denoiser::Unet(TinyUnet::new(&cfg.unet, rng, device)),
            ModelKind::TinyDit => Denoiser::Dit(Dit::new(&cfg.dit, rng, device)),
            ModelKind::Sd => Denoiser::Sd(SdUnet::new(&sd::SdArch::of(cfg.sd.preset).unet, rng, device)),
        }
    }

    pub fn kind(&self) -> ModelKind {
        match self {
            Denoiser::Unet(_) => ModelKind::TinyUnet,
            Denoiser::Dit(_) => ModelKind::TinyDit,
            Denoiser::Sd(_) => ModelKind::Sd,
        }
    }

    /// Every quantizable layer, in forward order, with its module path.
    pub fn quant_sites(&mut self) -> Vec<crate::nn::site::QuantSite<'_>> {
        match self {
            Denoiser::Unet(m) => m.quant_sites(),
            Denoiser::Dit(m) => m.quant_sites(),
            Denoiser::Sd(m) => m.quant_sites(),
        }
    }

    pub fn router(&self) -> Option<&crate::nn::Router> {
        match self {
            Denoiser::Unet(m) => m.router.as_ref(),
            Denoiser::Dit(m) => m.router.as_ref(),
            Denoiser::Sd(m) => m.router.as_ref(),
        }
    }

    pub fn router_mut(&mut self) -> &mut Option<crate::nn::Router> {
        match self {
            Denoiser::Unet(m) => &mut m.router,
            Denoiser::Dit(m) => &mut m.router,
            Denoiser::Sd(m) => &mut m.router,
        }
    }

    /// `ctx` carries the batch's shared timestep when there is one (sampling, distillation).
    /// Class-conditional models take [`Cond::Labels`], SD takes [`Cond::Tokens`].
    pub fn forward(&self, x: Tensor<4>, t: Tensor<1>, c: impl Into<Cond>, ctx: &StepCtx) -> Tensor<4> {
        match (self, c.into()) {
            (Denoiser::Unet(m), Cond::Labels(y)) => m.forward(x, t, y, ctx),
            (Denoiser::Dit(m), Cond::Labels(y)) => m.eps(x, t, y, ctx),
            (Denoiser::Sd(m), Cond::Tokens(c)) => m.forward(x, t, c, ctx),
            (model, c) => panic!("a {:?} model cannot take {} conditioning", model.kind(), c.kind()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weight layers a family leaves in full precision on purpose, by path suffix, with why.
    const NOT_SITES: &[(&str, &str)] = &[
        // A table lookup, not a matrix product: nothing to quantize at the input.
        ("class_embed", "an embedding table is a lookup"),
    ];

    /// Every `Linear`/`Conv2d` of a model (a `.weight` of rank 2 or 4) is a quant site or
    /// excluded by name in `NOT_SITES`: a layer forgotten in `quant_sites()` would otherwise stay
    /// in full precision without anything saying so.
    fn assert_every_weight_layer_is_a_site(mut model: Denoiser) {
        let mut layers = Vec::new();
        crate::base::params::for_each_param(&model, |path, _, shape| {
            if let Some(layer) = path.strip_suffix(".weight")
                && matches!(shape.len(), 2 | 4)
            {
                layers.push(layer.to_string());
            }
        });
        let sites: Vec<String> =
            model.quant_sites().into_iter().filter(|s| s.layer.has_weight()).map(|s| s.path).collect();
        let missing: Vec<&String> = layers
            .iter()
            .filter(|l| !sites.contains(l) && !NOT_SITES.iter().any(|(name, _)| l.ends_with(name)))
            .collect();
        assert!(
            missing.is_empty(),
            "{:?}: weight layers that are not quant sites: {missing:?}",
            model.kind()
        );
        for s in &sites {
            assert!(layers.contains(s), "site `{s}` names no weight layer");
        }
    }

    #[test]
    fn every_weight_layer_of_every_family_is_a_quant_site() {
        let device = Device::flex();
        let mut rng = SeededRng::new(0);
        assert_every_weight_layer_is_a_site(Denoiser::new(&ModelConfig::test_unet(), &mut rng, &device));
        let mut dit = ModelConfig { kind: ModelKind::TinyDit, ..Default::default() };
        (dit.dit.hidden, dit.dit.depth, dit.dit.heads) = (32, 2, 2);
        assert_every_weight_layer_is_a_site(Denoiser::new(&dit, &mut rng, &device));
        let mut sd = ModelConfig { kind: ModelKind::Sd, ..Default::default() };
        sd.sd.preset = SdPreset::Tiny;
        assert_every_weight_layer_is_a_site(Denoiser::new(&sd, &mut rng, &device));
    }
}
