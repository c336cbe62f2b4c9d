//! Reading weights published by other tools: safetensors files and PyTorch checkpoints
//! (`torch.save` zip archives, e.g. Lightning `.ckpt` files), one tensor at a time, as f32 host
//! tensors.
//!
//! PyTorch checkpoints are pickles. They are parsed by `pytorch-reader`, the reader that
//! burn-store's `PytorchStore` is built on, used directly because msfp wants raw tensors by name
//! (its own key maps do the renaming; `PytorchStore` only loads into a burn `Module` and adapts
//! Linear layouts on the way). The choice rests on what that reader does, checked against its
//! source and by this crate's tests:
//! - it never executes anything: it is a Rust stack machine; a `GLOBAL`/`REDUCE` it does not
//!   know (`os.system`, `builtins.eval`, a Lightning callback class) becomes an opaque value;
//!   only `torch._utils._rebuild_tensor*`, `OrderedDict` and `set` are interpreted;
//! - it walks nested dicts, so a Lightning checkpoint's `state_dict` sits beside ints, strings
//!   and callback dicts without trouble;
//! - tensor bytes are read lazily, per tensor, with storage offsets and strided views gathered,
//!   so a 4 GB checkpoint never needs twice its size in memory;
//! - it bounds every length the file declares (hostile or truncated files fail cleanly).
//!
//! Safetensors files are read here directly (header, then one tensor at a time at its offset)
//! rather than through `train::params::load_safetensors`, which holds the whole file in memory.

mod checkpoint;

pub use checkpoint::{Checkpoint, ElemType, TensorInfo};
