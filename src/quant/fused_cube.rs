//! The fused fake quantizer as CubeCL kernels, for the GPU backends (wgpu, cuda): the same two
//! passes as the flex version in [`super::fused`], one thread per element.
//!
//! Forward: `q = round(clamp((x - z) / s)) * s + z`, one read of `x` and one write of `q`.
//! Backward: one pass writes `dx` (only where the input is trained) and sums the LSQ terms of
//! the scale and zero-point gradients inside the kernel: each cube reduces a part of one scale's
//! block in shared memory and writes one partial sum, and a small second reduction adds a
//! block's parts. No full-size temporary, and no thread sums a whole tensor (a per-tensor
//! activation scale over millions of values). The tensor-op version this replaces records about
//! ten elementwise ops per forward and as many per backward.
//!
//! Rounding is the bit-pattern rounding of [`super::format::Rounder`], written out for the
//! kernel, so every backend rounds on the grid in the same way.

use burn::backend::ops::FloatTensorOps;
use burn::tensor::Shape;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::{self, calculate_cube_count_elemwise, prelude::*};
use burn_cubecl::tensor::CubeTensor;

use super::format::Format;
use super::fused::FusedQuantKernels;
use crate::kernels::cube::{UNITS, contiguous, cube_sum, empty, read, readable};

/// The format's grid as the kernels round on it (host-computed constants).
#[derive(CubeLaunch, CubeType, Clone, Copy)]
struct GridArgs {
    lo: f32,
    hi: f32,
    max: f32,
    /// 1 for signed grids (the sign is split off before rounding the magnitude).
    signed: u32,
    /// 1 for integer grids (a fixed step of 1), 0 for FP grids.
    int_grid: u32,
    min_normal: f32,
    subnormal_step: f32,
    /// Mantissa bits dropped from an `f32` (23 - man_bits), and the matching rounding constants.
    shift: u32,
    half_minus_one: u32,
    keep_mask: u32,
}

impl GridArgs {
    fn launch(format: &Format) -> GridArgsLaunch {
        let float = format.rounder().float_constants();
        // An integer grid never reads the FP constants; any valid shift keeps them well-defined.
        let (min_normal, subnormal_step, shift) = float.unwrap_or((0.0, 1.0, 1));
        GridArgsLaunch::new(
            format.min(),
            format.max(),
            format.max(),
            format.signed() as u32,
            float.is_none() as u32,
            min_normal,
            subnormal_step,
            shift,
            (1u32 << (shift - 1)) - 1,
            !((1u32 << shift) - 1),
        )
    }
}

/// Round to the nearest integer, ties to even, for `0 <= y < 2^23`. Written with `floor` and
/// the parity of the integer part: shader compilers fold flex's `(y + 2^23) - 2^23` into `y`.
#[cube]
fn round_small(y: f32) -> f32 {
    let t = f32::floor(y);
    let frac = y - t;
    let odd = u32::cast_from(t) & 1u32;
    let mut r = t;
    if frac > 0.5f32 || (frac == 0.5f32 && odd == 1u32) {
        r = t + 1.0f32;
    }
    r
}

/// `round(clamp(u))` on the grid, ties to even; `+ 0.0` turns -0 into +0 as on flex.
#[cube]
fn grid_code(u: f32, grid: &GridArgs) -> f32 {
    let v = f32::min(f32::max(u, grid.lo), grid.hi);
    let negative = grid.signed == 1u32 && v < 0.0f32;
    let mut a = f32::max(v, 0.0f32);
    if grid.signed == 1u32 {
        a = f32::abs(v);
    }
    let mut r = round_small(f32::min(a, grid.max));
    if grid.int_grid == 0u32 {
        if a < grid.min_normal {
            r = round_small(a / grid.subnormal_step) * grid.subnormal_step;
        } else {
            let bits = u32::reinterpret(a);
            let lsb = (bits >> grid.shift) & 1u32;
            r = f32::reinterpret((bits + grid.half_minus_one + lsb) & grid.keep_mask);
        }
        r = f32::min(r, grid.max);
    }
    if negative {
        r = -r;
    }
    r + 0.0f32
}

