//! The layers every model in msfp is built from. Models never call burn's layers for anything
//! that carries a weight matrix: they go through these, so that one model definition serves as
//! the full-precision teacher and, once quantizers and adapters are attached here, as the student.

pub mod attention;
pub mod conv;
pub mod embedding;
pub mod init;
pub mod linear;
pub mod norm;

pub use crate::kernels::activation::{gelu, gelu_tanh, silu};
pub use crate::kernels::add::{add, add_channel_shift, add_gated};
pub use crate::kernels::resample::upsample_nearest2;
pub use attention::{Attention, SelfAttention};
pub use conv::Conv2d;
pub use embedding::{ClassEmbedding, Embedding, timestep_embedding, timestep_embedding_shifted};
pub use linear::Linear;
pub use norm::{GroupNorm, LayerNorm, layer_norm};

/// The weight a layer computes with and, for the `branch` TALoRA placement, the full-precision
/// low-rank update the layer applies to its unquantized input.
pub fn layer_weight<const D: usize>(
    w0: burn::tensor::Tensor<D>,
    quant: Option<&crate::quant::layer::LayerQuant>,
    lora: Option<&crate::lora::Talora>,
    ctx: &StepCtx,
) -> (burn::tensor::Tensor<D>, Option<burn::tensor::Tensor<D>>) {
    let dims = w0.dims();
    let branch =
        lora.filter(|l| l.placement == crate::lora::Placement::Branch).map(|l| l.delta_like(ctx, dims));
    (quantized_weight(w0, quant, lora, ctx), branch)
}

/// The (quantized) weight: `Q(W0 + B_k A_k)` for the merged placement, `Q(W0)` otherwise, or
/// the deployed per-adapter weight set of a packed model.
pub fn quantized_weight<const D: usize>(
    w0: burn::tensor::Tensor<D>,
    quant: Option<&crate::quant::layer::LayerQuant>,
    lora: Option<&crate::lora::Talora>,
    ctx: &StepCtx,
) -> burn::tensor::Tensor<D> {
    let dims = w0.dims();
    if let Some(sets) = quant.and_then(|q| q.weight_sets.as_ref()) {
        return crate::quant::layer::select_weight_set(sets.val(), ctx).reshape(dims);
    }
    let w = match lora {
        Some(l) if l.placement == crate::lora::Placement::Merged => w0 + l.delta_like(ctx, dims),
        _ => w0,
    };
    match quant {
        Some(q) => q.weight(w),
        None => w,
    }
}

/// What a forward pass knows about the denoising step it serves. Passed explicitly through
/// every layer so that per-timestep quantizer state and the TALoRA adapter choice are selected
/// by the timestep itself (never by a hidden call counter): a run can resume, or sample with any
/// step count, at any step.
#[derive(Debug, Clone, Default)]
pub struct StepCtx {
    /// The training-schedule timestep shared by the whole batch, when there is one.
    pub timestep: Option<usize>,
    /// TALoRA: the adapter mix `[K]` the router chose for this step (one-hot in the forward
    /// pass; straight-through gradients for a learned router). Set by the model, read by layers.
    pub route: Option<burn::tensor::Tensor<1>>,
}

impl StepCtx {
    pub fn at(timestep: usize) -> Self {
        Self { timestep: Some(timestep), route: None }
    }
}
