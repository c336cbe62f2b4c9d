//! HQ-DiT's online rotation as one CubeCL kernel, for the GPU backends (wgpu, cuda).
//!
//! One cube per Hadamard block of one row: the block is read once from global memory into
//! shared memory (signs applied), the `log2(block)` butterfly stages run there between cube
//! barriers, and the block is written once (normalized). The tensor-op version it replaces
//! (`Hadamard::rotate_ops`) makes a full pass over memory and a `cat` per stage. The same
//! butterflies in the same order as flex's `rotate_row`, so the bits agree.
//!
//! A block lives in shared memory, so blocks are limited to [`MAX_BLOCK`] floats (16 KB, the
//! WebGPU default limit); wider ones take the tensor-op path. The widths of DiT-XL/2 (blocks of
//! 128 and 512) and SD's UNet (64 to 1024) are far below it.

use burn::backend::ops::FloatTensorOps;
use burn::tensor::TensorData;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::{self, calculate_cube_count_elemwise, prelude::*};
use burn_cubecl::tensor::CubeTensor;

use super::hadamard::HadamardBackend;
use crate::kernels::cube::{contiguous, empty};

/// The widest block the kernel holds in shared memory (4096 f32 = 16 KB).
pub const MAX_BLOCK: usize = 4096;

/// Threads per cube: each loops over several elements (and butterfly pairs) when the block is
/// wider than twice this.
const UNITS: usize = 256;

#[cube(launch)]
fn hadamard_kernel(
    x: &[f32],
    signs: &[f32],
    out: &mut [f32],
    cubes: usize,
    norm: f32,
    #[comptime] block: usize,
    #[comptime] transpose: bool,
) {
    let cube = CUBE_POS;
    if cube >= cubes {
        terminate!();
    }
    let units = CUBE_DIM_X as usize;
    let base = cube * block;
    // Rows are contiguous and `block` divides the width, so a block's signs start here.
    let sign_base = base % signs.len();
    let mut buf = Shared::<[f32]>::new_slice(block);
    let mut i = UNIT_POS_X as usize;
    while i < block {
        let mut v = x[base + i];
        if !transpose {
            v *= signs[sign_base + i];
        }
        buf[i] = v;
        i += units;
    }
    sync_cube();
    // Stage `h`: pair `p` is element `lo` of its `2h`-wide group with `lo + h`.
    let mut h = 1usize;
    while h < block {
        let mut p = UNIT_POS_X as usize;
        while p < block / 2 {
            let lo = (p / h) * 2 * h + p % h;
            let (a, c) = (buf[lo], buf[lo + h]);
            buf[lo] = a + c;
            buf[lo + h] = a - c;
            p += units;
        }
        sync_cube();
        h *= 2;
    }
    let mut i = UNIT_POS_X as usize;
    while i < block {
        let mut v = buf[i] * norm;
        if transpose {
            v *= signs[sign_base + i];
        }
        out[base + i] = v;
        i += units;
    }
}

impl HadamardBackend for CubeBackend {
    fn hadamard_rotate(x: CubeTensor, signs: Vec<f32>, block: usize, transpose: bool) -> CubeTensor {
        assert!(block <= MAX_BLOCK, "Hadamard block {block} is wider than the kernel's {MAX_BLOCK}");
        let x = contiguous(x);
        let width = signs.len();
        let signs = CubeBackend::float_from_data(TensorData::new(signs, [width]), &x.device);
        let out = empty(&x, x.meta.shape().clone());
        let cubes = x.meta.num_elements() / block;
        let units = (block / 2).clamp(1, UNITS);
        let dim = CubeDim::new_1d(units as u32);
        let count = calculate_cube_count_elemwise(&x.client, cubes * units, dim);
        let norm = (1.0 / (block as f64).sqrt()) as f32;
        hadamard_kernel::launch(
            &x.client.clone(),
            count,
            dim,
            x.into_buffer_arg(),
            signs.into_buffer_arg(),
            out.clone().into_buffer_arg(),
            cubes,
            norm,
            block,
            transpose,
        );
        out
    }
}
