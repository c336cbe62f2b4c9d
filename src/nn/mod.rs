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

/// The `branch` TALoRA placement's adapters of a layer, when it has them (its full-precision
/// low-rank path beside the quantized weight).
pub fn branch(lora: Option<&crate::lora::Talora>) -> Option<&crate::lora::Talora> {
    lora.filter(|l| l.placement == crate::lora::Placement::Branch)
}

/// The layer's weight quantizer where it runs inside the layer's operation
/// (`kernels::qweight`: flex, no deployed weight sets, no merged adapters), as that operation's
/// scale and quantizer; `None` where [`quantized_weight`] makes the weight a tensor.
pub(crate) fn weight_in_op(
    device: &burn::tensor::Device,
    quant: Option<&crate::quant::layer::LayerQuant>,
    lora: Option<&crate::lora::Talora>,
) -> Option<(burn::tensor::Tensor<1>, std::sync::Arc<dyn crate::kernels::qweight::WeightQuantizer>)> {
    let quant = quant.filter(|q| q.weight_sets.is_none())?;
    let weight = quant.weight.as_ref()?;
    let merged = lora.is_some_and(|l| l.placement == crate::lora::Placement::Merged);
    (!merged && crate::kernels::on_flex(device))
        .then(|| (weight.scale.val(), std::sync::Arc::new(weight.format.clone()) as _))
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
    /// TALoRA: the adapter the router chose for this step. Set by the model, read by layers.
    pub route: Option<Route>,
}

impl StepCtx {
    pub fn at(timestep: usize) -> Self {
        Self { timestep: Some(timestep), route: None }
    }

    /// Routed to adapter `adapter` (a fixed choice, no router gradient).
    pub fn with_adapter(timestep: Option<usize>, adapter: usize) -> Self {
        Self { timestep, route: Some(Route { adapter, straight_through: None }) }
    }
}

/// TALoRA's choice for one step. The forward pass always computes with exactly one adapter;
/// a learned router also hands over its straight-through route `[K]` (value one-hot at
/// `adapter`, gradient the softmax's), which layers weigh every adapter by so that the router
/// learns. Without it (the range router, a deployed model) only the chosen adapter is computed.
#[derive(Debug, Clone)]
pub struct Route {
    pub adapter: usize,
    pub straight_through: Option<burn::tensor::Tensor<1>>,
}
