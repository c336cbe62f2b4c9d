//! What every training loop shares: the optimizer, checkpoints, metrics and progress reporting
//! (named parameters are `base::params`).

#[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
mod adamw_cube;
pub mod checkpoint;
pub mod metrics;
pub mod optim;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, in_range, positive};

/// How `train.lr` changes over the steps (after `train.warmup_steps` of linear warm-up).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    Cosine,
    Linear,
}

/// `[train]`: the optimizer loop that `pretrain`, the classifier and fine-tuning share.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub lr_schedule: LrSchedule,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (0 disables).
    pub grad_clip: f64,
    /// Decay of the exponential moving average of the weights used for sampling (0 disables).
    pub ema_decay: f64,
    /// Probability of replacing the class label by the null label (classifier-free guidance).
    pub label_dropout: f64,
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    pub log_every: usize,
    /// Start from these weights instead of a random initialisation (warm start; the EMA starts
    /// from them too).
    pub init_weights: Option<PathBuf>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 2000,
            batch_size: 64,
            lr: 1e-3,
            lr_schedule: LrSchedule::Cosine,
            warmup_steps: 100,
            weight_decay: 0.0,
            grad_clip: 1.0,
            ema_decay: 0.999,
            label_dropout: 0.1,
            checkpoint_every: 200,
            keep_checkpoints: 3,
            log_every: 10,
            init_weights: None,
        }
    }
}

impl TrainConfig {
    /// `[train]`'s ranges.
    pub fn validate(&self) -> Result<()> {
        positive("train.steps", self.steps)?;
        positive("train.batch_size", self.batch_size)?;
        positive("train.checkpoint_every", self.checkpoint_every)?;
        positive("train.keep_checkpoints", self.keep_checkpoints)?;
        positive("train.log_every", self.log_every)?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::usage(format!(
                "train.lr = {} is out of range: it must be a positive number",
                self.lr
            )));
        }
        in_range("train.weight_decay", self.weight_decay, 0.0, 1.0)?;
        in_range("train.grad_clip", self.grad_clip, 0.0, f64::MAX)?;
        in_range("train.ema_decay", self.ema_decay, 0.0, 0.99999)?;
        in_range("train.label_dropout", self.label_dropout, 0.0, 1.0)?;
        Ok(())
    }
}
