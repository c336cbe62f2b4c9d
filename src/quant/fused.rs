//! The fake quantizer as one fused operation on the flex backend, for training and inference.
//!
//! The tensor-op version (`quantizer::fake_quantize_ops`, what the GPU backends run) is a chain
//! of elementwise ops that autodiff records one by one: about ten tensor-sized temporaries per
//! forward + backward. Here the forward is one pass over the flex tensor's own memory (no
//! copy in or out) and the backward one more, from the saved inputs:
//!
//! `u = (x - z) / s`, `r = round(clamp(u, lo, hi))`, `q = r * s + z`, and with `in = lo <= u <= hi`
//! (the tensor version's clamp passes the gradient at the bounds too):
//! `dx = g * in`, `ds = sum(g * (r - in * u))` (LSQ), `dz = sum(g * (1 - in))`,
//! the sums running over each scale's block of `x`.
//!
//! Scales (and zero points) are per tensor or per leading-dimension block (`[n, 1, ..]` against
//! `x: [n, ..]`), which covers every quantizer a layer carries; other shapes use the tensor
//! version. The GPU backends (wgpu, cuda) run the same operation as CubeCL kernels
//! (`fused_cube.rs`) under the same autodiff backward.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, DispatchDevice, Flex, backend_extension};
use std::ops::Range;

use burn::tensor::{Device, Tensor};
use rayon::prelude::*;

use super::format::{Format, Round, Rounder};
use crate::kernels::host::{tensor_like, values, values_mut, writable, zeros};

#[backend_extension(Autodiff, Flex, Cube: cfg(any(feature = "wgpu", feature = "cuda-runtime")))]
pub trait FusedQuantBackend: Backend {
    /// `q = round(clamp((x - z) / s)) * s + z` on the grid of `format`.
    fn fused_fake_quant(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        zero_point: FloatTensor<Self>,
        format: Format,
    ) -> FloatTensor<Self>;

    /// [`Self::fused_fake_quant`] without a zero point (signed formats): no zero tensor to
    /// allocate per call (on a GPU a kernel) nor a gradient for it.
    fn fused_fake_quant_symmetric(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        format: Format,
    ) -> FloatTensor<Self>;
}

/// Elements per parallel work item. Fixed, so that the order in which the scale gradients are
/// summed (and so their bits) does not depend on the thread count.
const CHUNK: usize = 1 << 14;

/// Independent partial sums per scale block in the backward, so that its loop vectorises.
const LANES: usize = 8;

/// Elements of `x` per scale block.
fn block_len(x: &FlexTensor, scale: &FlexTensor) -> usize {
    let n = x.layout().num_elements();
    (n / scale.layout().num_elements().max(1)).max(1)
}

/// Splits the chunk starting at element `start` with `len` elements into runs that share one
/// scale block: `f(block, run)` with `run` relative to the chunk.
fn block_runs(start: usize, len: usize, block: usize, mut f: impl FnMut(usize, Range<usize>)) {
    let mut i = start;
    while i < start + len {
        let b = i / block;
        let end = ((b + 1) * block).min(start + len);
        f(b, i - start..end - start);
        i = end;
    }
}

/// The format's grid as the forward and the backward both round on it, with the rounding of
/// one kind of format (`R`), so that the kernels' loops vectorise.
struct Grid<R> {
    lo: f32,
    hi: f32,
    rounder: R,
}

/// Runs `$body` with `$grid` bound to `format`'s [`Grid`] of the concrete rounder type.
macro_rules! with_grid {
    ($format:expr, |$grid:ident| $body:expr) => {
        match $format.rounder() {
            Rounder::Int(r) => {
                let $grid = Grid::new($format, r);
                $body
            }
            Rounder::Float(r) => {
                let $grid = Grid::new($format, r);
                $body
            }
        }
    };
}

impl<R: Round> Grid<R> {
    fn new(format: &Format, rounder: R) -> Self {
        Self { lo: format.min(), hi: format.max(), rounder }
    }

    /// `round(clamp(u))`; `+ 0.0` turns a rounded -0 into +0, as the tensor version does.
    #[inline(always)]
    fn code(&self, u: f32) -> f32 {
        self.rounder.round(u.clamp(self.lo, self.hi)) + 0.0
    }
}

// The loops index instead of zipping iterators: measured on 16M elements, the iterator forms of
// the two forwards did not vectorise (17 ms against 6.5 ms).
#[allow(clippy::needless_range_loop)]
impl<R: Round> Grid<R> {
    /// `q = round(clamp((x - z) / s)) * s + z` over one run of one scale block, in place.
    #[inline(always)]
    fn quantize_in_place(&self, s: f32, z: f32, xs: &mut [f32]) {
        for i in 0..xs.len() {
            xs[i] = self.code((xs[i] - z) / s) * s + z;
        }
    }

