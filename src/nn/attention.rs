//! Multi-head attention over tokens `[B, N, C]`, written out as its two matmuls (`Q K^T` and
//! `P V`) so that their four inputs can carry activation quantizers: [`SelfAttention`] with one
//! fused `qkv` projection (the tiny models), [`Attention`] with separate projections and an
//! optional context (diffusers' layout: SD's self- and cross-attention, the VAE's mid block).
//! On flex the two products, the softmax and the probabilities' quantizer run as one operation
//! that never stores the scores (`kernels::attention`).

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::{Bool, Device, Tensor};

use super::{GroupNorm, Linear, StepCtx};
use crate::kernels::attention::ProbsQuant;
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
        let [q, k, v] = crate::kernels::heads::split_qkv(self.qkv.forward(x, ctx), self.heads);
        let inputs = [&self.q_in, &self.k_in, &self.probs_in, &self.v_in];
        let out = attend(q, k, v, inputs, None, ctx);
        self.proj.forward(out, ctx)
    }

    /// The attention's quantization sites under `prefix`, in forward order: the two projections
    /// and, after `qkv`, the four matmul inputs.
    pub fn sites<'a>(&'a mut self, prefix: &str, out: &mut Vec<crate::nn::site::QuantSite<'a>>) {
        use crate::nn::site::QuantSite;
        let device = self.qkv.weight.val().device();
        out.push(QuantSite::linear(format!("{prefix}.qkv"), &mut self.qkv, false));
        out.push(QuantSite::matmul(format!("{prefix}.q_in"), &mut self.q_in, false, &device));
        out.push(QuantSite::matmul(format!("{prefix}.k_in"), &mut self.k_in, false, &device));
        out.push(QuantSite::matmul(format!("{prefix}.probs_in"), &mut self.probs_in, true, &device));
        out.push(QuantSite::matmul(format!("{prefix}.v_in"), &mut self.v_in, false, &device));
        out.push(QuantSite::linear(format!("{prefix}.proj"), &mut self.proj, false));
    }
}

/// `softmax(Q K^T / sqrt(d)) V` over heads, `[B, H, N, D]` each, returned with the heads merged
/// as `[B, N, H * D]`; the four matmul inputs pass through their (optional) quantizers
/// `[q, k, probs, v]`. `mask` is true where a query may
/// not look (e.g. CLIP's causal mask), broadcast over batch and heads.
pub fn attend(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    inputs: [&MatmulInput; 4],
    mask: Option<Tensor<4, Bool>>,
    ctx: &StepCtx,
) -> Tensor<3> {
    let d = q.dims()[3];
    let [q_in, k_in, probs_in, v_in] = inputs;
    let (q, k, v) = (q_in.forward(q, ctx), k_in.forward(k, ctx), v_in.forward(v, ctx));
    // One operation on flex, the scores never stored; composed where a mask applies or the
    // probabilities are being observed (calibration).
    let observed = probs_in.quant.as_ref().is_some_and(|q| q.observer.is_some());
    if mask.is_none() && !observed {
        let probs = probs_in.quant.as_ref().and_then(|q| q.act.as_ref()).map(|act| {
            let (scale, zero_point) = act.params(ctx);
            ProbsQuant { rows: Arc::new(act.format.clone()), scale, zero_point }
        });
        if let Some(out) = crate::kernels::attention::attention(&q, &k, &v, probs.as_ref()) {
            return out;
        }
    }
    let scores = crate::kernels::matmul::matmul_div(q, k.transpose(), (d as f64).sqrt());
    let scores = match mask {
        Some(m) => scores.mask_fill(m, f32::NEG_INFINITY),
        None => scores,
    };
    let probs = probs_in.forward(crate::kernels::softmax::softmax(scores), ctx);
    crate::kernels::matmul::matmul_merge_heads(probs, v)
}

/// `[B, N, H * D] -> [B, H, N, D]`.
fn split_heads(x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, n, c] = x.dims();
    x.reshape([b, n, heads, c / heads]).swap_dims(1, 2)
}

