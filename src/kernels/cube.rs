//! What the GPU kernels share: reductions across one cube's threads in shared memory, reading a
//! permuted tensor through its strides, and the buffers they read and write.

use burn::tensor::Shape;
use burn_cubecl::cubecl::{self, prelude::*};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;

/// Threads per cube of the row and group kernels (a power of two: the reductions halve).
pub(crate) const UNITS: usize = 256;

/// `value` summed (or, with `max`, maximised) over the cube's threads, every thread getting the
/// result; `buf` holds one slot per thread and is free again on return. A fixed tree: the same
/// bits every run.
#[cube]
pub(crate) fn cube_reduce(
    buf: &mut Shared<[f32]>,
    value: f32,
    t: usize,
    units: usize,
    #[comptime] max: bool,
) -> f32 {
    buf[t] = value;
    sync_cube();
    let mut h = units / 2;
    while h > 0 {
        if t < h {
            let (a, c) = (buf[t], buf[t + h]);
            if max {
                buf[t] = f32::max(a, c);
            } else {
                buf[t] = a + c;
            }
        }
        sync_cube();
        h /= 2;
    }
    let total = buf[0];
    sync_cube();
    total
}

/// [`cube_reduce`]'s sum.
#[cube]
pub(crate) fn cube_sum(buf: &mut Shared<[f32]>, value: f32, t: usize, units: usize) -> f32 {
    cube_reduce(buf, value, t, units, false)
}

/// `t` in row-major order: the kernels index every tensor by its logical position. A gap-free
/// buffer is not enough: a transposed view (attention's keys) has one in another order, and
/// reading it linearly scrambled the quantized attention inputs on the GPU backends.
pub(crate) fn contiguous(t: CubeTensor) -> CubeTensor {
    if t.is_contiguous() && t.is_contiguous_buffer() { t } else { into_contiguous(t) }
}

/// An uninitialised row-major tensor of `shape` on `like`'s device.
pub(crate) fn empty(like: &CubeTensor, shape: Shape) -> CubeTensor {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, like.dtype)
}

/// Element `i` (row-major logical position) of `t`: directly, or through `t`'s strides where it
/// is a permutation of a dense buffer (a transposed weight gradient, a channels-last
/// convolution gradient), which saves a copy kernel and a pass over memory.
#[cube]
pub(crate) fn read(t: &Tensor<f32>, i: usize, #[comptime] strided: bool) -> f32 {
    let mut offset = i;
    if strided {
        let rank = t.rank();
        let mut rest = i;
        offset = 0;
        for k in 0..rank {
            let d = rank - k - 1;
            let shape = t.shape(d);
            offset += (rest % shape) * t.stride(d);
            rest /= shape;
        }
    }
    t[offset]
}

/// `t` as a kernel reads it with [`read`], and whether through its strides: a permutation of a
/// dense buffer is read in place, anything else (a broadcast, a view into a larger buffer) copied
/// into row-major order first.
pub(crate) fn readable(t: CubeTensor) -> (CubeTensor, bool) {
    match (t.is_contiguous(), t.is_contiguous_buffer() && t.is_nonoverlapping()) {
        (true, true) => (t, false),
        (false, true) => (t, true),
        _ => (into_contiguous(t), false),
    }
}