    /// The same into `out`.
    #[inline(always)]
    fn quantize(&self, s: f32, z: f32, xs: &[f32], out: &mut [f32]) {
        let n = out.len().min(xs.len());
        let (out, xs) = (&mut out[..n], &xs[..n]);
        for i in 0..n {
            out[i] = self.code((xs[i] - z) / s) * s + z;
        }
    }

    /// `(dx, ds term, dz term)` of one element with upstream gradient `g`, with selects, not
    /// branches (a quarter of a typical tensor is clipped, at random).
    #[inline(always)]
    fn terms(&self, s: f32, z: f32, g: f32, v: f32) -> (f32, f32, f32) {
        let u = (v - z) / s;
        let r = self.code(u);
        let inside = (u >= self.lo) & (u <= self.hi);
        let dx = if inside { g } else { 0.0 };
        (dx, g * (r - if inside { u } else { 0.0 }), g - dx)
    }

    /// The backward over one run of one scale block: overwrites `g` with `dx` and returns this
    /// run's `(ds, dz)`, summed in LANES running sums (a fixed order that vectorises).
    #[inline(always)]
    fn backward(&self, s: f32, z: f32, g: &mut [f32], xs: &[f32]) -> (f32, f32) {
        let (mut sum_s, mut sum_z) = ([0.0f32; LANES], [0.0f32; LANES]);
        let mut g_lanes = g.chunks_exact_mut(LANES);
        let mut x_lanes = xs.chunks_exact(LANES);
        for (gl, xl) in (&mut g_lanes).zip(&mut x_lanes) {
            for l in 0..LANES {
                let (dx, ds, dz) = self.terms(s, z, gl[l], xl[l]);
                gl[l] = dx;
                sum_s[l] += ds;
                sum_z[l] += dz;
            }
        }
        for (g, &v) in g_lanes.into_remainder().iter_mut().zip(x_lanes.remainder()) {
            let (dx, ds, dz) = self.terms(s, z, *g, v);
            *g = dx;
            sum_s[0] += ds;
            sum_z[0] += dz;
        }
        (sum_s.iter().sum(), sum_z.iter().sum())
    }

    /// [`Self::backward`]'s `(ds, dz)` alone, in the same order (the same bits), reading `g`
    /// only: for an input nothing needs `dx` of (a frozen weight).
    #[inline(always)]
    fn sums(&self, s: f32, z: f32, g: &[f32], xs: &[f32]) -> (f32, f32) {
        let (mut sum_s, mut sum_z) = ([0.0f32; LANES], [0.0f32; LANES]);
        let (g_lanes, x_lanes) = (g.chunks_exact(LANES), xs.chunks_exact(LANES));
        let rest = g_lanes.remainder().iter().zip(x_lanes.remainder());
        for (gl, xl) in g_lanes.zip(x_lanes) {
            for l in 0..LANES {
                let (_, ds, dz) = self.terms(s, z, gl[l], xl[l]);
                sum_s[l] += ds;
                sum_z[l] += dz;
            }
        }
        for (&g, &v) in rest {
            let (_, ds, dz) = self.terms(s, z, g, v);
            sum_s[0] += ds;
            sum_z[0] += dz;
        }
        (sum_s.iter().sum(), sum_z.iter().sum())
    }
}

/// `(block, ds, dz)` of each scale-block run of chunk `c` (`len` elements), from `run_sums`.
fn chunk_sums(
    c: usize,
    len: usize,
    block: usize,
    mut run_sums: impl FnMut(usize, Range<usize>) -> (f32, f32),
) -> Vec<(usize, f32, f32)> {
    let mut sums = Vec::new();
    block_runs(c * CHUNK, len, block, |b, run| {
        let (ds, dz) = run_sums(b, run);
        sums.push((b, ds, dz));
    });
    sums
}

/// The run kernels compiled for AVX2 (8 lanes instead of the x86-64 baseline's 4), chosen at
/// run time where the CPU has it. The same bits either way: Rust never fuses `a * b + c`.
mod dispatch {
    use super::{Grid, Round};

    fn avx2() -> bool {
        #[cfg(target_arch = "x86_64")]
        return std::arch::is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    macro_rules! kernel {
        ($name:ident, $wide:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            fn $wide<R: Round>(grid: &Grid<R>, $($arg: $ty),*) -> $ret {
                grid.$name($($arg),*)
            }

            pub(super) fn $name<R: Round>(grid: &Grid<R>, $($arg: $ty),*) -> $ret {
                #[cfg(target_arch = "x86_64")]
                if avx2() {
                    // SAFETY: the CPU supports AVX2 (checked above).
                    return unsafe { $wide(grid, $($arg),*) };
                }
                grid.$name($($arg),*)
            }
        };
    }

    kernel!(quantize_in_place, quantize_in_place_avx2, (s: f32, z: f32, xs: &mut [f32]) -> ());
    kernel!(quantize, quantize_avx2, (s: f32, z: f32, xs: &[f32], out: &mut [f32]) -> ());
    kernel!(backward, backward_avx2, (s: f32, z: f32, g: &mut [f32], xs: &[f32]) -> (f32, f32));
    kernel!(sums, sums_avx2, (s: f32, z: f32, g: &[f32], xs: &[f32]) -> (f32, f32));
}

/// The probabilities' quantizer inside the fused attention (`kernels::attention`), one row at a
/// time with the same run kernels (the same bits per element as [`FusedQuantKernels`]).
impl crate::kernels::attention::RowQuantizer for Format {
    fn quantize(&self, s: f32, z: f32, row: &mut [f32]) {
        with_grid!(self, |grid| dispatch::quantize_in_place(&grid, s, z, row))
    }