/// Attention with separate `to_q`/`to_k`/`to_v` projections and `to_out.0`, as diffusers lays it
/// out. Keys and values come from `context` when given (cross-attention on the text embedding),
/// else from the input. With `group_norm` (the VAE's mid block) it works on feature maps.
#[derive(Module, Debug)]
pub struct Attention {
    pub group_norm: Option<GroupNorm>,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    /// One layer (diffusers' `ModuleList[Linear, Dropout]`, so that the key is `to_out.0`).
    pub to_out: Vec<Linear>,
    pub heads: usize,
    pub q_in: MatmulInput,
    pub k_in: MatmulInput,
    pub probs_in: MatmulInput,
    pub v_in: MatmulInput,
}

impl Attention {
    /// `heads` heads of width `head_dim`; keys/values from `context_dim` features (cross) or
    /// from the query's own `query_dim`.
    pub fn new(
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Self {
        let inner = heads * head_dim;
        let kv_dim = context_dim.unwrap_or(query_dim);
        Self {
            group_norm: None,
            to_q: Linear::new(query_dim, inner, qkv_bias, rng, device),
            to_k: Linear::new(kv_dim, inner, qkv_bias, rng, device),
            to_v: Linear::new(kv_dim, inner, qkv_bias, rng, device),
            to_out: vec![Linear::new(inner, query_dim, true, rng, device)],
            heads,
            q_in: MatmulInput::default(),
            k_in: MatmulInput::default(),
            probs_in: MatmulInput::default(),
            v_in: MatmulInput::default(),
        }
    }

    /// Tokens `[B, N, C]`, optional context `[B, M, C_ctx]` -> `[B, N, C]`.
    pub fn forward(&self, x: Tensor<3>, context: Option<Tensor<3>>, ctx: &StepCtx) -> Tensor<3> {
        let kv = context.unwrap_or_else(|| x.clone());
        let q = split_heads(self.to_q.forward(x, ctx), self.heads);
        let k = split_heads(self.to_k.forward(kv.clone(), ctx), self.heads);
        let v = split_heads(self.to_v.forward(kv, ctx), self.heads);
        let inputs = [&self.q_in, &self.k_in, &self.probs_in, &self.v_in];
        self.to_out[0].forward(attend(q, k, v, inputs, None, ctx), ctx)
    }

    /// Feature maps `[B, C, H, W]`: group norm, attention over the `H * W` positions, residual.
    pub fn forward_spatial(&self, x: Tensor<4>, ctx: &StepCtx) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let normed = match &self.group_norm {
            Some(norm) => norm.forward(x.clone()),
            None => x.clone(),
        };
        let tokens = normed.reshape([b, c, h * w]).swap_dims(1, 2);
        let out = self.forward(tokens, None, ctx).swap_dims(1, 2).reshape([b, c, h, w]);
        x + out
    }

