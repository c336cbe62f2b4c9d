//! SiLU and GELU (erf and tanh forms) as one pass forward and one pass backward on flex, with
//! the vectorised [`math`](super::math) functions. Only the input is kept for the backward
//! (burn's tensor-op SiLU keeps the input and the sigmoid and runs five passes).

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::host::{tensor_like, values, values_mut, writable, zeros};
use super::{math, simd_kernel};

/// The pointwise nonlinearities the models use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)`.
    Silu,
    /// `x * Phi(x)`, the exact (erf) GELU.
    Gelu,
    /// GELU's tanh approximation `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (DiT's MLP).
    GeluTanh,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

impl Activation {
    #[inline(always)]
    fn value(self, x: f32) -> f32 {
        match self {
            Self::Silu => x * math::sigmoid(x),
            Self::Gelu => 0.5 * x * math::erfc(-x * std::f32::consts::FRAC_1_SQRT_2),
            // 0.5 (1 + tanh(u)) = sigmoid(2u).
            Self::GeluTanh => x * math::sigmoid(2.0 * Self::tanh_arg(x)),
        }
    }

    /// `f'(x)`.
    #[inline(always)]
    fn slope(self, x: f32) -> f32 {
        match self {
            Self::Silu => {
                let s = math::sigmoid(x);
                s + x * s * (1.0 - s)
            }
            Self::Gelu => {
                let cdf = 0.5 * math::erfc(-x * std::f32::consts::FRAC_1_SQRT_2);
                cdf + x * FRAC_1_SQRT_2PI * math::exp(-0.5 * x * x)
            }
            // With s = sigmoid(2u): 0.5 (1 + tanh u) = s and 0.5 (1 - tanh^2 u) = 2 s (1 - s),
            // which keeps its precision where tanh is near -1 (1 - t^2 would cancel).
            Self::GeluTanh => {
                let s = math::sigmoid(2.0 * Self::tanh_arg(x));
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044_715 * x * x);
                s + 2.0 * x * s * (1.0 - s) * du
            }
        }
    }

    /// `u = sqrt(2/pi) (x + 0.044715 x^3)`.
    #[inline(always)]
    fn tanh_arg(x: f32) -> f32 {
        SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)
    }

    /// `(f(x), f'(x))` in f64, the reference the kernels are tested against.
    #[cfg(test)]
    fn reference(self, x: f64) -> (f64, f64) {
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        match self {
            Self::Silu => (x * sig(x), sig(x) * (1.0 + x * (1.0 - sig(x)))),
            Self::Gelu => {
                // Phi(x) from erfc's continued fraction / series is overkill: integrate the
                // density with Simpson's rule from 0, fine at f32 precision.
                let pdf = |v: f64| (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
                let steps = 2000;
                let h = x / steps as f64;
                let mut area = pdf(0.0) + pdf(x);
                for i in 1..steps {
                    area += pdf(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
                }
                let cdf = 0.5 + area * h / 3.0;
                (x * cdf, cdf + x * pdf(x))
            }
            Self::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let u = c * (x + 0.044715 * x * x * x);
                let t = u.tanh();
                let du = c * (1.0 + 3.0 * 0.044715 * x * x);
                (0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
            }
        }
    }
}

/// Runs `$body` with `$k` bound to `$kind` as a constant, so that each kind gets its own loop
/// (matched once per run, outside the loop, and vectorised).
macro_rules! per_kind {
    ($kind:expr, $k:ident => $body:expr) => {
        match $kind {
            Activation::Silu => {
                const $k: Activation = Activation::Silu;
                $body
            }
            Activation::Gelu => {
                const $k: Activation = Activation::Gelu;
                $body
            }
            Activation::GeluTanh => {
                const $k: Activation = Activation::GeluTanh;
                $body
            }
        }
    };
}

// Loops index rather than zip so that they vectorise (as in quant/fused.rs).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn forward_run(kind: Activation, xs: &[f32], out: &mut [f32]) {
    let n = out.len().min(xs.len());
    let (xs, out) = (&xs[..n], &mut out[..n]);
    per_kind!(kind, K => for i in 0..n {
        out[i] = K.value(xs[i]);
    })
}

#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn forward_run_in_place(kind: Activation, xs: &mut [f32]) {
    per_kind!(kind, K => for i in 0..xs.len() {
        xs[i] = K.value(xs[i]);
    })
}

/// `g *= f'(x)`.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn backward_run(kind: Activation, g: &mut [f32], xs: &[f32]) {
    let n = g.len().min(xs.len());
    let (g, xs) = (&mut g[..n], &xs[..n]);
    per_kind!(kind, K => for i in 0..n {
        g[i] *= K.slope(xs[i]);
    })
}

simd_kernel!(fn forward_chunk(kind: Activation, xs: &[f32], out: &mut [f32]) = forward_run;);
simd_kernel!(fn forward_chunk_in_place(kind: Activation, xs: &mut [f32]) = forward_run_in_place;);
simd_kernel!(fn backward_chunk(kind: Activation, g: &mut [f32], xs: &[f32]) = backward_run;);

/// Elements per parallel work item.
const CHUNK: usize = 1 << 14;

/// `f(x)` on flex: in `x`'s own memory when nobody else holds it, else into one new tensor.
fn forward(mut x: FlexTensor, kind: Activation) -> FlexTensor {
    if let Some(xs) = values_mut(&mut x) {
        xs.par_chunks_mut(CHUNK).for_each(|c| forward_chunk_in_place(kind, c));
        return x;
    }
    let xs = values(&x);
    let mut out = zeros(xs.len());
    out.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).for_each(|(o, c)| forward_chunk(kind, c, o));
    tensor_like(out, &x)
}

