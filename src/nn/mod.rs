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
