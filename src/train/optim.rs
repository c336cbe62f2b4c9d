//! AdamW with global-norm gradient clipping, its state keyed by parameter path.
//!
//! burn's `ModuleOptimizer` keys its state by `ParamId`, which is random per process; keying by
//! module path makes the state a plain safetensors file that resumes bit-exactly into a freshly
//! built model and that a later issue can split into parameter groups by path pattern.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::tensor::Gradients;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::{LrSchedule, TrainConfig};
use crate::base::params::{HostTensor, NamedTensors, collect_grads, for_each_param, map_params};

/// `f` over `items`, in order; on the rayon pool when `parallel`.
fn for_each_maybe_parallel<T: Send, R: Send>(
    parallel: bool,
    items: Vec<T>,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    if parallel { items.into_par_iter().map(&f).collect() } else { items.into_iter().map(f).collect() }
}

/// The squared global norm of `grads` (`[1]`), terms added in path order; on the pool when `parallel`.
fn squared_norm(
    grads: &BTreeMap<String, Tensor<1>>,
    parallel: bool,
    device: Option<&burn::tensor::Device>,
) -> Tensor<1> {
    let zero = || Tensor::zeros([1], &device.cloned().unwrap_or_else(burn::tensor::Device::flex));
    // A GPU adds each gradient's squares onto the running sum in one kernel.
    #[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
    if device.is_some_and(crate::kernels::on_cube) {
        return grads.values().fold(zero(), |acc, g| super::adamw_cube::sum_squares_onto(acc, g.clone()));
    }
    let squares =
        for_each_maybe_parallel(parallel, grads.iter().collect(), |(_, g)| g.clone().square().sum());
    squares.into_iter().reduce(|a, b| a + b).unwrap_or_else(zero)
}

/// The factor gradients are scaled by before the update (global-norm clipping).
enum Clip {
    None,
    /// Computed on the host from the read norm (flex).
    Host(f64),
    /// `[1]`, on the device (a GPU: no read inside the step).
    Device(Tensor<1>),
}

#[derive(Debug, Clone)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    /// Updates applied so far (for bias correction).
    pub step: u64,
    exp_avg: BTreeMap<String, Tensor<1>>,
    exp_avg_sq: BTreeMap<String, Tensor<1>>,
}

