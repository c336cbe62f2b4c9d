//! Reading weights published by other tools: safetensors files and PyTorch checkpoints
//! (`torch.save` zip archives, e.g. Lightning `.ckpt` files), one tensor at a time, as f32 host
//! tensors.
//!
//! PyTorch checkpoints are pickles, and a pickle is a program. They are read by this crate's own
//! pickle reader ([`pickle`]), which describes what the pickle would build and never builds it,
//! and [`torch`], which knows torch.save's two containers (zip, legacy) and the few calls that
//! rebuild tensors:
//! - nothing is ever executed or looked up: `os.system`, `builtins.eval`, a Lightning callback
//!   class used as a dict key (pytorch-lightning 1.4, which wrote `sd-v1-4.ckpt` and the CompVis
//!   LDM files), hyper-parameter objects of classes that do not exist here: all are described
//!   values, inert wherever they sit; one placed where a tensor is needed is an error naming it;
//! - only the entries under `state_dict` (Lightning) or the top-level dict are listed, and a
//!   tensor's bytes are read when a loader asks for it, strided views gathered, so a 4 GB
//!   checkpoint never needs twice its size in memory;
//! - every length the file declares is checked against what is there (hostile or truncated
//!   files fail with one line naming the file).
//!
//! (burn-store's `pytorch-reader` was used before: it refuses a class as a dict key and any
//! object whose state holds tensors, i.e. Lightning 1.4 checkpoints as published.)
//!
//! Safetensors files are read here directly (header, then one tensor at a time at its offset)
//! rather than through `base::params::load_safetensors`, which holds the whole file in memory.

mod checkpoint;
pub mod pickle;
pub mod torch;

pub use checkpoint::{Checkpoint, ElemType, TensorInfo};
