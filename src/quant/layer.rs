//! Quantization state carried by a layer (`nn::Linear`, `nn::Conv2d`): a weight quantizer with
//! one learnable scale per output channel (or per group of G consecutive fan-in elements, the
//! NVFP4 / MX block shape) and an input-activation quantizer with a learnable
//! scale (and, for unsigned formats, zero point) per timestep slot. A layer without this state
//! runs exactly the full-precision code path, so one model definition is teacher and student.

use burn::module::{Module, Param};
use burn::tensor::Tensor;

use super::format::Format;
use super::quantizer::fake_quantize;
use crate::base::step::StepCtx;

/// Fake-quantizes a weight `[C_out, ...]` per output channel, or per group of `group_size`
/// consecutive elements of each channel's flattened fan-in (`in * kh * kw` for a conv).
#[derive(Module, Debug)]
pub struct WeightQuant {
    #[module(skip)]
    pub format: Format,
    /// `[C_out]`, or `[C_out * fan_in / group_size]` (channel-major).
    pub scale: Param<Tensor<1>>,
    /// 0: one scale per output channel.
    pub group_size: usize,
}

impl WeightQuant {
    /// One scale per output channel.
    pub fn new(format: Format, scale: Tensor<1>) -> Self {
        Self { format, scale: Param::from_tensor(scale), group_size: 0 }
    }

    /// One scale per `group_size` consecutive fan-in elements (`group_size` > 0 divides fan-in).
    pub fn grouped(format: Format, scale: Tensor<1>, group_size: usize) -> Self {
        Self { format, scale: Param::from_tensor(scale), group_size }
    }

    pub fn forward<const D: usize>(&self, w: Tensor<D>) -> Tensor<D> {
        let dims = w.dims();
        if self.group_size == 0 {
            let mut shape = [1; D];
            shape[0] = dims[0];
            return fake_quantize(w, &self.format, self.scale.val().reshape(shape), None);
        }
        let blocks = dims.iter().product::<usize>() / self.group_size;
        let groups = w.reshape([blocks, self.group_size]);
        fake_quantize(groups, &self.format, self.scale.val().reshape([blocks, 1]), None).reshape(dims)
    }
}

/// Fake-quantizes a layer's input with one scale (and zero point) per timestep slot: slot
/// `t * slots / timesteps` of the timestep the forward pass receives in its [`StepCtx`].
#[derive(Module, Debug)]
pub struct ActQuant {
    #[module(skip)]
    pub format: Format,
    /// `[slots]`.
    pub scale: Param<Tensor<1>>,
    /// `[slots]`; present for unsigned formats (the zero point shifts the grid to the data).
    pub zero_point: Option<Param<Tensor<1>>>,
    /// Training timesteps the slots divide.
    pub timesteps: usize,
}

impl ActQuant {
    pub fn new(format: Format, scale: Tensor<1>, zero_point: Option<Tensor<1>>, timesteps: usize) -> Self {
        Self {
            format,
            scale: Param::from_tensor(scale),
            zero_point: zero_point.map(Param::from_tensor),
            timesteps,
        }
    }

    pub fn slots(&self) -> usize {
        self.scale.dims()[0]
    }