impl AdamW {
    pub fn new(weight_decay: f64, grad_clip: f64) -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            grad_clip,
            step: 0,
            exp_avg: BTreeMap::new(),
            exp_avg_sq: BTreeMap::new(),
        }
    }

    /// One update of every parameter that has a gradient. Returns the module and the
    /// pre-clipping global gradient norm.
    pub fn step<M: Module>(&mut self, module: M, grads: &Gradients, lr: f64) -> (M, f64) {
        self.step_groups(module, grads, |_| lr)
    }

    /// [`Self::step`] with a learning rate per parameter path (parameter groups).
    pub fn step_groups<M: Module>(
        &mut self,
        module: M,
        grads: &Gradients,
        lr_of: impl Fn(&str) -> f64 + Sync,
    ) -> (M, f64) {
        let flat = collect_grads(&module, grads);
        self.step_flat(module, flat, lr_of)
    }

    /// [`Self::step_groups`] with the gradients already flattened by path (e.g. summed over
    /// micro-batches).
    pub fn step_flat<M: Module>(
        &mut self,
        module: M,
        flat_grads: BTreeMap<String, Tensor<1>>,
        lr_of: impl Fn(&str) -> f64 + Sync,
    ) -> (M, f64) {
        self.step_flat_bounded(module, flat_grads, lr_of, |_| false)
    }

    /// [`Self::step_flat`] where the parameters that `positive` names (quantizer scales) must
    /// stay positive: one step shrinks each of their elements to half its value at most.
    ///
    /// Adam's step is about the learning rate in absolute terms whatever the gradient's size, so
    /// a scale much smaller than `lr * steps` (an adaLN weight's per-channel scale is ~1e-3
    /// against 1e-4 per step) could be driven through zero and the student could not be
    /// exported. Elements the bound does not touch update exactly as without it.
    pub fn step_flat_bounded<M: Module>(
        &mut self,
        module: M,
        flat_grads: BTreeMap<String, Tensor<1>>,
        lr_of: impl Fn(&str) -> f64 + Sync,
        positive: impl Fn(&str) -> bool + Sync,
    ) -> (M, f64) {
        let (module, squared) = self.step_deferred(module, flat_grads, lr_of, positive);
        (module, (crate::base::params::host_scalar(squared) as f64).sqrt())
    }

    /// [`Self::step_flat_bounded`] that hands back the squared global gradient norm (`[1]`)
    /// unread: on a GPU the clipping factor is computed on the device, so the step queues
    /// without waiting for it, and the caller reads the norm with whatever else it logs (one
    /// host sync per step). On flex the factor is computed on the host as always (the same bits).
    pub fn step_deferred<M: Module>(
        &mut self,
        module: M,
        flat_grads: BTreeMap<String, Tensor<1>>,
        lr_of: impl Fn(&str) -> f64 + Sync,
        positive: impl Fn(&str) -> bool + Sync,
    ) -> (M, Tensor<1>) {
        // Each parameter's update is a chain of small tensor ops that flex runs on the calling
        // thread; on flex the parameters are updated concurrently on the pool (5% of a two-thread
        // tiny-DiT step had the second core idle here). Each parameter's arithmetic is the same
        // either way, and the norm's terms are added in path order: the same bits.
        let device = flat_grads.values().next().map(|g| g.device());
        let on_flex = device.as_ref().is_some_and(crate::kernels::on_flex);
        let squared = squared_norm(&flat_grads, on_flex, device.as_ref());
        let clip = match (self.grad_clip > 0.0, on_flex) {
            (false, _) => Clip::None,
            (true, true) => {
                let norm = (crate::base::params::host_scalar(squared.clone()) as f64).sqrt();
                if norm > self.grad_clip { Clip::Host(self.grad_clip / (norm + 1e-6)) } else { Clip::None }
            }
            // min(1, c / (norm + 1e-6)): 1 exactly where the norm is within the bound.
            (true, false) => Clip::Device(
                (squared.clone().sqrt() + 1e-6).recip().mul_scalar(self.grad_clip).clamp_max(1.0),
            ),
        };
        self.step += 1;
        let mut params = BTreeMap::new();
        let module = map_params(module, |path, p| {
            if flat_grads.contains_key(path) {
                params.insert(path.to_string(), p.clone());
            }
            p
        });
        let work: Vec<_> = flat_grads
            .into_iter()
            .filter_map(|(path, g)| {
                let p = params.remove(&path)?;
                let (m, v) = (self.exp_avg.remove(&path), self.exp_avg_sq.remove(&path));
                Some((path, p, g, m, v))
            })
            .collect();
        let this = &*self;
        let updated = for_each_maybe_parallel(on_flex, work, |(path, p, g, m, v)| {
            let (p, m, v) = this.update(p, g, m, v, &clip, lr_of(&path), positive(&path));
            (path, p, m, v)
        });
        let mut new_params = BTreeMap::new();
        for (path, p, m, v) in updated {
            self.exp_avg.insert(path.clone(), m);
            self.exp_avg_sq.insert(path.clone(), v);
            new_params.insert(path, p);
        }
        let module = map_params(module, |path, p| new_params.remove(path).unwrap_or(p));
        (module, squared)
    }

    /// One parameter's AdamW update: `(p, exp_avg, exp_avg_sq)` after the step.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        p: Tensor<1>,
        g: Tensor<1>,
        m: Option<Tensor<1>>,
        v: Option<Tensor<1>>,
        clip: &Clip,
        lr: f64,
        positive: bool,
    ) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        // A GPU runs the whole update as one kernel (flex keeps the tensor ops and their bits).
        #[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
        if let (true, Clip::None | Clip::Device(_)) = (crate::kernels::on_cube(&p.device()), clip) {
            let step = super::adamw_cube::AdamStep {
                lr: lr as f32,
                beta1: b1 as f32,
                beta2: b2 as f32,
                one_minus_beta1: (1.0 - b1) as f32,
                one_minus_beta2: (1.0 - b2) as f32,
                correction1: bc1 as f32,
                correction2: bc2 as f32,
                eps: self.eps as f32,
                decay: (lr * self.weight_decay) as f32,
                positive,
            };
            let clip = match clip {
                Clip::Device(c) => Some(c.clone()),
                _ => None,
            };
            return super::adamw_cube::update(p, g, m.zip(v), clip, step);
        }
        let g = match clip {
            Clip::None => g,
            Clip::Host(c) => g * *c,
            Clip::Device(c) => g * c.clone(),
        };
        let m = match m {
            Some(m) => m * b1 + g.clone() * (1.0 - b1),
            None => g.clone() * (1.0 - b1),
        };
        let v = match v {
            Some(v) => v * b2 + g.square() * (1.0 - b2),
            None => g.square() * (1.0 - b2),
        };
        let update = (m.clone() / bc1) / ((v.clone() / bc2).sqrt() + self.eps);
        let p = if self.weight_decay > 0.0 { p.clone() - p * (lr * self.weight_decay) } else { p };
        let p = if positive { (p.clone() - update * lr).max_pair(p * 0.5) } else { p - update * lr };
        (p, m, v)
    }

    /// The state as named tensors (`<path>.exp_avg`, `<path>.exp_avg_sq`).
    pub fn state_tensors(&self) -> NamedTensors {
        let mut out = BTreeMap::new();
        for (suffix, map) in [("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)] {
            for (k, t) in map {
                out.insert(format!("{k}.{suffix}"), HostTensor::from_tensor(t));
            }
        }
        out
    }

    pub fn load_state(&mut self, tensors: &NamedTensors, step: u64, device: &burn::tensor::Device) {
        self.step = step;
        self.exp_avg.clear();
        self.exp_avg_sq.clear();
        for (name, t) in tensors {
            let value = Tensor::<1>::from_data(TensorData::new(t.data.clone(), [t.data.len()]), device);
            if let Some(path) = name.strip_suffix(".exp_avg_sq") {
                self.exp_avg_sq.insert(path.to_string(), value);
            } else if let Some(path) = name.strip_suffix(".exp_avg") {
                self.exp_avg.insert(path.to_string(), value);
            }
        }
    }
}

