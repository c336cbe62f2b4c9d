//! The stages of a job, each a plain function over a config.

pub mod ablation;
pub mod calibrate;
pub mod classifier;
pub mod config;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod inspect;
pub mod pretrain;
pub mod sample;
pub mod student;
pub mod timestep_error;