    /// The slot of a timestep; without a timestep (or with one slot) slot 0.
    pub fn slot(&self, ctx: &StepCtx) -> usize {
        match ctx.timestep {
            Some(t) if self.slots() > 1 => (t.min(self.timesteps - 1) * self.slots()) / self.timesteps,
            _ => 0,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>, ctx: &StepCtx) -> Tensor<D> {
        let (scale, zero) = self.params(ctx);
        fake_quantize(x, &self.format, scale.reshape([1; D]), zero.map(|z| z.reshape([1; D])))
    }

    /// The scale and zero point (`[1]` each) of the step's slot.
    pub fn params(&self, ctx: &StepCtx) -> (Tensor<1>, Option<Tensor<1>>) {
        let slot = self.slot(ctx);
        // One slot is the whole parameter: no slice (on a GPU a slice costs a kernel forward and
        // two backward, a zeroed gradient and the assignment into it).
        let pick = |p: &Param<Tensor<1>>| match self.slots() {
            1 => p.val(),
            _ => p.val().slice([slot..slot + 1]),
        };
        (pick(&self.scale), self.zero_point.as_ref().map(pick))
    }
}

/// Shared sink for the input statistics of one layer during calibration.
pub type Observer = std::sync::Arc<std::sync::Mutex<SlotStats>>;

/// Calibration statistics of one layer input: over all timesteps, and per timestep slot (slot
/// `t * slots / timesteps`, as [`ActQuant::slot`]) when there are several slots.
#[derive(Debug, Clone)]
pub struct SlotStats {
    pub all: super::calib::ActStats,
    pub slots: Vec<super::calib::ActStats>,
    pub timesteps: usize,
}

impl SlotStats {
    pub fn new(slots: usize, timesteps: usize, capacity: usize, seed: u64) -> Self {
        let per_slot = if slots > 1 {
            (0..slots)
                .map(|k| {
                    super::calib::ActStats::new(
                        capacity,
                        seed ^ ((k as u64 + 1) << crate::rng::stream::SLOT_SHIFT),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        Self { all: super::calib::ActStats::new(capacity, seed), slots: per_slot, timesteps }
    }

    pub fn observe(&mut self, values: &[f32], timestep: Option<usize>) {
        self.all.observe(values);
        let n = self.slots.len();
        if let (Some(t), true) = (timestep, n > 1) {
            self.slots[(t.min(self.timesteps - 1) * n) / self.timesteps].observe(values);
        }
    }
}

/// The quantizers of one layer; either may be absent (e.g. weight-only quantization).
#[derive(Module, Debug)]
pub struct LayerQuant {
    pub weight: Option<WeightQuant>,
    pub act: Option<ActQuant>,
    /// Calibration only: records every input this layer sees (before any quantization).
    #[module(skip)]
    pub observer: Option<Observer>,
    /// A deployed (unpacked) model's weights, `[sets, out, fan_in]`: one set per adapter for the
    /// merged TALoRA placement, else one. When present they replace the weight, its quantizer
    /// and the merged adapters: the values are already on the grid.
    pub weight_sets: Option<Param<Tensor<3>>>,
}

impl LayerQuant {
    pub fn weight<const D: usize>(&self, w: Tensor<D>) -> Tensor<D> {
        match &self.weight {
            Some(q) => q.forward(w),
            None => w,
        }
    }

    pub fn input<const D: usize>(&self, x: Tensor<D>, ctx: &StepCtx) -> Tensor<D> {
        if let Some(obs) = &self.observer {
            let values = crate::base::params::host_values(x.clone());
            obs.lock().expect("observer lock").observe(&values, ctx.timestep);
        }
        match &self.act {
            Some(q) => q.forward(x, ctx),
            None => x,
        }
    }
}

/// The weight set the step's route selects from `[sets, out, fan_in]`, as `[out, fan_in]`.
pub fn select_weight_set(sets: Tensor<3>, ctx: &StepCtx) -> Tensor<2> {
    let [n, out, fan_in] = sets.dims();
    let k = match (&ctx.route, n) {
        (_, 1) => 0,
        (Some(route), _) => route.adapter,
        (None, _) => {
            panic!("a deployed layer with {n} weight sets needs a route: the model sets it from the timestep")
        }
    };
    sets.slice([k..k + 1]).reshape([out, fan_in])
}

/// Absmax of each output channel of a weight `[C_out, ...]`, as the initial scale for `format`
/// (min-max clipping; calibration refines it).
pub fn minmax_weight_scale<const D: usize>(w: &Tensor<D>, format: &Format) -> Tensor<1> {
    let dims = w.dims();
    let c = dims[0];
    let k = dims.iter().skip(1).product::<usize>();
    let absmax = w.clone().detach().reshape([c, k]).abs().max_dim(1);
    let scale = (absmax.reshape([c]) / format.max()).clamp_min(1e-8);
    // A fresh leaf on the weight's device, so it can become a trainable parameter there.
    Tensor::from_data(scale.into_data(), &w.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Conv2d, Linear};
    use crate::rng::SeededRng;
    use burn::tensor::{Device, TensorData};

    fn input<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
        let n = shape.iter().product();
        Tensor::from_data(TensorData::new(SeededRng::new(9).normals(n), shape), device)
    }

    fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    #[test]
    fn quantized_linear_is_the_fake_quantized_matmul() {
        let device = Device::flex();
        let mut layer = Linear::new(8, 4, true, &mut SeededRng::new(1), &device);
        let x = input([3, 8], &device);
        let fp = layer.forward(x.clone(), &StepCtx::default());
        let wf = Format::parse("e2m1").unwrap();
        let af = Format::parse("ue2m2").unwrap();
        let w_scale = minmax_weight_scale(&layer.weight.val(), &wf);
        // Two timestep slots with different input grids.
        let a_scale = Tensor::<1>::from_floats([0.5, 0.25], &device);
        let a_zero = Tensor::<1>::from_floats([-0.3, -1.0], &device);
        layer.quant = Some(LayerQuant {
            weight: Some(WeightQuant::new(wf.clone(), w_scale.clone())),
            act: Some(ActQuant::new(af.clone(), a_scale, Some(a_zero), 1000)),
            observer: None,
            weight_sets: None,
        });
        for (t, s, z) in [(10, 0.5, -0.3), (999, 0.25, -1.0)] {
            let out = layer.forward(x.clone(), &StepCtx::at(t));
            let xq = fake_quantize(
                x.clone(),
                &af,
                Tensor::<2>::full([1, 1], s, &device),
                Some(Tensor::<2>::full([1, 1], z, &device)),
            );
            let wq = fake_quantize(layer.weight.val(), &wf, w_scale.clone().reshape([4, 1]), None);
            let expect = xq.matmul(wq.transpose()) + layer.bias.as_ref().unwrap().val().reshape([1, 4]);
            assert!(max_abs_diff(out.clone(), expect) < 1e-5, "t = {t}");
            assert!(max_abs_diff(out, fp.clone()) > 1e-3, "quantization changes the output");
        }
    }

    #[test]
    fn grouped_weight_scales_quantize_each_block_of_the_fan_in_on_its_own() {
        let f = Format::parse("e2m1").unwrap();
        // A conv weight [2, 2, 2, 2]: fan-in 8, groups of 4 -> 4 scales, channel-major.
        for device in [Device::flex(), Device::flex().autodiff()] {
            let w = input([2, 2, 2, 2], &device);
            let scales = [0.1f32, 0.4, 0.2, 0.05];
            let q = WeightQuant::grouped(f.clone(), Tensor::from_floats(scales, &device), 4);
            let got = crate::base::params::host_values(q.forward(w.clone()));
            let values = crate::base::params::host_values(w);
            for (i, (&x, &g)) in values.iter().zip(&got).enumerate() {
                let s = scales[i / 4];
                let want = f.round((x / s).clamp(f.min(), f.max())) * s;
                assert_eq!(g, want, "element {i}");
            }
        }
    }

    #[test]
    fn removing_quant_state_restores_the_exact_full_precision_output() {
        let device = Device::flex();
        let mut conv = Conv2d::same3(2, 3, &mut SeededRng::new(2), &device);
        let x = input([1, 2, 5, 5], &device);
        let before = conv.forward(x.clone(), &StepCtx::default()).into_data();
        let f = Format::parse("int4").unwrap();
        let scale = minmax_weight_scale(&conv.weight.val(), &f);
        conv.quant = Some(LayerQuant {
            weight: Some(WeightQuant::new(f, scale)),
            act: None,
            observer: None,
            weight_sets: None,
        });
        let quantized = conv.forward(x.clone(), &StepCtx::default()).into_data();
        assert_ne!(quantized, before);
        conv.quant = None;
        assert_eq!(conv.forward(x, &StepCtx::default()).into_data(), before, "bit-identical");
    }

    #[test]
    fn scales_and_zero_points_receive_gradients_through_a_layer() {
        let device = Device::flex().autodiff();
        let mut layer = Linear::new(6, 2, true, &mut SeededRng::new(3), &device);
        let wf = Format::parse("e2m1").unwrap();
        let scale = minmax_weight_scale(&layer.weight.val(), &wf);
        let af = Format::parse("ue2m2").unwrap();
        layer.quant = Some(LayerQuant {
            weight: Some(WeightQuant::new(wf, scale)),
            act: Some(ActQuant::new(
                af,
                Tensor::from_floats([0.3], &device),
                Some(Tensor::from_floats([-0.2], &device)),
                1000,
            )),
            observer: None,
            weight_sets: None,
        });
        let loss = layer.forward(input([4, 6], &device), &StepCtx::at(5)).square().sum();
        let grads = loss.backward();
        let q = layer.quant.as_ref().unwrap();
        let nonzero = |t: Option<Tensor<1>>| t.expect("gradient").abs().sum().into_scalar::<f32>() > 0.0;
        assert!(nonzero(q.weight.as_ref().unwrap().scale.val().grad(&grads)));
        let act = q.act.as_ref().unwrap();
        assert!(nonzero(act.scale.val().grad(&grads)));
        assert!(nonzero(act.zero_point.as_ref().unwrap().val().grad(&grads)));
    }

    #[test]
    fn timestep_slots_split_the_schedule_evenly() {
        let device = Device::flex();
        let f = Format::parse("e2m1").unwrap();
        let q = ActQuant::new(f, Tensor::from_floats([1.0, 2.0, 3.0, 4.0], &device), None, 1000);
        let slots: Vec<usize> = [0, 249, 250, 999, 5000].iter().map(|&t| q.slot(&StepCtx::at(t))).collect();
        assert_eq!(slots, [0, 0, 1, 3, 3]);
        assert_eq!(q.slot(&StepCtx::default()), 0);
    }
}