    /// The attention's quantization sites under `prefix`, in forward order.
    pub fn sites<'a>(&'a mut self, prefix: &str, out: &mut Vec<crate::nn::site::QuantSite<'a>>) {
        use crate::nn::site::QuantSite;
        let device = self.to_q.weight.val().device();
        out.push(QuantSite::linear(format!("{prefix}.to_q"), &mut self.to_q, false));
        out.push(QuantSite::linear(format!("{prefix}.to_k"), &mut self.to_k, false));
        out.push(QuantSite::linear(format!("{prefix}.to_v"), &mut self.to_v, false));
        out.push(QuantSite::matmul(format!("{prefix}.q_in"), &mut self.q_in, false, &device));
        out.push(QuantSite::matmul(format!("{prefix}.k_in"), &mut self.k_in, false, &device));
        out.push(QuantSite::matmul(format!("{prefix}.probs_in"), &mut self.probs_in, true, &device));
        out.push(QuantSite::matmul(format!("{prefix}.v_in"), &mut self.v_in, false, &device));
        out.push(QuantSite::linear(format!("{prefix}.to_out.0"), &mut self.to_out[0], false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::params::host_values;
    use crate::quant::layer::{ActQuant, LayerQuant};
    use burn::tensor::TensorData;

    /// The fused attention (flex, no mask) against the composed one (the same call with a mask
    /// that masks nothing): values, the gradients of `Q`, `K`, `V` (strided views of one
    /// projection) and of the probabilities' quantizer scale and zero point, with and without
    /// that quantizer; `(n, m) = (300, 3600)` splits the query rows into two blocks.
    #[test]
    fn fused_attention_matches_composed() {
        let device = Device::flex().autodiff();
        for (n, m, quantized) in [(6, 5, true), (6, 5, false), (300, 3600, true)] {
            let (b, h, d) = if n > 100 { (1, 1, 4) } else { (2, 3, 4) };
            let mut rng = SeededRng::new(40);
            let (q0, kv0, up) =
                (rng.normals(b * n * h * d), rng.normals(b * m * 2 * h * d), rng.normals(b * n * h * d));
            let run = |fused: bool| {
                let qt = Tensor::<3>::from_data(TensorData::new(q0.clone(), [b, n, h * d]), &device)
                    .require_grad();
                let kvt = Tensor::<3>::from_data(TensorData::new(kv0.clone(), [b, m, 2 * h * d]), &device)
                    .require_grad();
                let q = split_heads(qt.clone(), h);
                let kv = kvt.clone().reshape([b, m, 2, h, d]).permute([2, 0, 3, 1, 4]);
                let k = kv.clone().slice([0..1]).squeeze_dim::<4>(0);
                let v = kv.slice([1..2]).squeeze_dim::<4>(0);
                let scale =
                    Tensor::<1>::from_data(TensorData::new(vec![0.3f32, 0.02], [2]), &device).require_grad();
                let zero =
                    Tensor::<1>::from_data(TensorData::new(vec![0.1f32, -0.01], [2]), &device).require_grad();
                let act = ActQuant::new("ue2m2".parse().unwrap(), scale, Some(zero), 1000);
                let probs_in = MatmulInput {
                    quant: quantized.then(|| LayerQuant {
                        weight: None,
                        act: Some(act),
                        observer: None,
                        weight_sets: None,
                    }),
                };
                let none = MatmulInput::default();
                let mask = (!fused).then(|| {
                    Tensor::<4, Bool>::from_data(TensorData::new(vec![false; n * m], [1, 1, n, m]), &device)
                });
                if fused {
                    let direct = crate::kernels::attention::attention(&q, &k, &v, None);
                    assert!(direct.is_some(), "the fused path applies on flex");
                }
                let out = attend(q, k, v, [&none, &none, &probs_in, &none], mask, &StepCtx::at(900));
                let up = Tensor::<3>::from_data(TensorData::new(up.clone(), [b, n, h * d]), &device);
                let grads = (out.clone() * up).sum().backward();
                let quant = probs_in.quant.as_ref().and_then(|q| q.act.as_ref());
                let ds = quant.map(|a| host_values(a.scale.grad(&grads).unwrap()));
                let dz = quant.map(|a| host_values(a.zero_point.as_ref().unwrap().grad(&grads).unwrap()));
                (
                    host_values(out),
                    host_values(qt.grad(&grads).unwrap()),
                    host_values(kvt.grad(&grads).unwrap()),
                    ds,
                    dz,
                )
            };
            let (f, c) = (run(true), run(false));
            if n < 100 {
                assert_eq!(f.0, c.0, "n {n}: one block is the composed version's products, bit for bit");
            }
            let close = |what: &str, a: &[f32], r: &[f32], tol: f32| {
                assert_eq!(a.len(), r.len());
                for (i, (a, r)) in a.iter().zip(r).enumerate() {
                    assert!((a - r).abs() <= tol * (1.0 + r.abs()), "n {n} {what}[{i}]: {a} vs {r}");
                }
            };
            close("values", &f.0, &c.0, 1e-5);
            close("dQ", &f.1, &c.1, 1e-4);
            close("dK, dV", &f.2, &c.2, 1e-4);
            if quantized {
                let (ds, dz) = (f.3.unwrap(), f.4.unwrap());
                close("d scale", &ds, &c.3.unwrap(), 1e-3);
                close("d zero", &dz, &c.4.unwrap(), 1e-3);
                assert!(ds[1] != 0.0 && ds[0] == 0.0, "timestep 900 trains slot 1 only: {ds:?}");
            }
        }
    }
}
