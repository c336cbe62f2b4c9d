//! TALoRA (MSFP): each quantized layer carries K low-rank adapters `B_k A_k`; the denoising
//! step's route (chosen once per forward pass by the model's [`super::Router`]) selects one.
//!
//! Both factors are kept as matrices over the layer's flattened fan-in, so one bank serves
//! `Linear` (`A_k: [r, in]`, `B_k: [out, r]`) and `Conv2d` (`A_k` is a conv of the layer's kernel
//! into r channels, `[r, in*kh*kw]`, and `B_k` a 1x1 conv, `[out, r]`): the update `B_k A_k`
//! has the shape of the flattened weight either way.
//!
//! Placement ([`Placement`]): `merged` quantizes `W0 + B_k A_k` (EfficientDM's QALoRA; deploys
//! one quantized weight set per adapter), `branch` runs a full-precision low-rank path beside
//! the one quantized `W0` (deploys one weight set plus the small factors).

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::nn::{StepCtx, init};
use crate::rng::SeededRng;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    #[default]
    Merged,
    Branch,
}

#[derive(Module, Debug)]
pub struct Talora {
    /// `[K, r, fan_in]`, Kaiming-uniform like LoRA's A.
    pub a: Param<Tensor<3>>,
    /// `[K, out, r]`, zero-initialised: the fine-tuned student starts as the calibrated one.
    pub b: Param<Tensor<3>>,
    #[module(skip)]
    pub placement: Placement,
    /// `alpha / r`.
    pub scaling: f64,
}

impl Talora {
    pub fn new(
        adapters: usize,
        rank: usize,
        d_out: usize,
        fan_in: usize,
        placement: Placement,
        alpha: f64,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Self {
        let bound = 1.0 / (fan_in as f32).sqrt();
        Self {
            a: init::uniform(rng, [adapters, rank, fan_in], bound, device),
            b: init::constant([adapters, d_out, rank], 0.0, device),
            placement,
            scaling: alpha / rank as f64,
        }
    }

    pub fn adapters(&self) -> usize {
        self.a.dims()[0]
    }

    /// The weight update `scaling * sum_k route_k B_k A_k`, `[out, fan_in]`. With a one-hot
    /// route its value is exactly the chosen adapter's update (the other terms are `0 * finite`);
    /// a straight-through route still sends each adapter's gradient to the router.
    pub fn delta(&self, ctx: &StepCtx) -> Tensor<2> {
        let [k, out, _] = self.b.dims();
        let fan_in = self.a.dims()[2];
        let all = self.b.val().matmul(self.a.val()); // [K, out, fan_in]
        let mixed = match (&ctx.route, k) {
            (_, 1) => all,
            (Some(route), _) => (all * route.clone().reshape([k, 1, 1])).sum_dim(0),
            (None, _) => {
                panic!("a TALoRA bank of {k} adapters needs a route: the model sets it from the timestep")
            }
        };
        mixed.reshape([out, fan_in]) * self.scaling
    }

    /// The update reshaped like the layer's weight.
    pub fn delta_like<const D: usize>(&self, ctx: &StepCtx, dims: [usize; D]) -> Tensor<D> {
        self.delta(ctx).reshape(dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn one_hot_route_selects_exactly_one_adapter() {
        let device = Device::flex();
        let mut bank = Talora::new(3, 2, 4, 5, Placement::Merged, 2.0, &mut SeededRng::new(1), &device);
        let b = SeededRng::new(2).normals(3 * 4 * 2);
        bank.b = Param::from_tensor(Tensor::from_data(TensorData::new(b, [3, 4, 2]), &device));
        let only = |k: usize| {
            let a = bank.a.val().slice([k..k + 1]).reshape([2, 5]);
            let b = bank.b.val().slice([k..k + 1]).reshape([4, 2]);
            b.matmul(a)
        };
        for k in 0..3 {
            let mut route = vec![0.0f32; 3];
            route[k] = 1.0;
            let ctx =
                StepCtx { timestep: Some(0), route: Some(Tensor::from_floats(route.as_slice(), &device)) };
            assert_eq!(bank.delta(&ctx).into_data(), only(k).into_data(), "adapter {k}");
        }
    }

    #[test]
    fn fresh_bank_is_a_zero_update() {
        let device = Device::flex();
        let bank = Talora::new(1, 4, 3, 6, Placement::Branch, 4.0, &mut SeededRng::new(1), &device);
        let d = bank.delta(&StepCtx::default());
        assert_eq!(d.dims(), [3, 6]);
        assert_eq!(d.abs().sum().into_scalar::<f32>(), 0.0);
    }
}