    fn backward(&self, s: f32, z: f32, g: &mut [f32], x: &[f32]) -> (f32, f32) {
        with_grid!(self, |grid| dispatch::backward(&grid, s, z, g, x))
    }
}

/// The quantizer's two passes on one backend's own tensors: flex here, the CubeCL backends in
/// `fused_cube`. Scales (and zero points) are per tensor or per leading-dimension block.
pub trait FusedQuantKernels: Backend {
    /// `q`; `x` is taken by value so that a backend may reuse its memory.
    fn fake_quant_forward(
        x: FloatTensor<Self>,
        scale: &FloatTensor<Self>,
        zero: Option<&FloatTensor<Self>>,
        format: &Format,
    ) -> FloatTensor<Self>;

    /// `(dx, ds, dz)` for the upstream gradient `grad` (STE for `x`, LSQ for scale and zero);
    /// `dx` only when `want_dx` (a frozen weight needs none), `dz` only when `want_dz` (and a
    /// zero point is given: without one it is zero).
    fn fake_quant_backward(
        grad: FloatTensor<Self>,
        x: &FloatTensor<Self>,
        scale: &FloatTensor<Self>,
        zero: Option<&FloatTensor<Self>>,
        format: &Format,
        want_dx: bool,
        want_dz: bool,
    ) -> (Option<FloatTensor<Self>>, FloatTensor<Self>, Option<FloatTensor<Self>>);
}

/// Flex: each pass is one loop over the tensor's own memory, in fixed chunks on rayon's pool.
impl FusedQuantKernels for Flex {
    /// `q = round(clamp((x - z) / s)) * s + z`, in `x`'s own memory when nothing else holds it
    /// (inference), else into one new tensor; chunks run in parallel.
    fn fake_quant_forward(
        mut x: FlexTensor,
        scale: &FlexTensor,
        zero: Option<&FlexTensor>,
        format: &Format,
    ) -> FlexTensor {
        let s = values(scale);
        let z = zero.map(values).unwrap_or_else(|| vec![0.0f32; s.len()].into());
        let block = block_len(&x, scale);
        if let Some(xs) = values_mut(&mut x) {
            with_grid!(format, |grid| xs.par_chunks_mut(CHUNK).enumerate().for_each(|(c, xc)| {
                block_runs(c * CHUNK, xc.len(), block, |b, run| {
                    dispatch::quantize_in_place(&grid, s[b], z[b], &mut xc[run])
                })
            }));
            return x;
        }
        let xs = values(&x);
        let mut out = zeros(xs.len());
        quantize_into(format, &xs, &s, &z, block, &mut out);
        tensor_like(out, &x)
    }

    /// `(dx, ds, dz)` for the upstream gradient `grad`; `dx` takes over `grad`'s memory when it
    /// can, and without `want_dx` the pass only reads. Each chunk sums its part of every block
    /// it touches; the parts are added in chunk order (the same bits with or without `dx`).
    fn fake_quant_backward(
        grad: FlexTensor,
        x: &FlexTensor,
        scale: &FlexTensor,
        zero: Option<&FlexTensor>,
        format: &Format,
        want_dx: bool,
        want_dz: bool,
    ) -> (Option<FlexTensor>, FlexTensor, Option<FlexTensor>) {
        let (xs, s) = (values(x), values(scale));
        let z = zero.map(values).unwrap_or_else(|| vec![0.0f32; s.len()].into());
        let block = block_len(x, scale);
        let (dx, (ds, dz)) = if want_dx {
            let mut dx = writable(grad);
            let sums =
                backward_into(format, values_mut(&mut dx).expect("writable tensor"), &xs, &s, &z, block);
            (Some(dx), sums)
        } else {
            (None, backward_sums(format, &values(&grad), &xs, &s, &z, block))
        };
        (dx, tensor_like(ds, scale), zero.filter(|_| want_dz).map(|zero| tensor_like(dz, zero)))
    }
}

/// `q = round(clamp((x - z) / s)) * s + z` of `xs` into `out`, `block` values per scale.
fn quantize_into(format: &Format, xs: &[f32], s: &[f32], z: &[f32], block: usize, out: &mut [f32]) {
    let chunks = out.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).enumerate();
    with_grid!(format, |grid| chunks.for_each(|(c, (oc, xc))| {
        block_runs(c * CHUNK, xc.len(), block, |b, run| {
            dispatch::quantize(&grid, s[b], z[b], &xc[run.clone()], &mut oc[run])
        })
    }));
}

