//! msfp: W4A4 floating-point quantization of diffusion models (MSFP, HQ-DiT) on Burn.
//!
//! The crate is organised by concept: `nn` holds the layers every model is built from, `models`
//! the networks, `diffusion` schedules and samplers, `train` the machinery of resumable training,
//! `quant` number formats and fake quantizers, `pipeline` the stages of a job and `report` what a
//! user looks at.

// Lints allowed crate-wide, each for a reason that holds everywhere here:
// - single_range_in_vec_init: burn's `tensor.slice([a..b])` is a slice of one dimension, not a Vec.
// - too_many_arguments, type_complexity: kernel entry points take every dimension explicitly, and
//   tests tabulate their cases as tuples.
// - large_enum_variant, result_large_err: a model enum holds one network and the fused op's
//   fallback returns its input tensor; boxing them buys nothing.
#![allow(clippy::single_range_in_vec_init)]
#![allow(clippy::too_many_arguments, clippy::type_complexity)]
#![allow(clippy::large_enum_variant, clippy::result_large_err)]

#[macro_use]
pub mod error;
pub mod base;
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

pub use error::{Error, Result};
/// The job's configuration (`pipeline::config`), at the crate root for the CLI and scripts.
pub use pipeline::config;
pub use pipeline::config::Config;
