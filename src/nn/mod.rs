//! The layers every model in msfp is built from. Models never call burn's layers for anything
//! that carries a weight matrix: they go through these, so that one model definition serves as
//! the full-precision teacher and, once quantizers and adapters are attached here, as the student.

pub mod attention;
pub mod conv;
pub mod embedding;
pub mod init;
pub mod linear;
pub mod norm;

pub use attention::SelfAttention;
pub use conv::Conv2d;
pub use embedding::{ClassEmbedding, timestep_embedding};
pub use linear::Linear;
pub use norm::{GroupNorm, layer_norm};

/// What a forward pass knows about the denoising step it serves. Passed explicitly through
/// every layer so that per-timestep quantizer state is selected by the timestep itself (never
/// by a hidden call counter): a run can resume, or sample with any step count, at any step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCtx {
    /// The training-schedule timestep shared by the whole batch, when there is one.
    pub timestep: Option<usize>,
}

impl StepCtx {
    pub fn at(timestep: usize) -> Self {
        Self { timestep: Some(timestep) }
    }
}
