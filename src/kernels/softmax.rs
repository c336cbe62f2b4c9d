//! Softmax over the last dimension (attention's probabilities) as one pass per row with the
//! vectorised `exp`, and its backward `dx = y (g - sum(g y))` from the saved output; burn's
//! version is five tensor ops forward and more backward, with a scalar `expf`.

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

use super::host::{values, values_mut, writable};
use super::{math, simd_kernel};

/// Rows per parallel work item (fixed: the same split on any thread count).
const ROWS: usize = 64;

#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn softmax_row_run(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sums = [0.0f32; 8];
    let n = row.len();
    for i in 0..n {
        row[i] = math::exp(row[i] - max);
    }
    let whole = n - n % 8;
    for c in (0..whole).step_by(8) {
        for l in 0..8 {
            sums[l] += row[c + l];
        }
    }
    for i in whole..n {
        sums[i - whole] += row[i];
    }
    let inv = 1.0 / sums.iter().sum::<f32>();
    for v in row.iter_mut() {
        *v *= inv;
    }
}
simd_kernel!(fn softmax_row(row: &mut [f32]) = softmax_row_run;);

/// `g = y (g - sum(g y))` for one row.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn softmax_grad_row_run(g: &mut [f32], y: &[f32]) {
    let n = g.len().min(y.len());
    let (g, y) = (&mut g[..n], &y[..n]);
    let mut sums = [0.0f32; 8];
    let whole = n - n % 8;
    for c in (0..whole).step_by(8) {
        for l in 0..8 {
            sums[l] += g[c + l] * y[c + l];
        }
    }
    for i in whole..n {
        sums[i - whole] += g[i] * y[i];
    }
    let dot: f32 = sums.iter().sum();
    for i in 0..n {
        g[i] = y[i] * (g[i] - dot);
    }
}
simd_kernel!(fn softmax_grad_row(g: &mut [f32], y: &[f32]) = softmax_grad_row_run;);

fn forward(x: FlexTensor) -> FlexTensor {
    let d = *x.layout().shape().last().expect("a dimension");
    let mut out = writable(x);
    values_mut(&mut out).expect("writable tensor").par_chunks_mut(ROWS * d).for_each(|rows| {
        rows.chunks_mut(d).for_each(softmax_row);
    });
    out
}

fn backward(grad: FlexTensor, y: &FlexTensor) -> FlexTensor {
    let d = *y.layout().shape().last().expect("a dimension");
    let ys = values(y);
    let mut dx = writable(grad);
    let gs = values_mut(&mut dx).expect("writable tensor");
    gs.par_chunks_mut(ROWS * d).zip(ys.par_chunks(ROWS * d)).for_each(|(g, y)| {
        g.chunks_mut(d).zip(y.chunks(d)).for_each(|(g, y)| softmax_grad_row(g, y));
    });
    dx
}

#[backend_extension(Autodiff, Flex)]
pub trait SoftmaxBackend: Backend {
    /// Softmax over the last dimension.
    fn fused_softmax(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl SoftmaxBackend for Flex {
    fn fused_softmax(x: FlexTensor) -> FlexTensor {
        forward(x)
    }
}

#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<Flex, 1> for SoftmaxBackward {
    /// The output.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node {
            grads.register::<Flex>(node.id, backward(grad, &ops.state));
        }
    }
}

impl<C: CheckpointStrategy> SoftmaxBackend for Autodiff<Flex, C> {
    fn fused_softmax(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match SoftmaxBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = forward(x.primitive().clone());
                prep.finish(y.clone(), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(x.into_primitive())),
        }
    }
}

/// Softmax over the last dimension: the fused kernel on flex and on the GPU backends
/// (`softmax_cube`), burn's tensor ops elsewhere.
pub fn softmax<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
    if super::on_cube(&x.device()) {
        return super::softmax_cube::softmax(x);
    }
    if !super::on_flex(&x.device()) {
        return burn::tensor::activation::softmax(x, D - 1);
    }
    Tensor::from_dispatch(<Dispatch as SoftmaxBackend>::fused_softmax(x.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::params::host_values;
    use crate::rng::SeededRng;
    use burn::tensor::{Device, TensorData};

    /// Values and gradients against burn's softmax, on rows of several parallel blocks, with
    /// large logits, a masked (-inf) entry and a transposed input.
    #[test]
    fn fused_softmax_matches_the_tensor_ops() {
        let device = Device::flex().autodiff();
        let mut rng = SeededRng::new(12);
        let shape = [3, 50, 19];
        let n: usize = shape.iter().product();
        let mut x0: Vec<f32> = rng.normals(n).iter().map(|v| v * 6.0 + 30.0).collect();
        x0[5] = f32::NEG_INFINITY;
        let up = rng.normals(n);
        let masked = |y: &[f32]| y[5];
        for transposed in [false, true] {
            let run = |fused: bool| {
                let x = Tensor::<3>::from_data(TensorData::new(x0.clone(), shape), &device).require_grad();
                let input = if transposed { x.clone().swap_dims(1, 2) } else { x.clone() };
                let y = if fused { softmax(input) } else { burn::tensor::activation::softmax(input, 2) };
                let up = Tensor::<1>::from_data(TensorData::new(up.clone(), [n]), &device).reshape(y.dims());
                let grads = (y.clone() * up).sum().backward();
                (host_values(y), host_values(x.grad(&grads).unwrap()))
            };
            let (f, t) = (run(true), run(false));
            if !transposed {
                assert_eq!(masked(&f.0), 0.0, "a -inf logit has probability 0");
            }
            // dx = y (g - sum(g y)) cancels in the bracket: equal to ~1e-6 of sum(g y).
            for (what, a, b, tol) in [("y", &f.0, &t.0, 1e-6), ("dx", &f.1, &t.1, 1e-5)] {
                for (i, (a, b)) in a.iter().zip(b.iter()).enumerate() {
                    assert!(
                        (a - b).abs() <= tol * (1.0 + b.abs()),
                        "transposed {transposed}: {what}[{i}] {a} vs {b}"
                    );
                }
            }
        }
    }
}