/// The backward over all of `xs` with `g` overwritten by `dx`: `(ds, dz)` per scale block. Each
/// chunk sums its part of every block it touches; the parts are added in chunk order.
fn backward_into(
    format: &Format,
    g: &mut [f32],
    xs: &[f32],
    s: &[f32],
    z: &[f32],
    block: usize,
) -> (Vec<f32>, Vec<f32>) {
    let chunks = g.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).enumerate();
    let parts = with_grid!(format, |grid| chunks
        .map(|(c, (gc, xc))| {
            chunk_sums(c, gc.len(), block, |b, run| {
                dispatch::backward(&grid, s[b], z[b], &mut gc[run.clone()], &xc[run])
            })
        })
        .collect());
    add_parts(parts, s.len())
}

/// [`backward_into`]'s `(ds, dz)` alone, reading `g` only (the same bits).
fn backward_sums(
    format: &Format,
    g: &[f32],
    xs: &[f32],
    s: &[f32],
    z: &[f32],
    block: usize,
) -> (Vec<f32>, Vec<f32>) {
    let chunks = g.par_chunks(CHUNK).zip(xs.par_chunks(CHUNK)).enumerate();
    let parts = with_grid!(format, |grid| chunks
        .map(|(c, (gc, xc))| {
            chunk_sums(c, gc.len(), block, |b, run| {
                dispatch::sums(&grid, s[b], z[b], &gc[run.clone()], &xc[run])
            })
        })
        .collect());
    add_parts(parts, s.len())
}

/// The chunks' `(block, ds, dz)` parts added per block in chunk order.
fn add_parts(parts: Vec<Vec<(usize, f32, f32)>>, blocks: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut ds, mut dz) = (vec![0.0f32; blocks], vec![0.0f32; blocks]);
    for (b, sum_s, sum_z) in parts.into_iter().flatten() {
        ds[b] += sum_s;
        dz[b] += sum_z;
    }
    (ds, dz)
}

/// The weight quantizer inside the quantized layers (`kernels::qweight`): the same loops as
/// [`FusedQuantKernels`] without a zero point, on the layer's scratch buffers.
impl crate::kernels::qweight::WeightQuantizer for Format {
    fn quantize(&self, w: &[f32], scale: &[f32], out: &mut [f32]) {
        let zero = vec![0.0f32; scale.len()];
        quantize_into(self, w, scale, &zero, w.len() / scale.len().max(1), out)
    }

    fn backward(&self, g: &mut [f32], w: &[f32], scale: &[f32], dw: bool) -> Vec<f32> {
        let (zero, block) = (vec![0.0f32; scale.len()], w.len() / scale.len().max(1));
        let (ds, _) = if dw {
            backward_into(self, g, w, scale, &zero, block)
        } else {
            backward_sums(self, g, w, scale, &zero, block)
        };
        ds
    }
}

impl FusedQuantBackend for Flex {
    fn fused_fake_quant(
        x: FlexTensor,
        scale: FlexTensor,
        zero_point: FlexTensor,
        format: Format,
    ) -> FlexTensor {
        Self::fake_quant_forward(x, &scale, Some(&zero_point), &format)
    }

    fn fused_fake_quant_symmetric(x: FlexTensor, scale: FlexTensor, format: Format) -> FlexTensor {
        Self::fake_quant_forward(x, &scale, None, &format)
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
impl FusedQuantBackend for burn_cubecl::CubeBackend {
    fn fused_fake_quant(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        zero_point: FloatTensor<Self>,
        format: Format,
    ) -> FloatTensor<Self> {
        Self::fake_quant_forward(x, &scale, Some(&zero_point), &format)
    }

    fn fused_fake_quant_symmetric(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        format: Format,
    ) -> FloatTensor<Self> {
        Self::fake_quant_forward(x, &scale, None, &format)
    }
}

#[derive(Debug)]
struct FusedQuantBackward {
    format: Format,
}

/// Registers the gradients of one fused quantizer call with the nodes that want them.
fn register<B: FusedQuantKernels>(
    format: &Format,
    grads: &mut Gradients,
    grad: FloatTensor<B>,
    (node_x, node_s, node_z): (Option<NodeId>, Option<NodeId>, Option<NodeId>),
    (x, scale, zero): (FloatTensor<B>, FloatTensor<B>, Option<FloatTensor<B>>),
) {
    let (dx, ds, dz) =
        B::fake_quant_backward(grad, &x, &scale, zero.as_ref(), format, node_x.is_some(), node_z.is_some());
    if let (Some(node), Some(dx)) = (node_x, dx) {
        grads.register::<B>(node, dx);
    }
    if let Some(node) = node_s {
        grads.register::<B>(node, ds);
    }
    if let (Some(node), Some(dz)) = (node_z, dz) {
        grads.register::<B>(node, dz);
    }
}

impl<B: FusedQuantKernels> Backward<B, 3> for FusedQuantBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_id, s_id, z_id] = ops.parents.map(|n| n.map(|n| n.id));
        let grad = grads.consume::<B>(&ops.node);
        let (x, scale, zero) = ops.state;
        register::<B>(&self.format, grads, grad, (x_id, s_id, z_id), (x, scale, Some(zero)));
    }
}

