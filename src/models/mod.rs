//! Model definitions. Every model is built from `crate::nn` layers.

pub mod classifier;
pub mod clip;
pub mod dit;
pub mod sd;
pub mod unet;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};

pub use classifier::Classifier;
pub use dit::TinyDit;
pub use unet::TinyUnet;

use crate::config::{ModelConfig, ModelKind};
use crate::nn::StepCtx;
use crate::rng::SeededRng;

/// Number of classes of the tiny models (MNIST digits); label `NUM_CLASSES` is the null label.
pub const NUM_CLASSES: usize = 10;

/// A noise-prediction network `eps(x_t, t, y)`.
#[derive(Module, Debug)]
pub enum Denoiser {
    Unet(TinyUnet),
    Dit(TinyDit),
}

impl Denoiser {
    pub fn new(cfg: &ModelConfig, rng: &mut SeededRng, device: &Device) -> Self {
        match cfg.kind {
            ModelKind::TinyUnet => Denoiser::Unet(TinyUnet::new(&cfg.unet, rng, device)),
            ModelKind::TinyDit => Denoiser::Dit(TinyDit::new(&cfg.dit, rng, device)),
        }
    }

    pub fn kind(&self) -> ModelKind {
        match self {
            Denoiser::Unet(_) => ModelKind::TinyUnet,
            Denoiser::Dit(_) => ModelKind::TinyDit,
        }
    }

    /// Every quantizable layer, in forward order, with its module path.
    pub fn quant_sites(&mut self) -> Vec<crate::quant::site::QuantSite<'_>> {
        match self {
            Denoiser::Unet(m) => m.quant_sites(),
            Denoiser::Dit(m) => m.quant_sites(),
        }
    }

    pub fn router(&self) -> Option<&crate::lora::Router> {
        match self {
            Denoiser::Unet(m) => m.router.as_ref(),
            Denoiser::Dit(m) => m.router.as_ref(),
        }
    }

    pub fn router_mut(&mut self) -> &mut Option<crate::lora::Router> {
        match self {
            Denoiser::Unet(m) => &mut m.router,
            Denoiser::Dit(m) => &mut m.router,
        }
    }

    /// The label that means "no class" (classifier-free guidance).
    pub fn null_label(&self) -> usize {
        match self {
            Denoiser::Unet(m) => m.class_embed.null_label(),
            Denoiser::Dit(m) => m.class_embed.null_label(),
        }
    }

    /// `ctx` carries the batch's shared timestep when there is one (sampling, distillation).
    pub fn forward(&self, x: Tensor<4>, t: Tensor<1>, y: Tensor<1, Int>, ctx: &StepCtx) -> Tensor<4> {
        match self {
            Denoiser::Unet(m) => m.forward(x, t, y, ctx),
            Denoiser::Dit(m) => m.forward(x, t, y, ctx),
        }
    }
}