#[cube(launch)]
fn fake_quant_forward_kernel(
    x: &Tensor<f32>,
    scale: &[f32],
    zero: &[f32],
    out: &mut [f32],
    block: usize,
    grid: &GridArgs,
    #[comptime] has_zero: bool,
    #[comptime] x_strided: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let b = i / block;
    let s = scale[b];
    let mut z = 0.0f32;
    if has_zero {
        z = zero[b];
    }
    let r = grid_code((read(x, i, x_strided) - z) / s, grid);
    out[i] = r * s + z;
}

/// Elements each thread of the backward sums, at most: a block longer than a cube's share is
/// split into parts, each summed by its own cube, and the parts' sums added by a second, small
/// reduction.
const PER_THREAD: usize = 16;

/// One element's share of the backward: `dx = g * in` and the LSQ terms `g * (r - in * u)`
/// (scale) and `g * (1 - in)` (zero point), `in` being whether `u` lies inside the grid.
#[derive(CubeType)]
struct Terms {
    dx: f32,
    ds: f32,
    dz: f32,
}

#[cube]
fn element_terms(gi: f32, u: f32, grid: &GridArgs) -> Terms {
    let r = grid_code(u, grid);
    let mut dx = 0.0f32;
    let mut ds = gi * r;
    let mut dz = gi;
    if u >= grid.lo && u <= grid.hi {
        dx = gi;
        ds = gi * (r - u);
        dz = 0.0f32;
    }
    Terms { dx, ds, dz }
}

/// One cube per part of a block: its threads stride over the part (writing `dx` where wanted),
/// then halve their sums in shared memory; thread 0 writes the part's scale and zero-point sums.
/// Nothing is written full size but `dx`, and no thread sums more than its stride.
#[cube(launch)]
fn fake_quant_backward_kernel(
    g: &Tensor<f32>,
    x: &Tensor<f32>,
    scale: &[f32],
    zero: &[f32],
    dx: &mut [f32],
    ds_parts: &mut [f32],
    dz_parts: &mut [f32],
    block: usize,
    parts: usize,
    cubes: usize,
    grid: &GridArgs,
    #[comptime] units: usize,
    #[comptime] has_zero: bool,
    #[comptime] want_dx: bool,
    #[comptime] want_dz: bool,
    #[comptime] g_strided: bool,
    #[comptime] x_strided: bool,
) {
    let cube = CUBE_POS;
    if cube >= cubes {
        terminate!();
    }
    let b = cube / parts;
    let part = cube % parts;
    let len = (block + parts - 1) / parts;
    let start = b * block + part * len;
    let mut end = start + len;
    if end > b * block + block {
        end = b * block + block;
    }
    let s = scale[b];
    let mut z = 0.0f32;
    if has_zero {
        z = zero[b];
    }
    let stride = CUBE_DIM_X as usize;
    let mut ds = 0.0f32;
    let mut dz = 0.0f32;
    let mut i = start + UNIT_POS_X as usize;
    while i < end {
        let e = element_terms(read(g, i, g_strided), (read(x, i, x_strided) - z) / s, grid);
        ds += e.ds;
        dz += e.dz;
        if want_dx {
            dx[i] = e.dx;
        }
        i += stride;
    }
    let mut buf = Shared::<[f32]>::new_slice(units);
    let t = UNIT_POS_X as usize;
    let ds = cube_sum(&mut buf, ds, t, stride);
    let mut total_dz = 0.0f32;
    if want_dz {
        total_dz = cube_sum(&mut buf, dz, t, stride);
    }
    if t == 0 {
        ds_parts[cube] = ds;
        if want_dz {
            dz_parts[cube] = total_dz;
        }
    }
}

/// Elements of `x` per scale block (scales are per tensor or per leading-dimension block).
fn block_len(x: &CubeTensor, scale: &CubeTensor) -> usize {
    let n = x.meta.num_elements();
    (n / scale.meta.num_elements().max(1)).max(1)
}