impl<B: FusedQuantKernels> Backward<B, 2> for FusedQuantBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_id, s_id] = ops.parents.map(|n| n.map(|n| n.id));
        let grad = grads.consume::<B>(&ops.node);
        let (x, scale) = ops.state;
        register::<B>(&self.format, grads, grad, (x_id, s_id, None), (x, scale, None));
    }
}

impl<B: FusedQuantKernels, C: CheckpointStrategy> FusedQuantBackend for Autodiff<B, C> {
    fn fused_fake_quant(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        zero_point: FloatTensor<Self>,
        format: Format,
    ) -> FloatTensor<Self> {
        let backward = FusedQuantBackward { format: format.clone() };
        match Backward::<B, 3>::prepare::<C>(backward, [x.node(), scale.node(), zero_point.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, s, z) =
                    (x.primitive().clone(), scale.primitive().clone(), zero_point.primitive().clone());
                let out = B::fake_quant_forward(x.clone(), &s, Some(&z), &format);
                prep.finish((x, s, z), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fake_quant_forward(
                x.into_primitive(),
                scale.primitive(),
                Some(zero_point.primitive()),
                &format,
            )),
        }
    }

    fn fused_fake_quant_symmetric(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        format: Format,
    ) -> FloatTensor<Self> {
        let backward = FusedQuantBackward { format: format.clone() };
        match Backward::<B, 2>::prepare::<C>(backward, [x.node(), scale.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (x, s) = (x.primitive().clone(), scale.primitive().clone());
                let out = B::fake_quant_forward(x.clone(), &s, None, &format);
                prep.finish((x, s), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::fake_quant_forward(x.into_primitive(), scale.primitive(), None, &format))
            }
        }
    }
}