/// Learning rate at `step` (0-based): linear warm-up, then the configured decay to 0.
pub fn learning_rate(cfg: &TrainConfig, step: usize) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = cfg.steps.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let progress = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
    match cfg.lr_schedule {
        LrSchedule::Constant => cfg.lr,
        LrSchedule::Cosine => cfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        LrSchedule::Linear => cfg.lr * (1.0 - progress),
    }
}

/// Exponential moving average of the parameters (the weights used for sampling).
#[derive(Debug, Clone)]
pub struct Ema {
    pub decay: f64,
    /// Flat shadow values and the parameter's shape, by path.
    pub shadow: BTreeMap<String, (Tensor<1>, Vec<usize>)>,
}

impl Ema {
    pub fn new<M: Module>(module: &M, decay: f64) -> Self {
        let mut shadow = BTreeMap::new();
        for_each_param(module, |path, t, dims| {
            shadow.insert(path.to_string(), (t.clone().inner(), dims.to_vec()));
        });
        Self { decay, shadow }
    }

    /// Updates after optimizer step `step` (1-based), with the usual warm-up of the decay.
    pub fn update<M: Module>(&mut self, module: &M, step: usize) {
        let d = self.decay.min((1.0 + step as f64) / (10.0 + step as f64));
        for_each_param(module, |path, t, _| {
            if let Some((s, shape)) = self.shadow.remove(path) {
                self.shadow.insert(path.to_string(), (s * d + t.clone().inner() * (1.0 - d), shape));
            }
        });
    }

    pub fn tensors(&self) -> NamedTensors {
        self.shadow
            .iter()
            .map(|(k, (t, shape))| {
                (k.clone(), HostTensor { shape: shape.clone(), data: HostTensor::from_tensor(t).data })
            })
            .collect()
    }

