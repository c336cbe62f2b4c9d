//! Low-rank adapters for quantization-aware fine-tuning. [`talora`] holds MSFP's timestep-aware
//! LoRA bank (K adapters per layer, placement merged or branch); the router that picks one
//! adapter per denoising step is a small network, `nn::router` (its kind, [`RouterKind`], is
//! configured here). K = 1 is plain (QA)LoRA.

pub mod talora;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use talora::{Placement, Talora};

/// How the adapter of a denoising step is chosen (`lora.router`).
/// - `range`: K equal ranges of the training timesteps, no parameters.
/// - `learned`: a small MLP on the sinusoidal timestep embedding (see `nn::router`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RouterKind {
    #[default]
    Range,
    Learned,
}

/// `[lora]`: the adapters attached to every quantized layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank r of each adapter; 0 attaches none (post-training quantization only).
    pub rank: usize,
    /// Adapters per layer (K); 1 is plain LoRA.
    pub adapters: usize,
    pub router: RouterKind,
    pub placement: Placement,
    /// LoRA's alpha: the low-rank update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Hidden width of the learned router's MLP.
    pub router_hidden: usize,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 4,
            adapters: 4,
            router: RouterKind::Range,
            placement: Placement::Merged,
            alpha: 4.0,
            router_hidden: 32,
        }
    }
}

impl LoraConfig {
    pub fn validate(&self, section: &str) -> Result<()> {
        if self.adapters == 0 {
            return Err(Error::usage(format!(
                "{section}.adapters = 0 is out of range: it must be at least 1 (1 is plain LoRA)"
            )));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::usage(format!("{section}.alpha = {} must be a positive number", self.alpha)));
        }
        if self.router == RouterKind::Learned && self.router_hidden == 0 {
            return Err(Error::usage(format!(
                "{section}.router_hidden = 0: the learned router needs a width >= 1"
            )));
        }
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.rank > 0
    }
}