/// Whether `device` (with or without autodiff) runs on a backend with [`FusedQuantKernels`].
fn has_fused_kernels(device: &Device) -> bool {
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Flex(_) => true,
        #[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
        DispatchDevice::Cube(_) => true,
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// The fused quantizer where it applies (flex or a CubeCL device, with or without autodiff;
/// scales per tensor or per leading block); elsewhere `Err(x)` hands `x` back. `x` is taken by value so that an
/// inference input nobody else holds is quantized in its own memory.
pub fn fake_quantize_fused<const D: usize>(
    x: Tensor<D>,
    format: &Format,
    scale: &Tensor<D>,
    zero_point: Option<&Tensor<D>>,
) -> Result<Tensor<D>, Tensor<D>> {
    let device = x.device();
    if !has_fused_kernels(&device) {
        return Err(x);
    }
    let dims = x.dims();
    let blocks = scale.dims()[0];
    let leading_only = scale.dims().iter().skip(1).all(|&d| d == 1);
    if !leading_only
        || !(blocks == 1 || blocks == dims[0])
        || zero_point.is_some_and(|z| z.dims() != scale.dims())
    {
        return Err(x);
    }
    let out = match zero_point {
        Some(z) => <Dispatch as FusedQuantBackend>::fused_fake_quant(
            x.into_dispatch(),
            scale.clone().into_dispatch(),
            z.clone().into_dispatch(),
            format.clone(),
        ),
        None => <Dispatch as FusedQuantBackend>::fused_fake_quant_symmetric(
            x.into_dispatch(),
            scale.clone().into_dispatch(),
            format.clone(),
        ),
    };
    Ok(Tensor::from_dispatch(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::params::host_values;
    use crate::quant::quantizer::fake_quantize_ops;
    use crate::rng::SeededRng;
    use burn::tensor::TensorData;

    /// Forward bit-identical to the tensor version, gradients equal up to f32 summation order.
    #[test]
    fn fused_quantizer_matches_the_tensor_version_in_values_and_gradients() {
        let device = Device::flex().autodiff();
        let mut rng = SeededRng::new(11);
        for (spec, zero) in [("e2m1", false), ("ue2m2", true), ("int4", false), ("e4m3", false)] {
            let format = Format::parse(spec).unwrap();
            let x0: Vec<f32> = rng.normals(4 * 3 * 8).iter().map(|v| v * 2.0).collect();
            let s0: Vec<f32> = (0..4).map(|_| 0.2 + 0.5 * rng.uniform()).collect();
            let z0: Vec<f32> = (0..4).map(|_| -0.5 * rng.uniform()).collect();
            let g0 = rng.normals(4 * 3 * 8);
            let run = |fused: bool| {
                let x =
                    Tensor::<3>::from_data(TensorData::new(x0.clone(), [4, 3, 8]), &device).require_grad();
                let s =
                    Tensor::<3>::from_data(TensorData::new(s0.clone(), [4, 1, 1]), &device).require_grad();
                let z = zero.then(|| {
                    Tensor::<3>::from_data(TensorData::new(z0.clone(), [4, 1, 1]), &device).require_grad()
                });
                let q = if fused {
                    fake_quantize_fused(x.clone(), &format, &s, z.as_ref())
                        .unwrap_or_else(|_| panic!("fused path applies"))
                } else {
                    fake_quantize_ops(x.clone(), &format, s.clone(), z.clone())
                };
                let g = Tensor::<3>::from_data(TensorData::new(g0.clone(), [4, 3, 8]), &device);
                let grads = (q.clone() * g).sum().backward();
                let dz = z.map(|z| host_values(z.grad(&grads).unwrap()));
                (
                    host_values(q),
                    host_values(x.grad(&grads).unwrap()),
                    host_values(s.grad(&grads).unwrap()),
                    dz,
                )
            };
            let (fq, fdx, fds, fdz) = run(true);
            let (tq, tdx, tds, tdz) = run(false);
            assert_eq!(fq, tq, "{spec}: forward");
            let close = |a: &[f32], b: &[f32], what: &str| {
                for (i, (a, b)) in a.iter().zip(b).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{spec} {what}[{i}]: {a} vs {b}");
                }
            };
            close(&fdx, &tdx, "dx");
            close(&fds, &tds, "ds");
            if let (Some(f), Some(t)) = (fdz, tdz) {
                close(&f, &t, "dz");
            }
            if format.bits() == 4 {
                assert!(fdx.contains(&0.0) && fdx.iter().any(|&d| d != 0.0), "{spec}: clipping");
            }
        }
    }

    /// A frozen input (a weight nobody trains) gets no `dx`, and its scale and zero-point
    /// gradients are the same bits as when `dx` is computed beside them; over several chunks.
    #[test]
    fn a_frozen_input_skips_dx_with_the_same_scale_gradients() {
        let device = Device::flex().autodiff();
        let format = Format::parse("ue2m2").unwrap();
        let n = 3 * CHUNK + 77;
        let x0: Vec<f32> = SeededRng::new(4).normals(n);
        let g0 = SeededRng::new(5).normals(n);
        let run = |train_x: bool| {
            let x = Tensor::<2>::from_data(TensorData::new(x0.clone(), [1, n]), &device);
            let x = if train_x { x.require_grad() } else { x };
            let s = Tensor::<2>::from_data(TensorData::new(vec![0.4f32], [1, 1]), &device).require_grad();
            let z = Tensor::<2>::from_data(TensorData::new(vec![-0.3f32], [1, 1]), &device).require_grad();
            let q = fake_quantize_fused(x.clone(), &format, &s, Some(&z)).unwrap_or_else(|_| panic!("fused"));
            let g = Tensor::<2>::from_data(TensorData::new(g0.clone(), [1, n]), &device);
            let grads = (q * g).sum().backward();
            let dx = x.grad(&grads).map(host_values);
            (dx, host_values(s.grad(&grads).unwrap()), host_values(z.grad(&grads).unwrap()))
        };
        let (dx, ds, dz) = run(true);
        let (none, frozen_ds, frozen_dz) = run(false);
        assert!(dx.is_some() && none.is_none());
        assert_eq!(ds[0].to_bits(), frozen_ds[0].to_bits());
        assert_eq!(dz[0].to_bits(), frozen_dz[0].to_bits());
    }

    /// A transposed view (attention quantizes K^T) is quantized at its logical positions, with
    /// per-tensor and per-leading-row scales: the GPU kernels once read such views in memory order.
    #[test]
    fn fused_quantizer_on_a_transposed_view_matches_the_tensor_version() {
        let device = Device::flex().autodiff();
        let format = Format::parse("e2m1").unwrap();
        let x0 = SeededRng::new(8).normals(6 * 5);
        for blocks in [1, 5] {
            let s0: Vec<f32> = (0..blocks).map(|i| 0.3 + 0.1 * i as f32).collect();
            let run = |fused: bool| {
                let x = Tensor::<2>::from_data(TensorData::new(x0.clone(), [6, 5]), &device).require_grad();
                let s =
                    Tensor::<2>::from_data(TensorData::new(s0.clone(), [blocks, 1]), &device).require_grad();
                let xt = x.clone().transpose();
                let q = if fused {
                    fake_quantize_fused(xt, &format, &s, None)
                        .unwrap_or_else(|_| panic!("fused path applies"))
                } else {
                    fake_quantize_ops(xt, &format, s.clone(), None)
                };
                let w = Tensor::<2>::from_data(
                    TensorData::new((0..30).map(|i| i as f32).collect::<Vec<_>>(), [5, 6]),
                    &device,
                );
                let grads = (q.clone() * w).sum().backward();
                (host_values(q), host_values(x.grad(&grads).unwrap()), host_values(s.grad(&grads).unwrap()))
            };
            let (fused, ops) = (run(true), run(false));
            assert_eq!(fused.0, ops.0, "values, {blocks} blocks");
            // The tensor version's gradients pass through x / s * s: equal up to f32 rounding.
            for (a, b) in fused.1.iter().zip(&ops.1).chain(fused.2.iter().zip(&ops.2)) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "gradients, {blocks} blocks: {a} vs {b}");
            }
        }
    }

    /// Tensors of several parallel chunks, with scale blocks that straddle chunk boundaries
    /// (rows of 40,000) and many blocks per chunk (rows of 7): the same values and gradients as
    /// the tensor version, for training (autodiff) and in-place inference.
    #[test]
    fn fused_quantizer_over_many_chunks_matches_the_tensor_version() {
        let format = Format::parse("ue2m2").unwrap();
        let mut rng = SeededRng::new(3);
        for (rows, cols) in [(3, 40_000), (5_000, 7), (1, 70_000)] {
            let n = rows * cols;
            let x0: Vec<f32> = rng.normals(n);
            let s0: Vec<f32> = (0..rows).map(|_| 0.1 + 0.3 * rng.uniform()).collect();
            let z0: Vec<f32> = (0..rows).map(|_| -0.3 * rng.uniform()).collect();
            let g0 = rng.normals(n);
            let device = Device::flex().autodiff();
            let tensor = |v: &[f32], shape: [usize; 2], device: &Device| {
                Tensor::<2>::from_data(TensorData::new(v.to_vec(), shape), device)
            };
            let run = |fused: bool| {
                let x = tensor(&x0, [rows, cols], &device).require_grad();
                let s = tensor(&s0, [rows, 1], &device).require_grad();
                let z = tensor(&z0, [rows, 1], &device).require_grad();
                let q = if fused {
                    fake_quantize_fused(x.clone(), &format, &s, Some(&z))
                        .unwrap_or_else(|_| panic!("fused path applies"))
                } else {
                    fake_quantize_ops(x.clone(), &format, s.clone(), Some(z.clone()))
                };
                let grads = (q.clone() * tensor(&g0, [rows, cols], &device)).sum().backward();
                let grad = |t: &Tensor<2>| host_values(t.grad(&grads).unwrap());
                (host_values(q), grad(&x), grad(&s), grad(&z))
            };
            let (fq, fdx, fds, fdz) = run(true);
            let (tq, tdx, tds, tdz) = run(false);
            assert_eq!(fq, tq, "{rows}x{cols}: forward");
            // dx: the tensor version's chain (g * s) / s is g up to rounding.
            assert!(
                fdx.iter().zip(&tdx).all(|(a, b)| (a - b).abs() <= 1e-6 * (1.0 + b.abs())),
                "{rows}x{cols}: dx"
            );
            assert!(fdx.contains(&0.0) && fdx.iter().any(|&d| d != 0.0), "clipping");
            for (what, f, t) in [("ds", &fds, &tds), ("dz", &fdz, &tdz)] {
                for (i, (a, b)) in f.iter().zip(t.iter()).enumerate() {
                    // Sums of up to 70,000 terms in another order.
                    assert!((a - b).abs() <= 1e-3 * (1.0 + b.abs()), "{rows}x{cols} {what}[{i}]: {a} vs {b}");
                }
            }
            // Inference: the input is quantized in its own memory, to the same values.
            let plain = Device::flex();
            let (x, s, z) = (
                tensor(&x0, [rows, cols], &plain),
                tensor(&s0, [rows, 1], &plain),
                tensor(&z0, [rows, 1], &plain),
            );
            let q = fake_quantize_fused(x, &format, &s, Some(&z))
                .unwrap_or_else(|_| panic!("fused path applies"));
            assert_eq!(host_values(q), tq, "{rows}x{cols}: inference");
        }
    }

    #[test]
    fn fused_path_applies_to_flex_with_block_scales() {
        let x = Tensor::<2>::zeros([4, 8], &Device::flex().autodiff());
        let f = Format::parse("e2m1").unwrap();
        assert!(fake_quantize_fused(x.clone(), &f, &Tensor::ones([4, 1], &x.device()), None).is_ok());
        assert!(fake_quantize_fused(x.clone(), &f, &Tensor::ones([1, 8], &x.device()), None).is_err());
        let plain = Tensor::<2>::zeros([4, 8], &Device::flex());
        assert!(fake_quantize_fused(plain.clone(), &f, &Tensor::ones([4, 1], &plain.device()), None).is_ok());
    }

    /// The weight quantizer inside the layer (`kernels::qweight`) against the composed
    /// `fake_quantize` + layer: output, input gradient, scale gradient, bias gradient and (when
    /// the weight is tracked) the weight's gradient, bit for bit, for convolutions on each path
    /// (grid, unfolded, strided, 1x1; the shifted weight gradient) and linear layers, with one
    /// scale per output channel and per group of the fan-in.
    #[test]
    fn weight_quantized_inside_the_layer_matches_composed_bit_for_bit() {
        use crate::kernels::qweight::{Layer, quantized_layer};
        use crate::quant::quantizer::fake_quantize;
        use std::sync::Arc;
        let device = Device::flex().autodiff();
        let mut rng = SeededRng::new(23);
        let format = Format::parse("e2m1").unwrap();
        // (x shape, w shape, layer, group size (0: per channel), weight tracked, bias)
        let conv = |stride, padding| Layer::Conv { stride, padding };
        let cases: Vec<(Vec<usize>, Vec<usize>, Layer, usize, bool, bool)> = vec![
            (vec![2, 8, 16, 16], vec![6, 8, 3, 3], conv(1, 1), 0, false, true),
            (vec![2, 12, 16, 16], vec![8, 12, 3, 3], conv(1, 1), 0, false, true),
            (vec![1, 5, 9, 7], vec![4, 5, 3, 3], conv(2, 1), 9, true, false),
            (vec![2, 6, 5, 6], vec![4, 6, 1, 1], conv(1, 0), 0, true, true),
            (vec![2, 7, 13], vec![9, 13], Layer::Linear, 0, false, true),
            (vec![3, 16], vec![5, 16], Layer::Linear, 4, true, false),
        ];
        for (xs, ws, layer, group, tracked, with_bias) in cases {
            let (n_x, n_w) = (xs.iter().product::<usize>(), ws.iter().product::<usize>());
            let blocks = n_w.checked_div(group).unwrap_or(ws[0]);
            let x0 = rng.normals(n_x);
            let w0: Vec<f32> = rng.normals(n_w).iter().map(|v| v * 0.5).collect();
            let s0: Vec<f32> = (0..blocks).map(|_| 0.1 + 0.2 * rng.uniform()).collect();
            let b0 = rng.normals(ws[0]);
            let run = |fused: bool| {
                let x = Tensor::<1>::from_data(TensorData::new(x0.clone(), [n_x]), &device).require_grad();
                let w = Tensor::<1>::from_data(TensorData::new(w0.clone(), [n_w]), &device);
                let w = if tracked { w.require_grad() } else { w };
                let s = Tensor::<1>::from_data(TensorData::new(s0.clone(), [blocks]), &device).require_grad();
                let b = Tensor::<1>::from_data(TensorData::new(b0.clone(), [ws[0]]), &device).require_grad();
                let bias = with_bias.then(|| b.clone());
                let y: Tensor<1> = match layer {
                    Layer::Conv { stride, padding } => {
                        let (x4, w4) = (
                            x.clone().reshape([xs[0], xs[1], xs[2], xs[3]]),
                            w.clone().reshape([ws[0], ws[1], ws[2], ws[3]]),
                        );
                        let y = if fused {
                            quantized_layer(x4, w4, s.clone(), bias, layer, Arc::new(format.clone()))
                        } else {
                            let wq = fake_quantize(
                                w.clone().reshape([blocks, n_w / blocks]),
                                &format,
                                s.clone().reshape([blocks, 1]),
                                None,
                            );
                            crate::kernels::conv::conv2d(
                                x4,
                                wq.reshape([ws[0], ws[1], ws[2], ws[3]]),
                                bias,
                                stride,
                                padding,
                            )
                        };
                        y.flatten(0, 3)
                    }
                    Layer::Linear => {
                        let x2 = x.clone().reshape([n_x / ws[1], ws[1]]);
                        let y = if fused {
                            quantized_layer(
                                x2,
                                w.clone().reshape([ws[0], ws[1]]),
                                s.clone(),
                                bias,
                                layer,
                                Arc::new(format.clone()),
                            )
                        } else {
                            let wq = fake_quantize(
                                w.clone().reshape([blocks, n_w / blocks]),
                                &format,
                                s.clone().reshape([blocks, 1]),
                                None,
                            );
                            crate::kernels::linear::linear(x2, wq.reshape([ws[0], ws[1]]), bias)
                        };
                        y.flatten(0, 1)
                    }
                };
                let up = Tensor::<1>::from_data(
                    TensorData::new(SeededRng::new(5).normals(y.dims()[0]), y.dims()),
                    &device,
                );
                let grads = (y.clone() * up).sum().backward();
                let grad = |t: &Tensor<1>| t.grad(&grads).map(host_values);
                (
                    host_values(y),
                    grad(&x),
                    grad(&s),
                    with_bias.then(|| grad(&b)).flatten(),
                    tracked.then(|| grad(&w)).flatten(),
                )
            };
            let (f, c) = (run(true), run(false));
            let what = format!("{layer:?} x {xs:?} w {ws:?} group {group}");
            assert_eq!(f.0, c.0, "{what}: output");
            assert_eq!(f.1, c.1, "{what}: input gradient");
            assert_eq!(f.2, c.2, "{what}: scale gradient");
            assert!(
                f.2.as_ref().is_some_and(|g| g.iter().any(|v| *v != 0.0)),
                "{what}: scale gradient is zero"
            );
            assert_eq!(f.3, c.3, "{what}: bias gradient");
            assert_eq!(f.4, c.4, "{what}: weight gradient");
            assert_eq!(f.4.is_some(), tracked, "{what}: weight gradient present");
        }
    }
}
