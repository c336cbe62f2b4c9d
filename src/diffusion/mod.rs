//! Noise schedules, the training objective and samplers.

pub mod sampler;
pub mod schedule;

pub use sampler::{Sampler, SamplerStep, sample};
pub use schedule::NoiseSchedule;
