//! One slot of a stacked parameter (`[K, ..]` -> `[1, ..]`: TALoRA's routed adapter) on the GPU
//! backends, with a one-kernel backward. The slice itself is a view; burn's backward of a slice
//! is a zeroed `[K, ..]` gradient and a slice-assign into it, two launches per factor per layer
//! (424 of a tiny-SD QAT step's). Here one kernel writes the gradient's slot and its zeros.

use burn::backend::Slice;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::{self, calculate_cube_count_elemwise, prelude::*};
use burn_cubecl::tensor::CubeTensor;

use super::cube::{empty, read, readable};

#[backend_extension(Autodiff, Cube: cfg(any(feature = "wgpu", feature = "cuda-runtime")))]
pub trait SlotGpu: Backend {
    /// `x[slot..slot + 1]` along the first dimension.
    fn gpu_slot(x: FloatTensor<Self>, slot: usize) -> FloatTensor<Self>;
}

/// `x[slot..slot + 1]` along the first dimension on a GPU device, with or without autodiff.
pub fn slot<const D: usize>(x: Tensor<D>, slot: usize) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as SlotGpu>::gpu_slot(x.into_dispatch(), slot))
}

/// `out = g` at the slot's elements, 0 elsewhere.
#[cube(launch)]
fn slot_grad_kernel(
    g: &cubecl::prelude::Tensor<f32>,
    out: &mut [f32],
    slot: usize,
    len: usize,
    #[comptime] strided: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let mut v = 0.0f32;
    if i / len == slot {
        v = read(g, i - slot * len, strided);
    }
    out[i] = v;
}

fn view(x: CubeTensor, slot: usize) -> CubeTensor {
    CubeBackend::float_slice(x, &[Slice::new(slot as isize, Some(slot as isize + 1), 1)])
}

impl SlotGpu for CubeBackend {
    fn gpu_slot(x: CubeTensor, slot: usize) -> CubeTensor {
        view(x, slot)
    }
}

#[derive(Debug)]
struct SlotBackward;

impl Backward<CubeBackend, 1> for SlotBackward {
    /// The slot and the stacked tensor's shape.
    type State = (usize, Shape);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        // A permuted gradient (of a transposed use) is read through its strides, not copied.
        let (g, strided) = readable(grads.consume::<CubeBackend>(&ops.node));
        let Some(node) = node else { return };
        let (slot, shape) = ops.state;
        let n = shape.num_elements();
        let len = n / shape[0].max(1);
        let out = empty(&g, shape);
        let dim = CubeDim::new(&g.client, n);
        let count = calculate_cube_count_elemwise(&g.client, n, dim);
        slot_grad_kernel::launch(
            &g.client.clone(),
            count,
            dim,
            g.into_tensor_arg(),
            out.clone().into_buffer_arg(),
            slot,
            len,
            strided,
        );
        grads.register::<CubeBackend>(node.id, out);
    }
}

impl<C: CheckpointStrategy> SlotGpu for Autodiff<CubeBackend, C> {
    fn gpu_slot(x: FloatTensor<Self>, slot: usize) -> FloatTensor<Self> {
        match SlotBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let shape = x.primitive().meta.shape().clone();
                prep.finish((slot, shape), view(x.primitive().clone(), slot))
            }
            OpsKind::UnTracked(prep) => prep.finish(view(x.into_primitive(), slot)),
        }
    }
}
