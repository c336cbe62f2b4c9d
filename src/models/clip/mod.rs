//! CLIP's text side as Stable Diffusion uses it: the BPE tokenizer and the text transformer.

pub mod text;
pub mod tokenizer;

pub use text::{ClipTextConfig, ClipTextModel};
