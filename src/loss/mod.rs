//! Distillation losses of quantization-aware fine-tuning. [`dfa`] is MSFP's denoising-factor
//! loss alignment.

pub mod dfa;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use dfa::dfa_weights;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// `||eps_teacher - eps_student||^2`, every step alike.
    Mse,
    /// The MSE weighted by `|gamma_t|^p`, normalised to mean 1 over the trajectory.
    #[default]
    Dfa,
}

/// `[loss]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    pub kind: LossKind,
    /// The power p of `|gamma_t|^p` (1 by default; 2 is EfficientDM's loss on the step's mean).
    pub dfa_power: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self { kind: LossKind::Dfa, dfa_power: 1.0 }
    }
}

impl LossConfig {
    pub fn validate(&self, section: &str) -> Result<()> {
        if !(self.dfa_power.is_finite() && self.dfa_power >= 0.0) {
            return Err(Error::usage(format!(
                "{section}.dfa_power = {} is out of range: it must be a number >= 0",
                self.dfa_power
            )));
        }
        Ok(())
    }

    /// The per-step loss weights for a trajectory with denoising factors `gammas`.
    pub fn step_weights(&self, gammas: &[f64]) -> Vec<f64> {
        match self.kind {
            LossKind::Mse => vec![1.0; gammas.len()],
            LossKind::Dfa => dfa_weights(gammas, self.dfa_power),
        }
    }
}
