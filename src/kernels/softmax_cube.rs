//! Softmax over the last dimension as one CubeCL kernel forward and one backward, for the GPU
//! backends (wgpu, cuda). burn composes it from a max, a subtraction, an exponential, a sum and a
//! division (and autodiff records each); here one cube per row reads the row, reduces in shared
//! memory and writes it, and the backward `dx = y (g - sum(g y))` is one more pass.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::{self, calculate_cube_count_elemwise, prelude::*};
use burn_cubecl::tensor::CubeTensor;

use super::cube::{UNITS, contiguous, cube_reduce, cube_sum, empty};

#[backend_extension(Autodiff, Cube: cfg(any(feature = "wgpu", feature = "cuda-runtime")))]
pub trait SoftmaxGpu: Backend {
    /// Softmax over the last dimension.
    fn gpu_softmax(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Softmax over the last dimension on a GPU device, with or without autodiff.
pub fn softmax<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as SoftmaxGpu>::gpu_softmax(x.into_dispatch()))
}

#[cube(launch)]
fn softmax_forward_kernel(x: &[f32], y: &mut [f32], width: usize, #[comptime] units: usize) {
    let row = CUBE_POS;
    if row * width >= y.len() {
        terminate!();
    }
    let base = row * width;
    let t = UNIT_POS_X as usize;
    let stride = CUBE_DIM_X as usize;
    let mut buf = Shared::<[f32]>::new_slice(units);
    // The row's first element starts every thread's maximum (WGSL has no infinity literal).
    let mut m = x[base];
    let mut i = t;
    while i < width {
        m = f32::max(m, x[base + i]);
        i += stride;
    }
    let m = cube_reduce(&mut buf, m, t, stride, true);
    let mut sum = 0.0f32;
    i = t;
    while i < width {
        sum += f32::exp(x[base + i] - m);
        i += stride;
    }
    let inv = 1.0f32 / cube_sum(&mut buf, sum, t, stride);
    i = t;
    while i < width {
        y[base + i] = f32::exp(x[base + i] - m) * inv;
        i += stride;
    }
}

#[cube(launch)]
fn softmax_backward_kernel(g: &[f32], y: &[f32], dx: &mut [f32], width: usize, #[comptime] units: usize) {
    let row = CUBE_POS;
    if row * width >= dx.len() {
        terminate!();
    }
    let base = row * width;
    let t = UNIT_POS_X as usize;
    let stride = CUBE_DIM_X as usize;
    let mut buf = Shared::<[f32]>::new_slice(units);
    let mut dot = 0.0f32;
    let mut i = t;
    while i < width {
        dot += g[base + i] * y[base + i];
        i += stride;
    }
    let dot = cube_sum(&mut buf, dot, t, stride);
    i = t;
    while i < width {
        dx[base + i] = y[base + i] * (g[base + i] - dot);
        i += stride;
    }
}

/// One cube per row of the last dimension.
fn launch(x: &CubeTensor) -> (CubeCount, CubeDim, usize) {
    let width = *x.meta.shape().last().expect("a dimension");
    let rows = x.meta.num_elements() / width.max(1);
    let dim = CubeDim::new_1d(UNITS as u32);
    (calculate_cube_count_elemwise(&x.client, rows * UNITS, dim), dim, width)
}

fn forward(x: CubeTensor) -> CubeTensor {
    let x = contiguous(x);
    let y = empty(&x, x.meta.shape().clone());
    let (count, dim, width) = launch(&x);
    softmax_forward_kernel::launch(
        &x.client.clone(),
        count,
        dim,
        x.into_buffer_arg(),
        y.clone().into_buffer_arg(),
        width,
        UNITS,
    );
    y
}

impl SoftmaxGpu for CubeBackend {
    fn gpu_softmax(x: CubeTensor) -> CubeTensor {
        forward(x)
    }
}

#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<CubeBackend, 1> for SoftmaxBackward {
    /// The output.
    type State = CubeTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let g = contiguous(grads.consume::<CubeBackend>(&ops.node));
        let Some(node) = node else { return };
        let y = ops.state;
        let dx = empty(&y, y.meta.shape().clone());
        let (count, dim, width) = launch(&y);
        softmax_backward_kernel::launch(
            &y.client.clone(),
            count,
            dim,
            g.into_buffer_arg(),
            y.clone().into_buffer_arg(),
            dx.clone().into_buffer_arg(),
            width,
            UNITS,
        );
        grads.register::<CubeBackend>(node.id, dx);
    }
}

impl<C: CheckpointStrategy> SoftmaxGpu for Autodiff<CubeBackend, C> {
    fn gpu_softmax(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match SoftmaxBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = forward(x.primitive().clone());
                prep.finish(y.clone(), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(x.into_primitive())),
        }
    }
}
