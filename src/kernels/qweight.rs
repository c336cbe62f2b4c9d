//! Layers whose weight is quantized inside the operation, on flex: `conv(x, Q(W0)) + b` and
//! `x Q(W0)^T + b`, `Q` a weight quantizer with one scale per block of the weight.
//!
//! Composed (`fake_quantize`, then the layer), `Q(W0)` is a new tensor on every call, kept for
//! the backward, and the backward returns a weight-sized gradient for it only for the quantizer
//! to reduce it to one value per scale: three weight-sized allocations per layer and step (3.4
//! GB each for SD1.4), above glibc's mmap threshold for SD's large layers, so every one faulted
//! in zeroed pages. Here `Q(W0)` is a recycled scratch buffer, made again in the backward for
//! the input gradient, and the weight gradient is reduced to the scales' LSQ gradient at once
//! and its buffer recycled. The same kernels in the same order: the same bits as composed.

use std::fmt::Debug;
use std::sync::Arc;

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;

use super::conv::{self, ConvGeometry};
use super::host::{recycle, scratch, tensor, tensor_like, values};
use super::{linear, record};

/// A weight quantizer over flat weights: scale `scale[b]` for the `b`-th of `scale.len()` equal
/// consecutive blocks (one per output channel, or per group of its fan-in). Implemented by
/// `quant::format::Format` (kernels do not depend on the quantizers).
pub trait WeightQuantizer: Debug + Send + Sync {
    /// `out = Q(w)`.
    fn quantize(&self, w: &[f32], scale: &[f32], out: &mut [f32]);

    /// The scales' (LSQ) gradient for `g`, the gradient of `Q(w)`; with `dw`, `g` is
    /// overwritten by `w`'s (straight-through) gradient.
    fn backward(&self, g: &mut [f32], w: &[f32], scale: &[f32], dw: bool) -> Vec<f32>;
}

/// The layer around the quantized weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// `[c_out, c_in, k, k]` weight over NCHW input (`kernels::conv`).
    Conv { stride: usize, padding: usize },
    /// `[d_out, d_in]` weight over any leading dimensions (`kernels::linear`).
    Linear,
}

impl Layer {
    fn geometry(self, x: &FlexTensor, w: &[usize]) -> ConvGeometry {
        let Layer::Conv { stride, padding } = self else { unreachable!("a convolution") };
        ConvGeometry::new(&x.layout().shape().to_vec(), w, stride, padding)
    }

    /// `(rows, d_in, d_out)` of a linear layer.
    fn sizes(x: &FlexTensor, w: &[usize]) -> (usize, usize, usize) {
        (x.layout().num_elements() / w[1].max(1), w[1], w[0])
    }

    fn forward(self, x: &FlexTensor, w: &[usize], wq: &[f32], bias: Option<&FlexTensor>) -> FlexTensor {
        match self {
            Layer::Conv { .. } => {
                let g = self.geometry(x, w);
                let y = conv::forward(&g, &values(x), wq, bias.map(values).as_deref());
                tensor(y, &[g.batch, g.c_out, g.h_out, g.w_out])
            }
            Layer::Linear => linear::forward_with(x, wq, w[0], bias),
        }
    }

    fn input_grad(self, dy: &[f32], x: &FlexTensor, w: &[usize], wq: &[f32]) -> FlexTensor {
        match self {
            Layer::Conv { .. } => tensor_like(conv::input_grad(&self.geometry(x, w), dy, wq), x),
            Layer::Linear => {
                let (m, d_in, d_out) = Self::sizes(x, w);
                tensor_like(linear::input_grad(dy, wq, m, d_in, d_out), x)
            }
        }
    }

    /// `(dW, db)`.
    fn weight_grad(self, dy: &[f32], x: &FlexTensor, w: &[usize]) -> (Vec<f32>, Vec<f32>) {
        match self {
            Layer::Conv { .. } => conv::weight_grad(&self.geometry(x, w), dy, &values(x)),
            Layer::Linear => {
                let (m, d_in, d_out) = Self::sizes(x, w);
                linear::weight_grad(dy, &values(x), m, d_in, d_out)
            }
        }
    }
}

/// `Q(w)` in a scratch buffer (hand it back with [`recycle`]).
fn quantized(quantizer: &dyn WeightQuantizer, w: &FlexTensor, scale: &FlexTensor) -> Vec<f32> {
    let ws = values(w);
    let mut out = scratch(ws.len());
    quantizer.quantize(&ws, &values(scale), &mut out);
    out
}

fn layer_forward(
    x: &FlexTensor,
    w: &FlexTensor,
    scale: &FlexTensor,
    bias: Option<&FlexTensor>,
    layer: Layer,
    quantizer: &dyn WeightQuantizer,
) -> FlexTensor {
    let wq = quantized(quantizer, w, scale);
    let y = layer.forward(x, &w.layout().shape().to_vec(), &wq, bias);
    recycle(wq);
    y
}

