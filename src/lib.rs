//! msfp: W4A4 floating-point quantization of diffusion models (MSFP, HQ-DiT) on Burn.
//!
//! The crate is organised by concept: `nn` holds the layers every model is built from, `models`
//! the networks, `diffusion` schedules and samplers, `train` the machinery of resumable training,
//! `quant` number formats and fake quantizers, `pipeline` the stages of a job and `report` what a
//! user looks at.

#[macro_use]
pub mod error;
pub mod base;
pub mod config;
pub mod data;
pub mod device;
pub mod diffusion;
pub mod io;
pub mod kernels;
pub mod lora;
pub mod loss;
pub mod models;
pub mod nn;
pub mod pipeline;
pub mod quant;
pub mod report;
pub mod rng;
pub mod train;

pub use config::Config;
pub use error::{Error, Result};