fn launch_dims(t: &CubeTensor) -> (CubeCount, CubeDim) {
    let n = t.meta.num_elements();
    let cube_dim = CubeDim::new(&t.client, n);
    (calculate_cube_count_elemwise(&t.client, n, cube_dim), cube_dim)
}

/// Adds each block's `parts` partial sums (`[blocks * parts]`, block-major) into a tensor shaped
/// like `like`; one part is the sum already.
fn add_parts(partials: CubeTensor, parts: usize, like: &CubeTensor) -> CubeTensor {
    let sums = match parts {
        1 => partials,
        _ => {
            let blocks = partials.meta.num_elements() / parts;
            let grouped = CubeBackend::float_reshape(partials, Shape::new([blocks, parts]));
            CubeBackend::float_sum_dim(grouped, 1)
        }
    };
    CubeBackend::float_reshape(sums, like.meta.shape().clone())
}

impl FusedQuantKernels for CubeBackend {
    fn fake_quant_forward(
        x: CubeTensor,
        scale: &CubeTensor,
        zero: Option<&CubeTensor>,
        format: &Format,
    ) -> CubeTensor {
        let ((x, x_strided), s) = (readable(x), contiguous(scale.clone()));
        // Without a zero point the scale stands in for it (the kernel reads none).
        let z = contiguous(zero.unwrap_or(scale).clone());
        let out = empty(&x, x.meta.shape().clone());
        let (count, dim) = launch_dims(&x);
        let block = block_len(&x, &s);
        fake_quant_forward_kernel::launch(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            s.into_buffer_arg(),
            z.into_buffer_arg(),
            out.clone().into_buffer_arg(),
            block,
            GridArgs::launch(format),
            zero.is_some(),
            x_strided,
        );
        out
    }

    fn fake_quant_backward(
        grad: CubeTensor,
        x: &CubeTensor,
        scale: &CubeTensor,
        zero: Option<&CubeTensor>,
        format: &Format,
        want_dx: bool,
        want_dz: bool,
    ) -> (Option<CubeTensor>, CubeTensor, Option<CubeTensor>) {
        let ((g, g_strided), (x, x_strided)) = (readable(grad), readable(x.clone()));
        let (s, z) = (contiguous(scale.clone()), contiguous(zero.unwrap_or(scale).clone()));
        let want_dz = want_dz && zero.is_some();
        let dx = if want_dx { empty(&x, x.meta.shape().clone()) } else { empty(&x, Shape::new([1])) };
        let block = block_len(&x, &s);
        let blocks = s.meta.num_elements();
        let client = x.client.clone();
        // A short block (per-group weight scales) gets a cube as narrow as 32 threads.
        let units = block.next_power_of_two().clamp(32, UNITS);
        let parts = block.div_ceil(units * PER_THREAD);
        let cubes = blocks * parts;
        let (ds, dz) =
            (empty(&x, Shape::new([cubes])), empty(&x, Shape::new([if want_dz { cubes } else { 1 }])));
        let dim = CubeDim::new_1d(units as u32);
        let count = calculate_cube_count_elemwise(&client, cubes * units, dim);
        fake_quant_backward_kernel::launch(
            &client,
            count,
            dim,
            g.into_tensor_arg(),
            x.into_tensor_arg(),
            s.into_buffer_arg(),
            z.into_buffer_arg(),
            dx.clone().into_buffer_arg(),
            ds.clone().into_buffer_arg(),
            dz.clone().into_buffer_arg(),
            block,
            parts,
            cubes,
            GridArgs::launch(format),
            units,
            zero.is_some(),
            want_dx,
            want_dz,
            g_strided,
            x_strided,
        );
        let dz = zero.filter(|_| want_dz).map(|zero| add_parts(dz, parts, zero));
        (want_dx.then_some(dx), add_parts(ds, parts, scale), dz)
    }
}
