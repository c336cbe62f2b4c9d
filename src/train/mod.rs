//! What every training loop shares: the optimizer, checkpoints, metrics and progress reporting
//! (named parameters are `base::params`).

#[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
mod adamw_cube;
pub mod checkpoint;
pub mod metrics;
pub mod optim;
