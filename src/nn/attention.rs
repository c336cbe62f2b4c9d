//! Multi-head self-attention over tokens `[B, N, C]`, written out as its two matmuls
//! (`Q K^T` and `P V`) so that their four inputs can carry activation quantizers.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};

use super::{Linear, StepCtx};
use crate::quant::layer::LayerQuant;
use crate::rng::SeededRng;

/// One input of an attention matmul: a place for an activation quantizer and nothing else (the
/// matmul has no weight). `None` is full precision.
#[derive(Module, Debug, Default)]
pub struct MatmulInput {
    pub quant: Option<LayerQuant>,
}

impl MatmulInput {
    pub fn forward<const D: usize>(&self, x: Tensor<D>, ctx: &StepCtx) -> Tensor<D> {
        match &self.quant {
            Some(q) => q.input(x, ctx),
            None => x,
        }
    }
}

#[derive(Module, Debug)]
pub struct SelfAttention {
    pub qkv: Linear,
    pub proj: Linear,
    pub heads: usize,
    /// Inputs of `Q K^T`.
    pub q_in: MatmulInput,
    pub k_in: MatmulInput,
    /// Inputs of `P V`: the softmax probabilities (one-sided, in [0, 1]) and the values.
    pub probs_in: MatmulInput,
    pub v_in: MatmulInput,
}

impl SelfAttention {
    pub fn new(dim: usize, heads: usize, rng: &mut SeededRng, device: &Device) -> Self {
        Self {
            qkv: Linear::new(dim, 3 * dim, true, rng, device),
            proj: Linear::new(dim, dim, true, rng, device),
            heads,
            q_in: MatmulInput::default(),
            k_in: MatmulInput::default(),
            probs_in: MatmulInput::default(),
            v_in: MatmulInput::default(),
        }
    }

    pub fn forward(&self, x: Tensor<3>, ctx: &StepCtx) -> Tensor<3> {
        let [b, n, c] = x.dims();
        let h = self.heads;
        let d = c / h;
        // [B, N, 3, H, D] -> [3, B, H, N, D]
        let qkv = self.qkv.forward(x, ctx).reshape([b, n, 3, h, d]).permute([2, 0, 3, 1, 4]);
        let q = self.q_in.forward(qkv.clone().slice([0..1]).squeeze_dim::<4>(0), ctx);
        let k = self.k_in.forward(qkv.clone().slice([1..2]).squeeze_dim::<4>(0), ctx);
        let v = self.v_in.forward(qkv.slice([2..3]).squeeze_dim::<4>(0), ctx);
        let scores = q.matmul(k.transpose()) / (d as f64).sqrt();
        let probs = self.probs_in.forward(softmax(scores, 3), ctx);
        let out = probs.matmul(v).swap_dims(1, 2).reshape([b, n, c]);
        self.proj.forward(out, ctx)
    }

    /// The attention's quantization sites under `prefix`, in forward order: the two projections
    /// and, after `qkv`, the four matmul inputs.
    pub fn sites<'a>(&'a mut self, prefix: &str, out: &mut Vec<crate::quant::site::QuantSite<'a>>) {
        use crate::quant::site::QuantSite;
        let device = self.qkv.weight.val().device();
        out.push(QuantSite::linear(format!("{prefix}.qkv"), &mut self.qkv, false));
        out.push(QuantSite::matmul(format!("{prefix}.q_in"), &mut self.q_in, false, &device));
        out.push(QuantSite::matmul(format!("{prefix}.k_in"), &mut self.k_in, false, &device));
        out.push(QuantSite::matmul(format!("{prefix}.probs_in"), &mut self.probs_in, true, &device));
        out.push(QuantSite::matmul(format!("{prefix}.v_in"), &mut self.v_in, false, &device));
        out.push(QuantSite::linear(format!("{prefix}.proj"), &mut self.proj, false));
    }
}