    pub fn load(&mut self, tensors: &NamedTensors, device: &burn::tensor::Device) {
        for (k, t) in tensors {
            let flat = Tensor::from_data(TensorData::new(t.data.clone(), [t.data.len()]), device);
            self.shadow.insert(k.clone(), (flat, t.shape.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Linear;
    use crate::rng::SeededRng;
    use burn::tensor::Device;

    #[test]
    fn warmup_then_cosine_to_zero() {
        let cfg = TrainConfig {
            steps: 110,
            warmup_steps: 10,
            lr: 1.0,
            lr_schedule: LrSchedule::Cosine,
            ..Default::default()
        };
        assert!((learning_rate(&cfg, 0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&cfg, 9) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&cfg, 60) - 0.5).abs() < 1e-12);
        assert!(learning_rate(&cfg, 109) < 0.001);
    }

    #[test]
    fn adamw_reduces_a_regression_loss() {
        let device = Device::flex().autodiff();
        let mut layer = Linear::new(4, 1, true, &mut SeededRng::new(0), &device);
        let x = Tensor::<2>::from_data(
            TensorData::new((0..32).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(), [8, 4]),
            &device,
        );
        let target = x.clone().sum_dim(1) * 0.5 + 1.0;
        let mut opt = AdamW::new(0.0, 0.0);
        let loss_of = |l: &Linear| {
            (l.forward(x.clone(), &crate::nn::StepCtx::default()) - target.clone()).square().mean()
        };
        let first = loss_of(&layer).into_scalar::<f32>();
        for _ in 0..200 {
            let grads = loss_of(&layer).backward();
            let (l, norm) = opt.step(layer, &grads, 0.05);
            assert!(norm > 0.0, "gradients must reach the parameters");
            layer = l;
        }
        let last = loss_of(&layer).into_scalar::<f32>();
        assert!(last < first * 0.01, "{first} -> {last}");
    }

    /// On flex the parameters update concurrently; the result is the bits of one update after the
    /// other in path order (the previous implementation, written out here), with clipping and
    /// weight decay on, over three steps, state included.
    #[test]
    fn concurrent_updates_give_the_bits_of_serial_ones() {
        let device = Device::flex().autodiff();
        let mut rng = SeededRng::new(4);
        let layers: Vec<Linear> = (0..3).map(|i| Linear::new(6 + i, 5, true, &mut rng, &device)).collect();
        let loss_of = |ls: &Vec<Linear>| {
            ls.iter()
                .enumerate()
                .map(|(i, l)| {
                    (l.weight.val().sin() * (i as f32 + 1.0)).sum() + l.bias.as_ref().unwrap().val().sum()
                })
                .reduce(|a, b| a + b)
                .unwrap()
        };
        let lr_of = |p: &str| if p.starts_with('1') { 0.02 } else { 0.01 };
        let serial = |opt: &mut AdamW, module: Vec<Linear>, mut flat: BTreeMap<String, Tensor<1>>| {
            let sq = flat.values().map(|g| g.clone().square().sum()).reduce(|a, b| a + b);
            let norm = sq.map_or(0.0, |t| (t.into_scalar::<f32>() as f64).sqrt());
            let clip =
                if norm > opt.grad_clip { Clip::Host(opt.grad_clip / (norm + 1e-6)) } else { Clip::None };
            opt.step += 1;
            let module = map_params(module, |path, p| {
                let Some(g) = flat.remove(path) else { return p };
                let (m, v) = (opt.exp_avg.remove(path), opt.exp_avg_sq.remove(path));
                let (p, m, v) = opt.update(p, g, m, v, &clip, lr_of(path), false);
                opt.exp_avg.insert(path.to_string(), m);
                opt.exp_avg_sq.insert(path.to_string(), v);
                p
            });
            (module, norm)
        };
        let (mut a, mut b) = (layers.clone(), layers);
        let (mut opt_a, mut opt_b) = (AdamW::new(0.1, 0.5), AdamW::new(0.1, 0.5));
        for _ in 0..3 {
            let flat_a = collect_grads(&a, &loss_of(&a).backward());
            let flat_b = collect_grads(&b, &loss_of(&b).backward());
            let (next_a, norm_a) = opt_a.step_flat(a, flat_a, lr_of);
            let (next_b, norm_b) = serial(&mut opt_b, b, flat_b);
            assert!(norm_a > 0.5, "clipping is on ({norm_a})");
            assert_eq!(norm_a, norm_b);
            (a, b) = (next_a, next_b);
        }
        let values = |ls: &Vec<Linear>| crate::base::params::collect_trainable(ls);
        assert_eq!(values(&a), values(&b), "parameters");
        let state = |o: &AdamW| o.state_tensors().into_iter().map(|(k, t)| (k, t.data)).collect::<Vec<_>>();
        assert_eq!(state(&opt_a), state(&opt_b), "optimizer state");
    }

    /// A bounded parameter pushed towards -inf (loss = its sum) halves at most per step and stays
    /// positive, where the plain update takes it negative at once; the unbounded weight of the
    /// same layer updates exactly as without the bound.
    #[test]
    fn bounded_parameters_stay_positive_and_the_rest_update_as_before() {
        let device = Device::flex().autodiff();
        let layer = Linear::new(3, 2, true, &mut SeededRng::new(1), &device);
        let small = Tensor::<1>::from_data(TensorData::new(vec![1e-3f32, 5.0], [2]), &device);
        let layer = Linear { bias: Some(burn::module::Param::from_tensor(small)), ..layer };
        let run = |bounded: bool| {
            let (mut layer, mut opt) = (layer.clone(), AdamW::new(0.0, 0.0));
            let mut biases = Vec::new();
            for _ in 0..5 {
                let loss = layer.bias.as_ref().unwrap().val().sum() + layer.weight.val().square().sum();
                let flat = collect_grads(&layer, &loss.backward());
                let positive = |path: &str| bounded && path == "bias";
                layer = opt.step_flat_bounded(layer, flat, |_| 0.01, positive).0;
                biases.push(crate::base::params::host_values(layer.bias.as_ref().unwrap().val()));
            }
            (biases, crate::base::params::host_values(layer.weight.val()))
        };
        let ((bounded, w_bounded), (plain, w_plain)) = (run(true), run(false));
        assert!(plain[0][0] < 0.0, "the plain step crosses zero: {:?}", plain[0]);
        let mut previous = 1e-3f32;
        for b in &bounded {
            assert!(b[0] > 0.0 && b[0] >= previous * 0.5, "{previous} -> {}", b[0]);
            previous = b[0];
        }
        // The large bias moves 0.01 a step, far from the bound: the same bits either way.
        assert_eq!(
            bounded.iter().map(|b| b[1]).collect::<Vec<_>>(),
            plain.iter().map(|b| b[1]).collect::<Vec<_>>()
        );
        assert_eq!(w_bounded, w_plain);
    }
}
