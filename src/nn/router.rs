//! TALoRA's router (MSFP): maps the denoising step's timestep to one of K adapters. It is a
//! small network of this layer's modules, so it lives in `nn`; its kind is `lora::RouterKind`.
//!
//! - `range`: K equal ranges of the training timesteps, no parameters.
//! - `learned`: a small MLP on the sinusoidal timestep embedding, shared by all layers. Forward
//!   is hard (one-hot at the argmax), backward is the softmax's (straight-through), so the
//!   choice stays discrete at sampling time yet learns from the distillation loss. Its logits are
//!   the range router's one-hot plus the MLP, whose output layer starts at zero: training starts
//!   from the range assignment and moves boundaries where the loss says so (our reconstruction;
//!   the paper does not say how the router is initialised).

use burn::module::Module;
use burn::tensor::activation::softmax;

use burn::tensor::{Device, Tensor, TensorData};

use super::{Linear, silu, timestep_embedding};
use crate::base::step::{Route, StepCtx};
use crate::lora::RouterKind;
use crate::rng::SeededRng;

const EMBED_DIM: usize = 32;

#[derive(Module, Debug)]
pub struct Router {
    pub fc1: Option<Linear>,
    pub fc2: Option<Linear>,
    pub adapters: usize,
    pub timesteps: usize,
}

impl Router {
    pub fn new(
        kind: RouterKind,
        adapters: usize,
        hidden: usize,
        timesteps: usize,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Self {
        let learned = kind == RouterKind::Learned;
        Self {
            fc1: learned.then(|| Linear::new(EMBED_DIM, hidden, true, rng, device)),
            fc2: learned.then(|| Linear::zeros(hidden, adapters, device)),
            adapters,
            timesteps,
        }
    }

    pub fn kind(&self) -> RouterKind {
        if self.fc1.is_some() { RouterKind::Learned } else { RouterKind::Range }
    }

    /// The range router's choice: adapter `t * K / T`.
    pub fn range_choice(&self, t: usize) -> usize {
        (t.min(self.timesteps - 1) * self.adapters) / self.timesteps
    }

    fn one_hot(&self, k: usize, device: &Device) -> Tensor<1> {
        let mut v = vec![0.0f32; self.adapters];
        v[k] = 1.0;
        Tensor::from_data(TensorData::new(v, [self.adapters]), device)
    }

    fn logits(&self, t: usize, device: &Device) -> Option<Tensor<1>> {
        let (fc1, fc2) = (self.fc1.as_ref()?, self.fc2.as_ref()?);
        let ctx = StepCtx::at(t);
        let temb = timestep_embedding(Tensor::<1>::from_floats([t as f32], device), EMBED_DIM);
        let mlp = fc2.forward(silu(fc1.forward(temb, &ctx)), &ctx).reshape([self.adapters]);
        Some(mlp + self.one_hot(self.range_choice(t), device))
    }

    /// The adapter chosen at timestep `t`.
    pub fn choice(&self, t: usize, device: &Device) -> usize {
        match self.logits(t, device) {
            None => self.range_choice(t),
            Some(l) => {
                let v = crate::base::params::host_values(l);
                // First maximum, as argmax conventionally breaks ties.
                (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best })
            }
        }
    }

    /// The route for timestep `t`: the chosen adapter and, for the learned router, the
    /// straight-through `one_hot + softmax - detach(softmax)` (value one-hot, gradient the
    /// softmax's).
    pub fn route(&self, t: usize, device: &Device) -> Route {
        let adapter = self.choice(t, device);
        let straight_through = self.logits(t, device).map(|l| {
            let soft = softmax(l, 0);
            // `soft - soft` is exactly 0, so the value is exactly one-hot (`(hard + soft) -
            // soft` would not be: the packed model relies on exact selection).
            self.one_hot(adapter, device) + (soft.clone() - soft.detach())
        });
        Route { adapter, straight_through }
    }

    /// `ctx` with its route set, when it has a timestep.
    pub fn routed(&self, ctx: &StepCtx, device: &Device) -> StepCtx {
        StepCtx { timestep: ctx.timestep, route: ctx.timestep.map(|t| self.route(t, device)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_router_splits_the_schedule_evenly() {
        let device = Device::flex();
        let r = Router::new(RouterKind::Range, 4, 0, 1000, &mut SeededRng::new(0), &device);
        let picks: Vec<usize> = [0, 249, 250, 999, 5000].iter().map(|&t| r.choice(t, &device)).collect();
        assert_eq!(picks, [0, 0, 1, 3, 3]);
        let route = r.route(600, &device);
        assert_eq!(route.adapter, 2);
        assert!(route.straight_through.is_none(), "the range router has nothing to learn");
    }

    #[test]
    fn learned_router_starts_as_the_range_router_and_passes_softmax_gradients() {
        let device = Device::flex().autodiff();
        let r = Router::new(RouterKind::Learned, 3, 8, 1000, &mut SeededRng::new(0), &device);
        for t in [0, 400, 999] {
            assert_eq!(r.choice(t, &device), r.range_choice(t));
        }
        let route = r.route(500, &device).straight_through.expect("learned route");
        assert_eq!(
            route.clone().into_data().try_into_vec::<f32>().unwrap(),
            [0.0, 1.0, 0.0],
            "value is exactly one-hot"
        );
        // d/dlogits of route[0]: the softmax Jacobian's row 0, non-zero.
        let grads = route.slice([0..1]).sum().backward();
        let g = r.fc2.as_ref().unwrap().bias.as_ref().unwrap().val().grad(&grads).expect("router gradient");
        assert!(g.abs().sum().into_scalar::<f32>() > 0.0);
    }
}
