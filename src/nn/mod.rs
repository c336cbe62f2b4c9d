//! The layers every model in msfp is built from. Models never call burn's layers for anything
//! that carries a weight matrix: they go through these, so that one model definition serves as
//! the full-precision teacher and, once quantizers and adapters are attached here, as the student.

pub mod attention;
pub mod conv;
pub mod embedding;
pub mod linear;
pub mod norm;
pub mod router;
pub mod site;

pub use crate::base::init;
pub use crate::base::step::{Route, StepCtx};
pub use crate::kernels::activation::{gelu, gelu_tanh, silu};
pub use crate::kernels::add::{add, add_channel_shift, add_gated};
pub use crate::kernels::resample::upsample_nearest2;
pub use attention::{Attention, SelfAttention};
pub use conv::Conv2d;
pub use embedding::{ClassEmbedding, Embedding, sinusoidal_embedding, timestep_embedding};
pub use linear::Linear;
pub use norm::{GroupNorm, LayerNorm, layer_norm};
pub use router::Router;

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