/// `grad * f'(x)`, in `grad`'s memory when it can.
fn backward(grad: FlexTensor, x: &FlexTensor, kind: Activation) -> FlexTensor {
    let xs = values(x);
    let mut dx = writable(grad);
    let gs = values_mut(&mut dx).expect("writable tensor");
    gs.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).for_each(|(g, c)| backward_chunk(kind, g, c));
    dx
}

#[backend_extension(Autodiff, Flex)]
pub trait ActivationBackend: Backend {
    /// `f(x)` elementwise.
    fn fused_activation(x: FloatTensor<Self>, kind: Activation) -> FloatTensor<Self>;
}

impl ActivationBackend for Flex {
    fn fused_activation(x: FlexTensor, kind: Activation) -> FlexTensor {
        forward(x, kind)
    }
}

#[derive(Debug)]
struct ActivationBackward {
    kind: Activation,
}

impl Backward<Flex, 1> for ActivationBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node {
            grads.register::<Flex>(node.id, backward(grad, &ops.state, self.kind));
        }
    }
}

impl<C: CheckpointStrategy> ActivationBackend for Autodiff<Flex, C> {
    fn fused_activation(x: FloatTensor<Self>, kind: Activation) -> FloatTensor<Self> {
        let backward = ActivationBackward { kind };
        match backward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let input = x.primitive().clone();
                prep.finish(input.clone(), forward(input, kind))
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(x.into_primitive(), kind)),
        }
    }
}

/// The same nonlinearity as burn's tensor ops: what runs on every backend but flex, and the
/// reference the fused version is tested against.
pub fn activate_ops<const D: usize>(x: Tensor<D>, kind: Activation) -> Tensor<D> {
    use burn::tensor::activation;
    match kind {
        Activation::Silu => activation::silu(x),
        Activation::Gelu => activation::gelu(x),
        Activation::GeluTanh => {
            let inner =
                (x.clone() + x.clone().powi_scalar(3) * 0.044715) * (2.0 / std::f64::consts::PI).sqrt();
            x * (inner.tanh() + 1.0) * 0.5
        }
    }
}

/// `f(x)`: the fused kernel on flex, burn's tensor ops elsewhere.
pub fn activate<const D: usize>(x: Tensor<D>, kind: Activation) -> Tensor<D> {
    if !super::on_flex(&x.device()) {
        return activate_ops(x, kind);
    }
    Tensor::from_dispatch(<Dispatch as ActivationBackend>::fused_activation(x.into_dispatch(), kind))
}

/// SiLU, `x * sigmoid(x)`.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    activate(x, Activation::Silu)
}

/// The exact (erf) GELU.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    activate(x, Activation::Gelu)
}

/// GELU's tanh approximation.
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    activate(x, Activation::GeluTanh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::params::host_values;
    use crate::rng::SeededRng;
    use burn::tensor::{Device, TensorData};

    /// Values and gradients of each fused activation against burn's tensor ops, on a tensor of
    /// several parallel chunks with values from about -16 to 16, read in place and through a
    /// transposed (strided) view.
    #[test]
    fn fused_activations_match_the_tensor_ops() {
        let device = Device::flex().autodiff();
        let mut rng = SeededRng::new(5);
        let (rows, cols) = (7, CHUNK / 2 + 11);
        let n = rows * cols;
        let x0: Vec<f32> = rng.normals(n).iter().map(|v| v * 4.0).collect();
        let g0 = rng.normals(n);
        for kind in [Activation::Silu, Activation::Gelu, Activation::GeluTanh] {
            for transposed in [false, true] {
                let run = |fused: bool| {
                    let x = Tensor::<2>::from_data(TensorData::new(x0.clone(), [rows, cols]), &device)
                        .require_grad();
                    let input = if transposed { x.clone().transpose() } else { x.clone() };
                    let y = if fused { activate(input, kind) } else { activate_ops(input, kind) };
                    let g = Tensor::<1>::from_data(TensorData::new(g0.clone(), [n]), &device);
                    let grads = (y.clone().reshape([n]) * g).sum().backward();
                    (host_values(y), host_values(x.grad(&grads).unwrap()))
                };
                let ((fy, fdx), (ty, tdx)) = (run(true), run(false));
                let what = format!("{kind:?}, transposed {transposed}");
                // Against burn's ops (libm's erf/tanh, their own roundings) ...
                for (i, (a, b)) in fy.iter().zip(&ty).enumerate() {
                    assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{what}: y[{i}] {a} vs {b}");
                }
                for (i, (a, b)) in fdx.iter().zip(&tdx).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{what}: dx[{i}] {a} vs {b}");
                }
                // ... and, tighter, against f64 (x in logical order: the transposed input's
                // element i is x0 at the transposed position).
                for i in (0..n).step_by(97) {
                    let v = if transposed { x0[(i % rows) * cols + i / rows] } else { x0[i] };
                    let (y, slope) = kind.reference(v as f64);
                    assert!((fy[i] as f64 - y).abs() <= 1e-6 * (1.0 + y.abs()), "{what}: f({v})");
                    let j = if transposed { (i % rows) * cols + i / rows } else { i };
                    let dx = g0[i] as f64 * slope;
                    assert!((fdx[j] as f64 - dx).abs() <= 2e-6 * (1.0 + dx.abs()), "{what}: f'({v})");
                }
            }
        }
    }
}
