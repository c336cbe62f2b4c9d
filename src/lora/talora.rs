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

use crate::base::init;
use crate::base::step::{Route, StepCtx};
use crate::kernels::slot;
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

    /// The weight update `scaling * B_k A_k` of the routed adapter, `[out, fan_in]` (merged
    /// placement). With a learned router's straight-through route it is `scaling * sum_j
    /// route_j B_j A_j`, the same value (the other terms are `0 * finite`) with each adapter's
    /// gradient sent to the router.
    pub fn delta(&self, ctx: &StepCtx) -> Tensor<2> {
        let [k, out, _] = self.b.dims();
        let fan_in = self.a.dims()[2];
        let mixed = match self.choice(ctx) {
            Choice::One(j) => {
                let (a, b) = (slot(self.a.val(), j), slot(self.b.val(), j));
                b.matmul(a)
            }
            Choice::All(route) => (self.b.val().matmul(self.a.val()) * route.reshape([k, 1, 1])).sum_dim(0),
        };
        mixed.reshape([out, fan_in]) * self.scaling
    }

    /// The update reshaped like the layer's weight.
    pub fn delta_like<const D: usize>(&self, ctx: &StepCtx, dims: [usize; D]) -> Tensor<D> {
        self.delta(ctx).reshape(dims)
    }

    /// The branch placement's factors for this step, `down: [m, fan_in]` and `up: [out, m]`
    /// with the scaling (and a straight-through route) folded into `up`, so that the update is
    /// `up · down`: the layer runs its input through `down` (a rank-m layer of its own kernel
    /// shape) and then `up` (a 1x1), at about m/out of a full-size pass and with no weight-sized
    /// temporary. m = r for the routed adapter; K*r, every adapter weighed by the route, when a
    /// learned router needs the gradient.
    pub fn factors(&self, ctx: &StepCtx) -> (Tensor<2>, Tensor<2>) {
        let [k, out, r] = self.b.dims();
        let fan_in = self.a.dims()[2];
        let (down, up, m) = match self.choice(ctx) {
            Choice::One(j) => (slot(self.a.val(), j), slot(self.b.val(), j), r),
            Choice::All(route) => (self.a.val(), self.b.val() * route.reshape([k, 1, 1]), k * r),
        };
        // [K', out, r] -> [out, K' * r], matching down's [K' * r, fan_in] rows.
        let up = up.swap_dims(0, 1).reshape([out, m]) * self.scaling;
        (down.reshape([m, fan_in]), up)
    }

    fn choice(&self, ctx: &StepCtx) -> Choice {
        let k = self.adapters();
        match (&ctx.route, k) {
            (_, 1) => Choice::One(0),
            (Some(Route { straight_through: Some(route), .. }), _) => Choice::All(route.clone()),
            (Some(route), _) => Choice::One(route.adapter),
            (None, _) => {
                panic!("a TALoRA bank of {k} adapters needs a route: the model sets it from the timestep")
            }
        }
    }
}

/// Which adapters a step computes with.
enum Choice {
    One(usize),
    /// Every adapter, weighed by the straight-through route.
    All(Tensor<1>),
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
            let straight_through = Some(Tensor::from_floats(route.as_slice(), &device));
            let ctx = StepCtx { timestep: Some(0), route: Some(Route { adapter: k, straight_through }) };
            assert_eq!(bank.delta(&ctx).into_data(), only(k).into_data(), "adapter {k}, all weighed");
            let fixed = StepCtx::with_adapter(Some(0), k);
            assert_eq!(bank.delta(&fixed).into_data(), only(k).into_data(), "adapter {k} alone");
            // The branch factors multiply to the same update (to rounding: another order).
            for ctx in [&ctx, &fixed] {
                let (down, up) = bank.factors(ctx);
                let got = crate::base::params::host_values(up.matmul(down));
                let want = crate::base::params::host_values(only(k));
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{g} vs {w}");
                }
            }
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
