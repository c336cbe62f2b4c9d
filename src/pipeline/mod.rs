//! The stages of a job, each a plain function over a config.

pub mod classifier;
pub mod eval;
pub mod pretrain;
pub mod sample;
