//! The fully connected layer `y = x W^T + b` (PyTorch's `[out, in]` weight) over any leading
//! dimensions, as one matrix product forward and one per gradient, with the transposes read in
//! place by stride (burn's `linear` copies `W^T` and, backward, `x^T` and `dy^T`).

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

use super::gemm::{Mat, matmul};
use super::host::{repeat_rows, tensor, tensor_like, values, zeros};
use super::record;

/// Output columns per parallel work item of the bias gradient.
const BIAS_COLUMNS: usize = 64;

/// `(rows, d_in, d_out)`: rows the product of `x`'s leading dimensions.
pub(super) fn sizes(x: &FlexTensor, w: &FlexTensor) -> (usize, usize, usize) {
    let shape = w.layout().shape();
    let (d_out, d_in) = (shape[0], shape[1]);
    (x.layout().num_elements() / d_in.max(1), d_in, d_out)
}

fn linear_forward(x: &FlexTensor, w: &FlexTensor, bias: Option<&FlexTensor>) -> FlexTensor {
    forward_with(x, &values(w), w.layout().shape()[0], bias)
}

/// `x W^T + b` for the weight's values `ws` (`[d_out, d_in]`).
pub(super) fn forward_with(
    x: &FlexTensor,
    ws: &[f32],
    d_out: usize,
    bias: Option<&FlexTensor>,
) -> FlexTensor {
    let d_in = ws.len() / d_out.max(1);
    let m = x.layout().num_elements() / d_in.max(1);
    let xs = values(x);
    // The bias in every row, then the product added onto it.
    let mut y = match bias.map(values) {
        Some(b) => repeat_rows(&b, m),
        None => zeros(m * d_out),
    };
    // SAFETY: y, xs and ws hold m x d_out, m x d_in and d_out x d_in values.
    unsafe {
        let lhs = Mat { ptr: xs.as_ptr(), rs: d_in as isize, cs: 1 };
        let rhs = Mat { ptr: ws.as_ptr(), rs: 1, cs: d_in as isize };
        matmul(m, d_out, d_in, y.as_mut_ptr(), d_out, true, lhs, rhs, 1.0, rayon::current_num_threads());
    }
    let mut shape = x.layout().shape().to_vec();
    *shape.last_mut().expect("a dimension") = d_out;
    tensor(y, &shape)
}

/// `dx = dy W`.
pub(super) fn input_grad(dy: &[f32], w: &[f32], m: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let mut dx = zeros(m * d_in);
    // SAFETY: sizes as in the forward.
    unsafe {
        let lhs = Mat { ptr: dy.as_ptr(), rs: d_out as isize, cs: 1 };
        let rhs = Mat { ptr: w.as_ptr(), rs: d_in as isize, cs: 1 };
        matmul(m, d_in, d_out, dx.as_mut_ptr(), d_in, false, lhs, rhs, 1.0, rayon::current_num_threads());
    }
    dx
}

/// `(dW, db) = (dy^T x, sum over rows of dy)`.
pub(super) fn weight_grad(
    dy: &[f32],
    x: &[f32],
    m: usize,
    d_in: usize,
    d_out: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut dw = zeros(d_out * d_in);
    // SAFETY: sizes as in the forward.
    unsafe {
        let lhs = Mat { ptr: dy.as_ptr(), rs: 1, cs: d_out as isize };
        let rhs = Mat { ptr: x.as_ptr(), rs: d_in as isize, cs: 1 };
        matmul(d_out, d_in, m, dw.as_mut_ptr(), d_in, false, lhs, rhs, 1.0, rayon::current_num_threads());
    }
    // Column blocks in parallel, each summing the rows in order (the bits of a serial sum).
    let mut db = vec![0.0f32; d_out];
    db.par_chunks_mut(BIAS_COLUMNS).enumerate().for_each(|(k, cols)| {
        let first = k * BIAS_COLUMNS;
        for row in dy.chunks(d_out) {
            cols.iter_mut().zip(&row[first..]).for_each(|(a, b)| *a += b);
        }
    });
    (dw, db)
}

#[backend_extension(Autodiff, Flex)]
pub trait LinearBackend: Backend {
    /// `x W^T + b` for `W: [out, in]`.
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The same without bias.
    fn fused_linear_no_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl LinearBackend for Flex {
    fn fused_linear(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        linear_forward(&x, &weight, Some(&bias))
    }

    fn fused_linear_no_bias(x: FlexTensor, weight: FlexTensor) -> FlexTensor {
        linear_forward(&x, &weight, None)
    }
}

/// Parents `[x, weight]` or `[x, weight, bias]`.
#[derive(Debug)]
struct LinearBackward<const N: usize>;

impl<const N: usize> Backward<Flex, N> for LinearBackward<N> {
    /// The input and the weight.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, w) = &ops.state;
        let (m, d_in, d_out) = sizes(x, w);
        let dy = values(&grad);
        let parents = ops.parents;
        if let Some(node) = &parents[0] {
            let dx = input_grad(&dy, &values(w), m, d_in, d_out);
            grads.register::<Flex>(node.id, tensor_like(dx, x));
        }
        let bias_node = if N == 3 { parents[N - 1].as_ref() } else { None };
        if parents[1].is_some() || bias_node.is_some() {
            let (dw, db) = weight_grad(&dy, &values(x), m, d_in, d_out);
            if let Some(node) = &parents[1] {
                grads.register::<Flex>(node.id, tensor(dw, &[d_out, d_in]));
            }
            if let Some(node) = bias_node {
                grads.register::<Flex>(node.id, tensor(db, &[d_out]));
            }
        }
    }
}