#[backend_extension(Autodiff, Flex)]
pub trait QuantWeightBackend: Backend {
    /// `layer(x, Q(weight)) + bias`, `Q` the `quantizer` with `scale`.
    fn quant_weight_layer(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        layer: Layer,
        quantizer: Arc<dyn WeightQuantizer>,
    ) -> FloatTensor<Self>;

    /// The same without bias.
    fn quant_weight_layer_no_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        layer: Layer,
        quantizer: Arc<dyn WeightQuantizer>,
    ) -> FloatTensor<Self>;
}

impl QuantWeightBackend for Flex {
    fn quant_weight_layer(
        x: FlexTensor,
        weight: FlexTensor,
        scale: FlexTensor,
        bias: FlexTensor,
        layer: Layer,
        quantizer: Arc<dyn WeightQuantizer>,
    ) -> FlexTensor {
        layer_forward(&x, &weight, &scale, Some(&bias), layer, &*quantizer)
    }

    fn quant_weight_layer_no_bias(
        x: FlexTensor,
        weight: FlexTensor,
        scale: FlexTensor,
        layer: Layer,
        quantizer: Arc<dyn WeightQuantizer>,
    ) -> FlexTensor {
        layer_forward(&x, &weight, &scale, None, layer, &*quantizer)
    }
}

/// Parents `[x, weight, scale]` or `[x, weight, scale, bias]`.
#[derive(Debug)]
struct QuantWeightBackward<const N: usize> {
    layer: Layer,
    quantizer: Arc<dyn WeightQuantizer>,
}

impl<const N: usize> Backward<Flex, N> for QuantWeightBackward<N> {
    /// The input, the weight and the scale.
    type State = (FlexTensor, FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, w, scale) = &ops.state;
        let shape = w.layout().shape().to_vec();
        let dy = values(&grad);
        let parents = ops.parents;
        if let Some(node) = &parents[0] {
            let wq = quantized(&*self.quantizer, w, scale);
            let dx = self.layer.input_grad(&dy, x, &shape, &wq);
            recycle(wq);
            grads.register::<Flex>(node.id, dx);
        }
        let bias_node = if N == 4 { parents[3].as_ref() } else { None };
        if parents[1].is_none() && parents[2].is_none() && bias_node.is_none() {
            return;
        }
        let (mut dw, db) = self.layer.weight_grad(&dy, x, &shape);
        let ds = self.quantizer.backward(&mut dw, &values(w), &values(scale), parents[1].is_some());
        match &parents[1] {
            Some(node) => grads.register::<Flex>(node.id, tensor(dw, &shape)),
            None => recycle(dw),
        }
        if let Some(node) = &parents[2] {
            grads.register::<Flex>(node.id, tensor_like(ds, scale));
        }
        if let Some(node) = bias_node {
            grads.register::<Flex>(node.id, tensor(db, &[shape[0]]));
        }
    }
}

impl<C: CheckpointStrategy> QuantWeightBackend for Autodiff<Flex, C> {
    fn quant_weight_layer(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        layer: Layer,
        quantizer: Arc<dyn WeightQuantizer>,
    ) -> FloatTensor<Self> {
        let (xp, wp, sp) = (x.primitive().clone(), weight.primitive().clone(), scale.primitive().clone());
        let out = layer_forward(&xp, &wp, &sp, Some(bias.primitive()), layer, &*quantizer);
        let op = QuantWeightBackward::<4> { layer, quantizer };
        record!(op, [x.node(), weight.node(), scale.node(), bias.node()], (xp, wp, sp), out)
    }

    fn quant_weight_layer_no_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        layer: Layer,
        quantizer: Arc<dyn WeightQuantizer>,
    ) -> FloatTensor<Self> {
        let (xp, wp, sp) = (x.primitive().clone(), weight.primitive().clone(), scale.primitive().clone());
        let out = layer_forward(&xp, &wp, &sp, None, layer, &*quantizer);
        let op = QuantWeightBackward::<3> { layer, quantizer };
        record!(op, [x.node(), weight.node(), scale.node()], (xp, wp, sp), out)
    }
}

/// `layer(x, Q(weight)) + bias` with the quantized weight inside the operation; flex only (the
/// caller checks [`super::on_flex`]). `scale` is flat: one value per block of the weight.
pub fn quantized_layer<const D: usize, const W: usize>(
    x: Tensor<D>,
    weight: Tensor<W>,
    scale: Tensor<1>,
    bias: Option<Tensor<1>>,
    layer: Layer,
    quantizer: Arc<dyn WeightQuantizer>,
) -> Tensor<D> {
    let (x, w, s) = (x.into_dispatch(), weight.into_dispatch(), scale.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(b) => {
            <Dispatch as QuantWeightBackend>::quant_weight_layer(x, w, s, b.into_dispatch(), layer, quantizer)
        }
        None => <Dispatch as QuantWeightBackend>::quant_weight_layer_no_bias(x, w, s, layer, quantizer),
    })
}
