//! The bottom layer: what every other module may use and which uses none of them. Parameter
//! initialisation from the project's RNG ([`init`]), named parameters and host tensors with their
//! safetensors I/O ([`params`]), atomic file writes ([`fs`]) and the step context every layer
//! reads ([`step`]). (`error`, `rng` and `device` are leaves of the same layer at the crate root.)

pub mod fs;
pub mod init;
pub mod params;
pub mod step;