impl<C: CheckpointStrategy> LinearBackend for Autodiff<Flex, C> {
    fn fused_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (xp, wp) = (x.primitive().clone(), weight.primitive().clone());
        let out = linear_forward(&xp, &wp, Some(bias.primitive()));
        record!(LinearBackward::<3>, [x.node(), weight.node(), bias.node()], (xp, wp), out)
    }

    fn fused_linear_no_bias(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        let (xp, wp) = (x.primitive().clone(), weight.primitive().clone());
        let out = linear_forward(&xp, &wp, None);
        record!(LinearBackward::<2>, [x.node(), weight.node()], (xp, wp), out)
    }
}

/// `x W^T + b` with `W: [out, in]`: the fused kernels on flex, burn's `linear` elsewhere.
pub fn linear<const D: usize>(x: Tensor<D>, weight: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<D> {
    if !super::on_flex(&x.device()) {
        return burn::tensor::module::linear(x, weight.transpose(), bias);
    }
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(b) => <Dispatch as LinearBackend>::fused_linear(x, weight, b.into_dispatch()),
        None => <Dispatch as LinearBackend>::fused_linear_no_bias(x, weight),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::params::host_values;
    use crate::rng::SeededRng;
    use burn::tensor::{Device, TensorData};

    /// Values and gradients against burn's `linear` for 2-D and 3-D inputs, with and without
    /// bias, and a transposed (strided) weight; the same bits on 1 and 3 threads.
    #[test]
    fn fused_linear_matches_burns_linear() {
        let device = Device::flex().autodiff();
        let mut rng = SeededRng::new(17);
        let (d_in, d_out) = (13, 9);
        let xs = rng.normals(2 * 7 * d_in);
        let ws = rng.normals(d_out * d_in);
        let bs = rng.normals(d_out);
        let up = rng.normals(2 * 7 * d_out);
        for (with_bias, transposed_weight) in [(true, false), (false, false), (true, true)] {
            let run = |fused: bool| {
                let x =
                    Tensor::<3>::from_data(TensorData::new(xs.clone(), [2, 7, d_in]), &device).require_grad();
                let w = if transposed_weight {
                    // The same W, stored [in, out] and viewed transposed.
                    let t: Vec<f32> = (0..d_in * d_out).map(|i| ws[(i % d_out) * d_in + i / d_out]).collect();
                    Tensor::<2>::from_data(TensorData::new(t, [d_in, d_out]), &device).require_grad()
                } else {
                    Tensor::<2>::from_data(TensorData::new(ws.clone(), [d_out, d_in]), &device).require_grad()
                };
                let wv = if transposed_weight { w.clone().transpose() } else { w.clone() };
                let b = Tensor::<1>::from_data(TensorData::new(bs.clone(), [d_out]), &device).require_grad();
                let bias = with_bias.then(|| b.clone());
                let y = if fused {
                    linear(x.clone(), wv, bias)
                } else {
                    burn::tensor::module::linear(x.clone(), wv.transpose(), bias)
                };
                let grads = (y.clone()
                    * Tensor::<1>::from_data(TensorData::new(up.clone(), [up.len()]), &device)
                        .reshape([2, 7, d_out]))
                .sum()
                .backward();
                let db = with_bias.then(|| host_values(b.grad(&grads).unwrap()));
                (
                    host_values(y),
                    host_values(x.grad(&grads).unwrap()),
                    host_values(w.grad(&grads).unwrap()),
                    db,
                )
            };
            let (f, t) = (run(true), run(false));
            let what = format!("bias {with_bias}, transposed weight {transposed_weight}");
            for (name, a, r) in [("y", &f.0, &t.0), ("dx", &f.1, &t.1), ("dw", &f.2, &t.2)] {
                for (i, (a, r)) in a.iter().zip(r.iter()).enumerate() {
                    assert!((a - r).abs() <= 1e-5 * (1.0 + r.abs()), "{what}: {name}[{i}] {a} vs {r}");
                }
            }
            if let (Some(a), Some(r)) = (&f.3, &t.3) {
                for (a, r) in a.iter().zip(r) {
                    assert!((a - r).abs() <= 1e-5 * (1.0 + r.abs()), "{what}: db {a} vs {r}");
                }
            }
        }
        let (m, d_in, d_out) = (300, 64, 96);
        let (x, w, dy) = (rng.normals(m * d_in), rng.normals(d_out * d_in), rng.normals(m * d_out));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| (input_grad(&dy, &w, m, d_in, d_out), weight_grad(&dy, &x, m, d_in, d_out)))
        };
        assert!(run(1) == run(3), "linear gradients depend on the thread count");
    }
}
