//! Nearest-neighbour 2x upsampling (the UNets' and the VAE decoder's `Upsample`) as one copy
//! per output row forward and one pass of 2x2 sums backward. Written with tensor ops it is a
//! reshape of an expanded view, which flex materialises element by element through a strided
//! iterator (5% of the tiny UNet's forward), and its backward is a reduction over two expanded
//! dimensions.

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

use super::host::{tensor, values, zeros};
use super::record;

/// Planes per parallel work item (fixed by the shapes: the same split on any thread count).
const PLANES: usize = 8;

/// `[n, h, w]` planes -> `[n, 2h, 2w]`, each value repeated over a 2x2 block.
pub fn upsample(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let mut y = zeros(planes * 4 * h * w);
    y.par_chunks_mut(PLANES * 4 * h * w).zip(x.par_chunks(PLANES * h * w)).for_each(|(y, x)| {
        for (out, row) in y.chunks_mut(4 * w).zip(x.chunks(w)) {
            let (top, bottom) = out.split_at_mut(2 * w);
            for (pair, &v) in top.chunks_mut(2).zip(row) {
                pair.fill(v);
            }
            bottom.copy_from_slice(top);
        }
    });
    y
}

/// The gradient of [`upsample`]: each 2x2 block of `dy` summed, `(0,0) + (0,1) + (1,0) + (1,1)`.
pub fn upsample_grad(dy: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let mut dx = zeros(planes * h * w);
    dx.par_chunks_mut(PLANES * h * w).zip(dy.par_chunks(PLANES * 4 * h * w)).for_each(|(dx, dy)| {
        for (row, pair) in dx.chunks_mut(w).zip(dy.chunks(4 * w)) {
            let (top, bottom) = pair.split_at(2 * w);
            for (j, d) in row.iter_mut().enumerate() {
                *d = top[2 * j] + top[2 * j + 1] + bottom[2 * j] + bottom[2 * j + 1];
            }
        }
    });
    dx
}

fn dims(x: &FlexTensor) -> [usize; 4] {
    x.layout().shape().to_vec().try_into().expect("a 4-d tensor")
}

fn upsample_tensor(x: &FlexTensor, [b, c, h, w]: [usize; 4]) -> FlexTensor {
    tensor(upsample(&values(x), b * c, h, w), &[b, c, 2 * h, 2 * w])
}

#[backend_extension(Autodiff, Flex)]
pub trait ResampleBackend: Backend {
    /// `[b, c, h, w] -> [b, c, 2h, 2w]`, nearest neighbour.
    fn fused_upsample_nearest2(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl ResampleBackend for Flex {
    fn fused_upsample_nearest2(x: FlexTensor) -> FlexTensor {
        upsample_tensor(&x, dims(&x))
    }
}

/// Keeps the input's shape only.
#[derive(Debug)]
struct UpsampleBackward;

impl Backward<Flex, 1> for UpsampleBackward {
    type State = [usize; 4];

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node {
            let [b, c, h, w] = ops.state;
            grads.register::<Flex>(node.id, tensor(upsample_grad(&values(&grad), b * c, h, w), &ops.state));
        }
    }
}

impl<C: CheckpointStrategy> ResampleBackend for Autodiff<Flex, C> {
    fn fused_upsample_nearest2(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let shape = dims(x.primitive());
        let out = upsample_tensor(x.primitive(), shape);
        record!(UpsampleBackward, [x.node()], shape, out)
    }
}

/// The same with tensor ops: what runs on every backend but flex, and the reference the fused
/// version is tested against.
pub fn upsample_nearest2_ops(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1]).expand([b, c, h, 2, w, 2]).reshape([b, c, 2 * h, 2 * w])
}

/// Nearest-neighbour 2x upsampling of `[b, c, h, w]`: the fused kernel on flex, tensor ops
/// elsewhere.
pub fn upsample_nearest2(x: Tensor<4>) -> Tensor<4> {
    if !super::on_flex(&x.device()) {
        return upsample_nearest2_ops(x);
    }
    Tensor::from_dispatch(<Dispatch as ResampleBackend>::fused_upsample_nearest2(x.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::params::host_values;
    use crate::rng::SeededRng;
    use burn::tensor::{Device, TensorData};

    /// Values and gradient against the tensor-op version, on more planes than one work item
    /// and on a strided (transposed) input: the forward is the same copy, the gradient's 2x2
    /// sums agree within the rounding of a four-term sum.
    #[test]
    fn fused_upsample_matches_the_tensor_ops() {
        let device = Device::flex().autodiff();
        let mut rng = SeededRng::new(3);
        let dims = [3, 5, 6, 7];
        let n: usize = dims.iter().product();
        let x0 = rng.normals(n);
        let g0 = rng.normals(4 * n);
        for transposed in [false, true] {
            let run = |fused: bool| {
                let x = Tensor::<4>::from_data(TensorData::new(x0.clone(), dims), &device).require_grad();
                let input = if transposed { x.clone().swap_dims(2, 3) } else { x.clone() };
                let y = if fused { upsample_nearest2(input) } else { upsample_nearest2_ops(input) };
                let g = Tensor::<4>::from_data(TensorData::new(g0.clone(), y.dims()), &device);
                let grads = (y.clone() * g).sum().backward();
                (host_values(y), host_values(x.grad(&grads).unwrap()))
            };
            let ((fy, fdx), (ty, tdx)) = (run(true), run(false));
            assert_eq!(fy, ty, "transposed {transposed}: the forward is a copy");
            for (i, (a, b)) in fdx.iter().zip(&tdx).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "transposed {transposed}: dx[{i}] {a} vs {b}"
                );
            }
        }
    }
}
