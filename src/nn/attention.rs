//! Multi-head self-attention over tokens `[B, N, C]`, written out as its two matmuls
//! (`Q K^T` and `P V`) so that their inputs can be quantized later.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};

use super::{Linear, StepCtx};
use crate::rng::SeededRng;

#[derive(Module, Debug)]
pub struct SelfAttention {
    pub qkv: Linear,
    pub proj: Linear,
    pub heads: usize,
}

impl SelfAttention {
    pub fn new(dim: usize, heads: usize, rng: &mut SeededRng, device: &Device) -> Self {
        Self {
            qkv: Linear::new(dim, 3 * dim, true, rng, device),
            proj: Linear::new(dim, dim, true, rng, device),
            heads,
        }
    }

    pub fn forward(&self, x: Tensor<3>, ctx: &StepCtx) -> Tensor<3> {
        let [b, n, c] = x.dims();
        let h = self.heads;
        let d = c / h;
        // [B, N, 3, H, D] -> [3, B, H, N, D]
        let qkv = self.qkv.forward(x, ctx).reshape([b, n, 3, h, d]).permute([2, 0, 3, 1, 4]);
        let q = qkv.clone().slice([0..1]).squeeze_dim::<4>(0);
        let k = qkv.clone().slice([1..2]).squeeze_dim::<4>(0);
        let v = qkv.slice([2..3]).squeeze_dim::<4>(0);
        let scores = q.matmul(k.transpose()) / (d as f64).sqrt();
        let probs = softmax(scores, 3);
        let out = probs.matmul(v).swap_dims(1, 2).reshape([b, n, c]);
        self.proj.forward(out, ctx)
    }
}
