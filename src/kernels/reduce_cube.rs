//! What the GPU kernels of this folder share: reductions across one cube's threads in shared
//! memory, and the buffers they read and write.

use burn::tensor::Shape;
use burn_cubecl::cubecl::{self, prelude::*};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;

/// Threads per cube of the row and group kernels (a power of two: the reductions halve).
pub(super) const UNITS: usize = 256;

/// `value` summed over the cube's threads (every thread gets the total); `buf` holds one slot
/// per thread and is free again on return. A fixed tree: the same bits every run.
#[cube]
pub(super) fn cube_sum(buf: &mut Shared<[f32]>, value: f32, t: usize, units: usize) -> f32 {
    buf[t] = value;
    sync_cube();
    let mut h = units / 2;
    while h > 0 {
        if t < h {
            let (a, c) = (buf[t], buf[t + h]);
            buf[t] = a + c;
        }
        sync_cube();
        h /= 2;
    }
    let total = buf[0];
    sync_cube();
    total
}

/// [`cube_sum`] with the maximum.
#[cube]
pub(super) fn cube_max(buf: &mut Shared<[f32]>, value: f32, t: usize, units: usize) -> f32 {
    buf[t] = value;
    sync_cube();
    let mut h = units / 2;
    while h > 0 {
        if t < h {
            let (a, c) = (buf[t], buf[t + h]);
            buf[t] = f32::max(a, c);
        }
        sync_cube();
        h /= 2;
    }
    let total = buf[0];
    sync_cube();
    total
}

/// `t` in row-major order (a view is copied).
pub(super) fn contiguous(t: CubeTensor) -> CubeTensor {
    if t.is_contiguous() && t.is_contiguous_buffer() { t } else { into_contiguous(t) }
}

/// An uninitialised row-major tensor of `shape` on `like`'s device.
pub(super) fn empty(like: &CubeTensor, shape: Shape) -> CubeTensor {
    empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), shape, like.dtype)
}
