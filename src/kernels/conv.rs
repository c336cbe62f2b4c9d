//! 2-D convolution (NCHW, square kernel, one group, no dilation: every conv the models have)
//! on flex as matrix products, in two ways:
//!
//! - unfolded (any geometry): `y_b[o, :] = W[o, K] col_b[K, :] + bias[o]`, written straight into
//!   the output, `col_b` the unfolded input of sample `b` (`K = c_in k k` rows, one per input
//!   channel and kernel tap; a 1x1 convolution uses the input itself); input gradient
//!   `dx_b = fold(W^T dy_b)`; weight gradient `dW = sum_b dy_b col_b^T` (burn computes it as a
//!   convolution with the gradient map as kernel, a badly shaped product), bias `sum_b dy_b 1`;
//! - on a bordered grid (stride-1 "same" convolutions, where it is faster: see [`Shifted`]):
//!   the maps laid once with a zero border, each kernel tap a product that reads them shifted in
//!   place, so neither the nine-fold unfolded copy nor the gemm's repacking of it is made.
//!
//! The unfolded input is built a tile of whole output rows at a time (at most ~8 MB), so the
//! memory stays bounded at SD's sizes. Tiles of the forward and samples of the input gradient
//! run in parallel; the weight gradient is summed over a fixed split of the tiles or samples
//! (set by the shapes alone) and the parts are added in order, so results do not depend on the
//! thread count. Which path runs is set by the shapes alone too.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;
use burn::tensor::ops::ConvOptions;
use rayon::prelude::*;

use super::gemm::{Mat, SendPtr, inner_threads, matmul};
use super::host::{recycle, scratch, tensor, values, zeros};
use super::record;

/// The shapes of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub h_out: usize,
    pub w_out: usize,
    /// Output rows per tile of unfolded input (about [`TILE_BYTES`] of it).
    pub tile_rows: usize,
}

/// Bytes of unfolded input per tile (a few MB: in cache-sized pieces, bounded at any size).
const TILE_BYTES: usize = 8 << 20;
/// Bytes of weight-gradient partial sums the backward may hold at once.
const PARTIAL_BYTES: usize = 64 << 20;
/// The most parts the weight gradient is split into.
const MAX_PARTS: usize = 8;

impl ConvGeometry {
    pub fn new(x: &[usize], weight: &[usize], stride: usize, padding: usize) -> Self {
        let (h, w, k) = (x[2], x[3], weight[2]);
        let mut g = Self {
            batch: x[0],
            c_in: x[1],
            h,
            w,
            c_out: weight[0],
            kernel: k,
            stride,
            padding,
            h_out: (h + 2 * padding - k) / stride + 1,
            w_out: (w + 2 * padding - k) / stride + 1,
            tile_rows: 1,
        };
        g.tile_rows = (TILE_BYTES / (4 * g.rows() * g.w_out).max(1)).clamp(1, g.h_out);
        g
    }

    /// Rows of the unfolded input: one per input channel and kernel tap.
    fn rows(&self) -> usize {
        self.c_in * self.kernel * self.kernel
    }

    /// Output positions per sample.
    fn positions(&self) -> usize {
        self.h_out * self.w_out
    }

    /// A 1x1 convolution with stride 1 and no padding: the input is its own unfolding.
    fn pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    /// Stride 1 with the output as large as the input (3x3 with padding 1, 1x1, 5x5 with 2).
    fn same(&self) -> bool {
        self.stride == 1 && self.w_out == self.w && self.h_out == self.h
    }

    /// Whether [`weight_grad`] takes [`weight_grad_shifted`] for these shapes.
    pub fn shifted_weight_grad(&self) -> bool {
        Shifted::pays(self)
    }

    /// Whether [`forward`] and [`input_grad`] run on the [`Shifted`] grid for these shapes.
    pub fn on_grid(&self) -> bool {
        Shifted::pays_on_grid(self)
    }

    /// The work items `(sample, first output row, rows)`, in order.
    fn tiles(&self) -> Vec<(usize, usize, usize)> {
        let t = self.tile_rows;
        (0..self.batch)
            .flat_map(|b| (0..self.h_out).step_by(t).map(move |r| (b, r, t.min(self.h_out - r))))
            .collect()
    }
}

/// The unfolded input of one tile: `col[r * ld + (oh - oh0) * w_out + ow]` for
/// `r = (c, kh, kw)`, `x_b` one sample `[c_in, h, w]`.
fn unfold(g: &ConvGeometry, x_b: &[f32], oh0: usize, rows: usize, col: &mut [f32], ld: usize) {
    if g.same() {
        return unfold_same(g, x_b, oh0, rows, col, ld);
    }
    let (k, s, p, wo) = (g.kernel, g.stride, g.padding as isize, g.w_out);
    let width = rows * wo;
    for (r, dst) in col.chunks_mut(ld).enumerate().take(g.rows()) {
        let dst = &mut dst[..width];
        let (c, kh, kw) = (r / (k * k), (r / k) % k, r % k);
        let plane = &x_b[c * g.h * g.w..(c + 1) * g.h * g.w];
        for (i, out) in dst.chunks_mut(wo).enumerate() {
            let ih = ((oh0 + i) * s) as isize + kh as isize - p;
            if ih < 0 || ih >= g.h as isize {
                out.fill(0.0);
                continue;
            }
            let row = &plane[ih as usize * g.w..(ih as usize + 1) * g.w];
            let (lo, hi) = valid_range(g, kw);
            out[..lo].fill(0.0);
            out[hi.max(lo)..].fill(0.0);
            if s == 1 {
                let start = (lo as isize + kw as isize - p) as usize;
                if hi > lo {
                    out[lo..hi].copy_from_slice(&row[start..start + hi - lo]);
                }
            } else {
                for (ow, o) in out.iter_mut().enumerate().take(hi).skip(lo) {
                    *o = row[((ow * s) as isize + kw as isize - p) as usize];
                }
            }
        }
    }
}

/// The output columns `ow` whose input column `ow * stride + kw - padding` is inside the image.
fn valid_range(g: &ConvGeometry, kw: usize) -> (usize, usize) {
    let (s, p) = (g.stride as isize, g.padding as isize);
    let first = (p - kw as isize).max(0);
    let lo = ((first + s - 1) / s) as usize;
    // iw < w  <=>  ow * s < w + p - kw
    let bound = g.w as isize + p - kw as isize;
    let hi = if bound <= 0 { 0 } else { ((bound + s - 1) / s) as usize };
    (lo.min(g.w_out), hi.min(g.w_out))
}

/// For a "same" convolution (stride 1, output as wide as the input) the row of kernel tap
/// `(c, kh, kw)` is channel `c`'s plane shifted by `(kh - p) w + (kw - p)` elements: the valid
/// output rows are one contiguous copy, and only the `|kw - p|` columns at one edge of each row
/// (which read the neighbouring image row) are cleared afterwards. Per-row copies of a 32-wide
/// image spent more time on bookkeeping than on copying.
fn unfold_same(g: &ConvGeometry, x_b: &[f32], oh0: usize, rows: usize, col: &mut [f32], ld: usize) {
    let (taps, plane_len, width) = (g.kernel * g.kernel, g.h * g.w, rows * g.w);
    for (t, tap) in SameTap::all(g, oh0, rows).enumerate() {
        for c in 0..g.c_in {
            let r = c * taps + t;
            let dst = &mut col[r * ld..r * ld + width];
            dst[..tap.block.start].fill(0.0);
            dst[tap.block.end..].fill(0.0);
            if tap.block.is_empty() {
                continue;
            }
            let plane = &x_b[c * plane_len..(c + 1) * plane_len];
            let out = &mut dst[tap.block.clone()];
            out[tap.skip..tap.skip + tap.plane.len()].copy_from_slice(&plane[tap.plane.clone()]);
            clear_edges(out, g.w, tap.shift);
        }
    }
}

/// Where kernel tap `(kh, kw)` of a "same" convolution meets each channel's plane for the tile
/// of output rows `[oh0, oh0 + rows)`: the tap's row of the unfolded tile is zero outside
/// `block` (output rows whose input row is outside the image); inside it, element `skip + i`
/// is plane element `plane.start + i`, shifted by `shift` columns (the plane's ends clipped:
/// those positions are edge columns, which [`clear_edges`] handles). The same for every input
/// channel, so computed once per tap and tile.
struct SameTap {
    block: std::ops::Range<usize>,
    shift: isize,
    plane: std::ops::Range<usize>,
    skip: usize,
}

impl SameTap {
    /// The `k * k` taps in the unfolded rows' order (`kh` major).
    fn all(g: &ConvGeometry, oh0: usize, rows: usize) -> impl Iterator<Item = Self> + '_ {
        let k = g.kernel;
        (0..k).flat_map(move |kh| (0..k).map(move |kw| Self::new(g, oh0, rows, kh, kw)))
    }

    fn new(g: &ConvGeometry, oh0: usize, rows: usize, kh: usize, kw: usize) -> Self {
        let (w, p) = (g.w, g.padding);
        // Output rows whose input row oh + kh - p is inside the image (stride 1).
        let first = oh0.max(p.saturating_sub(kh));
        let last = (oh0 + rows).min((g.h + p).saturating_sub(kh)).max(first);
        let shift = kw as isize - p as isize;
        let lo = ((first + kh) as isize - p as isize) * w as isize + shift;
        let hi = lo + ((last - first) * w) as isize;
        let (clo, chi) = (lo.max(0), hi.min((g.h * w) as isize).max(lo.max(0)));
        Self {
            block: (first - oh0) * w..(last - oh0) * w,
            shift,
            plane: clo as usize..chi as usize,
            skip: (clo - lo) as usize,
        }
    }
}

/// Zeroes, in each row of `w` elements, the `|shift|` columns that a shift by `shift` elements
/// brings in from the neighbouring row (or from outside the plane). A 3x3 kernel clears one
/// column per row: written as single stores, since a `fill` per row became a `memset` call per
/// row (5% of the tiny UNet's forward).
fn clear_edges(rows: &mut [f32], w: usize, shift: isize) {
    let d = shift.unsigned_abs().min(w);
    let first = if shift > 0 { w - d } else { 0 };
    match d {
        0 => {}
        1 => (first..rows.len()).step_by(w).for_each(|i| rows[i] = 0.0),
        _ => rows.chunks_mut(w).for_each(|row| row[first..first + d].fill(0.0)),
    }
}

/// [`fold`] for a "same" convolution: the transpose of [`unfold_same`] (edge columns of the
/// scratch `col` cleared, then one contiguous add per kernel tap).
fn fold_same(g: &ConvGeometry, col: &mut [f32], oh0: usize, rows: usize, dx_b: &mut [f32]) {
    let (taps, plane_len, width) = (g.kernel * g.kernel, g.h * g.w, rows * g.w);
    // Each channel's gradient only takes its own rows, in tap order as before: the same sums.
    for (t, tap) in SameTap::all(g, oh0, rows).enumerate() {
        if tap.block.is_empty() {
            continue;
        }
        for c in 0..g.c_in {
            let r = c * taps + t;
            let plane = &mut dx_b[c * plane_len..(c + 1) * plane_len];
            let inp = &mut col[r * width..(r + 1) * width][tap.block.clone()];
            clear_edges(inp, g.w, tap.shift);
            let add = &inp[tap.skip..tap.skip + tap.plane.len()];
            for (d, v) in plane[tap.plane.clone()].iter_mut().zip(add) {
                *d += v;
            }
        }
    }
}

/// Adds the tile's unfolded gradient `col` back onto the sample's input gradient `dx_b` (the
/// transpose of [`unfold`]).
fn fold(g: &ConvGeometry, col: &mut [f32], oh0: usize, rows: usize, dx_b: &mut [f32]) {
    if g.same() {
        return fold_same(g, col, oh0, rows, dx_b);
    }
    let (k, s, p, wo) = (g.kernel, g.stride, g.padding as isize, g.w_out);
    let width = rows * wo;
    for (r, src) in col.chunks(width).enumerate().take(g.rows()) {
        let (c, kh, kw) = (r / (k * k), (r / k) % k, r % k);
        let plane = &mut dx_b[c * g.h * g.w..(c + 1) * g.h * g.w];
        let (lo, hi) = valid_range(g, kw);
        for (i, inp) in src.chunks(wo).enumerate() {
            let ih = ((oh0 + i) * s) as isize + kh as isize - p;
            if ih < 0 || ih >= g.h as isize || hi <= lo {
                continue;
            }
            let row = &mut plane[ih as usize * g.w..(ih as usize + 1) * g.w];
            if s == 1 {
                let start = (lo as isize + kw as isize - p) as usize;
                for (d, v) in row[start..start + hi - lo].iter_mut().zip(&inp[lo..hi]) {
                    *d += v;
                }
            } else {
                for ow in lo..hi {
                    row[((ow * s) as isize + kw as isize - p) as usize] += inp[ow];
                }
            }
        }
    }
}

/// A tile's input as a matrix `[c_in k k, rows w_out]`, returned with its row stride: the
/// unfolded tile, or for a 1x1 convolution the input's own rows (`x_b` at the tile's first
/// position, row stride the image size).
///
/// `across`: the product reads the matrix across its rows (the weight gradient's `col^T`). gemm
/// then gathers one element per row, and rows a multiple of 512 bytes apart (a 32x32 map is 4 KB)
/// all fall into the same few cache sets: the weight gradient of the tiny UNet's 32x32 layers
/// ran 3-4x slower per flop than at 16x16. Such rows are laid `padded` apart instead.
fn tile_input<'a>(
    g: &ConvGeometry,
    x_b: &'a [f32],
    oh0: usize,
    rows: usize,
    col: &'a mut Vec<f32>,
    across: bool,
) -> (&'a [f32], usize) {
    let width = rows * g.w_out;
    if g.pointwise() && !(across && aliased(g.positions())) {
        return (&x_b[oh0 * g.w_out..], g.positions());
    }
    let ld = if across { padded(width) } else { width };
    col.resize(g.rows() * ld, 0.0);
    if g.pointwise() {
        let n = g.positions();
        for (r, dst) in col.chunks_mut(ld).enumerate() {
            dst[..width].copy_from_slice(&x_b[r * n + oh0 * g.w_out..][..width]);
        }
    } else {
        unfold(g, x_b, oh0, rows, col, ld);
    }
    (col.as_slice(), ld)
}

/// Whether rows `ld` floats apart share few cache sets (a multiple of 512 bytes).
fn aliased(ld: usize) -> bool {
    ld.is_multiple_of(128)
}

/// A row stride of at least `width` floats that is an odd number of 64-byte lines.
fn padded(width: usize) -> usize {
    let ld = width.div_ceil(16) * 16;
    if (ld / 16).is_multiple_of(2) { ld + 16 } else { ld }
}

/// `y = conv(x, W) + bias`.
pub fn forward(g: &ConvGeometry, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    if g.on_grid() { forward_grid(g, x, w, bias) } else { forward_unfolded(g, x, w, bias) }
}

/// [`forward`] through the unfolded input, for any geometry.
pub fn forward_unfolded(g: &ConvGeometry, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (n, kk, co) = (g.positions(), g.rows(), g.c_out);
    let mut y = zeros(g.batch * co * n);
    if let Some(bias) = bias {
        y.par_chunks_mut(n).enumerate().for_each(|(i, row)| row.fill(bias[i % co]));
    }
    let tiles = g.tiles();
    let threads = inner_threads(tiles.len());
    let out = SendPtr(y.as_mut_ptr());
    let sample_len = g.c_in * g.h * g.w;
    tiles.par_iter().for_each_init(Vec::new, |col, &(b, oh0, rows)| {
        let x_b = &x[b * sample_len..(b + 1) * sample_len];
        let (rhs, rs) = tile_input(g, x_b, oh0, rows, col, false);
        // Moves the whole `SendPtr` into the closure (a closure would capture only its field).
        #[allow(clippy::redundant_locals)]
        let out = out;
        // SAFETY: the tile's block of y (c_out rows of rows * w_out at row stride n) belongs to
        // this tile alone; the operands are the slices just built or borrowed.
        unsafe {
            let dst = out.0.add(b * co * n + oh0 * g.w_out);
            let lhs = Mat { ptr: w.as_ptr(), rs: kk as isize, cs: 1 };
            let rhs = Mat { ptr: rhs.as_ptr(), rs: rs as isize, cs: 1 };
            matmul(co, rows * g.w_out, kk, dst, n, true, lhs, rhs, 1.0, threads);
        }
    });
    y
}

/// `dx = conv^T(dy, W)`.
pub fn input_grad(g: &ConvGeometry, dy: &[f32], w: &[f32]) -> Vec<f32> {
    if g.on_grid() { input_grad_grid(g, dy, w) } else { input_grad_unfolded(g, dy, w) }
}

/// [`input_grad`] as `fold(W^T dy)`, one sample per parallel item, for any geometry.
pub fn input_grad_unfolded(g: &ConvGeometry, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let (n, kk, co) = (g.positions(), g.rows(), g.c_out);
    let sample_len = g.c_in * g.h * g.w;
    let mut dx = zeros(g.batch * sample_len);
    let threads = inner_threads(g.batch);
    let t = g.tile_rows;
    let wt = Mat { ptr: w.as_ptr(), rs: 1, cs: kk as isize };
    // The scratch `col` lives per worker, not per sample: growing it zero-fills, reusing it
    // does not (the product overwrites it).
    dx.par_chunks_mut(sample_len).enumerate().for_each_init(Vec::new, |col, (b, dx_b)| {
        let dy_b = &dy[b * co * n..(b + 1) * co * n];
        for oh0 in (0..g.h_out).step_by(t) {
            let rows = t.min(g.h_out - oh0);
            let width = rows * g.w_out;
            let rhs = Mat { ptr: dy_b[oh0 * g.w_out..].as_ptr(), rs: n as isize, cs: 1 };
            // SAFETY: dst is this sample's own gradient (1x1) or this item's own buffer.
            unsafe {
                if g.pointwise() {
                    matmul(
                        kk,
                        width,
                        co,
                        dx_b[oh0 * g.w_out..].as_mut_ptr(),
                        n,
                        false,
                        wt,
                        rhs,
                        1.0,
                        threads,
                    );
                } else {
                    col.resize(kk * width, 0.0);
                    matmul(kk, width, co, col.as_mut_ptr(), width, false, wt, rhs, 1.0, threads);
                    fold(g, col, oh0, rows, dx_b);
                }
            }
        }
    });
    dx
}

/// `(dW, dbias) = (sum_b dy_b col_b^T, sum_b dy_b 1)`, summed over a fixed split of the tiles.
pub fn weight_grad(g: &ConvGeometry, dy: &[f32], x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    if g.shifted_weight_grad() { weight_grad_shifted(g, dy, x) } else { weight_grad_unfolded(g, dy, x) }
}

/// [`weight_grad`] through the unfolded input, for any geometry.
pub fn weight_grad_unfolded(g: &ConvGeometry, dy: &[f32], x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (n, kk, co) = (g.positions(), g.rows(), g.c_out);
    let tiles = g.tiles();
    let parts = tiles.len().min(MAX_PARTS).min((PARTIAL_BYTES / (4 * co * kk)).max(1));
    let per_part = tiles.len().div_ceil(parts);
    let threads = inner_threads(parts);
    let sample_len = g.c_in * g.h * g.w;
    let partials: Vec<(Vec<f32>, Vec<f32>)> = tiles
        .par_chunks(per_part)
        .map(|part| {
            let (mut dw, mut db) = (zeros(co * kk), vec![0.0f32; co]);
            let mut col = Vec::new();
            for &(b, oh0, rows) in part {
                let x_b = &x[b * sample_len..(b + 1) * sample_len];
                let (input, rs) = tile_input(g, x_b, oh0, rows, &mut col, true);
                let width = rows * g.w_out;
                let dy_tile = &dy[b * co * n + oh0 * g.w_out..];
                for (o, d) in db.iter_mut().enumerate() {
                    *d += dy_tile[o * n..o * n + width].iter().sum::<f32>();
                }
                // SAFETY: dw is this part's own buffer; the operands are live slices.
                unsafe {
                    let lhs = Mat { ptr: dy_tile.as_ptr(), rs: n as isize, cs: 1 };
                    let rhs = Mat { ptr: input.as_ptr(), rs: 1, cs: rs as isize };
                    matmul(co, kk, width, dw.as_mut_ptr(), kk, true, lhs, rhs, 1.0, threads);
                }
            }
            (dw, db)
        })
        .collect();
    sum_in_order(partials)
}

/// The weight and bias gradients' partial sums added in the parts' order (fixed by the shapes,
/// so the result does not depend on the thread count).
fn sum_in_order(partials: Vec<(Vec<f32>, Vec<f32>)>) -> (Vec<f32>, Vec<f32>) {
    let mut parts = partials.into_iter();
    let (mut dw, mut db) = parts.next().expect("at least one part");
    for (pw, pb) in parts {
        dw.iter_mut().zip(&pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(&pb).for_each(|(a, b)| *a += b);
        recycle(pw);
    }
    (dw, db)
}

/// Bytes of one sample's bordered maps (per parallel item) up to which a "same" convolution may
/// run on the grid; larger maps unfold a tile at a time, which keeps the memory bounded.
const SHIFTED_BYTES: usize = 32 << 20;

/// A "same" convolution's maps on a grid `wp = w + k - 1` columns wide (laid channel- or
/// positions-major), the input with a zero border of `p` on every side: output position `q = oh wp + ow` meets kernel
/// tap `(kh, kw)` at grid position `q + kh wp + kw` (`ow >= w` are the border columns, where the
/// output gradient is zero).
struct Shifted {
    wp: usize,
    /// Output positions on the grid: `h wp`.
    positions: usize,
    /// Grid positions of the bordered input, with the last taps' overrun.
    grid: usize,
}

impl Shifted {
    fn new(g: &ConvGeometry) -> Self {
        let (k, wp) = (g.kernel, g.w + g.kernel - 1);
        Self { wp, positions: g.h * wp, grid: (g.h + k - 1) * wp + k - 1 }
    }

    /// Whether [`weight_grad_shifted`] beats [`weight_grad_unfolded`] (`cargo bench --bench
    /// conv_paths`, the tiny UNet's and SD's shapes, one thread): a "same" convolution with at least 8
    /// channels in and out (fewer make products too thin to keep the vector unit busy), whose
    /// per-sample product is at least as deep as it has rows per tap (`positions >= c_in`; else
    /// reading and writing the partial sums per sample dominates: SD's 640- and 1280-channel
    /// layers at 16x16 and 8x8 ran 1.4-1.5x and 2.5-4x slower), and whose bordered input stays within
    /// [`SHIFTED_BYTES`].
    fn pays(g: &ConvGeometry) -> bool {
        if !g.same() || g.kernel == 1 || g.c_in < 8 || g.c_out < 8 {
            return false;
        }
        let s = Self::new(g);
        s.positions >= g.c_in && 4 * g.c_in * s.grid <= SHIFTED_BYTES
    }

    /// Whether [`forward_grid`] and [`input_grad_grid`] beat the unfolded paths (`cargo bench
    /// --bench conv_paths`): a "same" convolution wider than 1x1 with at least 8 input channels
    /// on maps of at least 32 grid positions per channel (the tiny UNet's 32x32 layers: 0.51-0.90x
    /// the unfolded time). Per tap the product is only `c_in` deep and rewrites its output:
    /// fewer positions per channel (16x16 and 8x8 maps, SD's deeper layers) ran up to 5.7x slower.
    fn pays_on_grid(g: &ConvGeometry) -> bool {
        let s = Self::new(g);
        g.same()
            && g.kernel > 1
            && g.c_in >= 8
            && s.positions >= 32 * g.c_in.max(g.c_out)
            && 4 * g.c_in.max(g.c_out) * s.grid <= SHIFTED_BYTES
    }
}

super::simd_kernel! {
    /// `dst[(first + i stride + j) ch + c] = src[c h w + i w + j]`: channel-major maps
    /// `[ch, h, w]` laid positions-major, row `i` of the maps at grid position
    /// `first + i stride`, through 16x16 tiles (one cache line per position and channel block).
    fn positions_major(src: &[f32], ch: usize, h: usize, w: usize, dst: &mut [f32], first: usize, stride: usize)
        = positions_major_body;
}

fn positions_major_body(
    src: &[f32],
    ch: usize,
    h: usize,
    w: usize,
    dst: &mut [f32],
    first: usize,
    stride: usize,
) {
    let plane = h * w;
    let mut tile = [[0f32; 16]; 16];
    for c0 in (0..ch).step_by(16) {
        let nc = (ch - c0).min(16);
        for i in 0..h {
            for j0 in (0..w).step_by(16) {
                let nj = (w - j0).min(16);
                for (c, row) in tile.iter_mut().enumerate().take(nc) {
                    row[..nj].copy_from_slice(&src[(c0 + c) * plane + i * w + j0..][..nj]);
                }
                for j in 0..nj {
                    let at = (first + i * stride + j0 + j) * ch + c0;
                    for (d, row) in dst[at..at + nc].iter_mut().zip(&tile) {
                        *d = row[j];
                    }
                }
            }
        }
    }
}

/// The weight gradient of a "same" convolution without unfolding the input. On the
/// [`Shifted`] grid, for one kernel row `kh` the taps' rows `(kw, c)` are consecutive floats of
/// the input at grid position `q + kh wp`, so `dW[kh] = sum_q xt[q + kh wp, (kw, c)] dyt[q, o]`
/// is one product whose operands are both read along their contiguous dimension. (`dy col^T`
/// reads the unfolded input across its rows: gemm's packing of it, and the nine copies of the
/// input, took more time than the arithmetic.) Summed per sample over a fixed split of the
/// batch; the parts are added in order.
pub fn weight_grad_shifted(g: &ConvGeometry, dy: &[f32], x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (k, ci, co, n) = (g.kernel, g.c_in, g.c_out, g.positions());
    let grid = Shifted::new(g);
    let (kk, block) = (g.rows(), k * ci * co);
    let parts = g.batch.min(MAX_PARTS).min((PARTIAL_BYTES / (4 * co * kk)).max(1));
    let samples: Vec<usize> = (0..g.batch).collect();
    let threads = inner_threads(parts);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = samples
        .par_chunks(g.batch.div_ceil(parts))
        .map(|part| {
            // dw laid [kh][kw][c][o]; the borders of xt and dyt stay zero.
            let (mut dw, mut db) = (zeros(kk * co), vec![0.0f32; co]);
            let mut xt = zeros(grid.grid * ci);
            let mut dyt = zeros(grid.positions * co);
            for &b in part {
                let (x_b, dy_b) = (&x[b * ci * n..(b + 1) * ci * n], &dy[b * co * n..(b + 1) * co * n]);
                positions_major(x_b, ci, g.h, g.w, &mut xt, g.padding * (grid.wp + 1), grid.wp);
                positions_major(dy_b, co, g.h, g.w, &mut dyt, 0, grid.wp);
                for (o, d) in db.iter_mut().enumerate() {
                    *d += dy_b[o * n..(o + 1) * n].iter().sum::<f32>();
                }
                for kh in 0..k {
                    // SAFETY: dw is this part's own buffer; the largest grid position read,
                    // (h wp - 1) + kh wp + (k - 1), is inside xt.
                    unsafe {
                        let lhs = Mat { ptr: xt.as_ptr().add(kh * grid.wp * ci), rs: 1, cs: ci as isize };
                        let rhs = Mat { ptr: dyt.as_ptr(), rs: co as isize, cs: 1 };
                        let dst = dw.as_mut_ptr().add(kh * block);
                        matmul(k * ci, co, grid.positions, dst, co, true, lhs, rhs, 1.0, threads);
                    }
                }
            }
            (dw, db)
        })
        .collect();
    let (sum, db) = sum_in_order(partials);
    // [kh][kw][c][o] -> [o][c][kh][kw]: every element written.
    let mut dw = scratch(co * kk);
    for (t, taps) in sum.chunks(ci * co).enumerate() {
        for (c, row) in taps.chunks(co).enumerate() {
            for (o, v) in row.iter().enumerate() {
                dw[o * kk + c * k * k + t] = *v;
            }
        }
    }
    recycle(sum);
    (dw, db)
}

/// A "same" convolution on the [`Shifted`] grid: `out[o, q] = sum_t M_t[o, :] in[:, q + shift_t]`
/// for grid positions `q`, `in` the maps laid channel-major with the zero border. Each tap is one
/// product reading the bordered maps in place (no unfolded copy: rows `grid` apart, positions
/// contiguous, as gemm reads its operands without repacking them); the border columns of `out`
/// are dropped when it is laid back `[n_out, h, w]`, `bias` added there. One sample per
/// parallel item; `mats` is `[taps, n_out, n_in]`.
fn grid_conv(
    g: &ConvGeometry,
    input: &[f32],
    n_in: usize,
    mats: &[f32],
    n_out: usize,
    shifts: &[usize],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let grid = Shifted::new(g);
    let (w, plane) = (g.w, g.h * g.w);
    let first = g.padding * (grid.wp + 1);
    let mut out = zeros(g.batch * n_out * plane);
    let threads = inner_threads(g.batch);
    out.par_chunks_mut(n_out * plane).enumerate().for_each_init(
        || (vec![0.0f32; n_in * grid.grid], Vec::new()),
        |(padded, acc), (b, out_b)| {
            // The border of `padded` is never written: it stays zero.
            let in_b = &input[b * n_in * plane..(b + 1) * n_in * plane];
            for (src, dst) in in_b.chunks(plane).zip(padded.chunks_mut(grid.grid)) {
                for (row, line) in src.chunks(w).enumerate() {
                    dst[first + row * grid.wp..][..w].copy_from_slice(line);
                }
            }
            acc.resize(n_out * grid.positions, 0.0);
            for (t, &shift) in shifts.iter().enumerate() {
                // SAFETY: acc is this item's own buffer; the largest position read,
                // shift + h wp - 1, is inside each channel's bordered map.
                unsafe {
                    let lhs = Mat { ptr: mats[t * n_out * n_in..].as_ptr(), rs: n_in as isize, cs: 1 };
                    let rhs = Mat { ptr: padded.as_ptr().add(shift), rs: grid.grid as isize, cs: 1 };
                    let dst = acc.as_mut_ptr();
                    matmul(n_out, grid.positions, n_in, dst, grid.positions, t > 0, lhs, rhs, 1.0, threads);
                }
            }
            for (o, (dst, src)) in out_b.chunks_mut(plane).zip(acc.chunks(grid.positions)).enumerate() {
                let bias_o = bias.map_or(0.0, |b| b[o]);
                for (line, row) in dst.chunks_mut(w).zip(src.chunks(grid.wp)) {
                    for (d, v) in line.iter_mut().zip(&row[..w]) {
                        *d = v + bias_o;
                    }
                }
            }
        },
    );
    out
}

/// [`forward`] of a "same" convolution on the grid: tap `(kh, kw)` reads grid position
/// `q + kh wp + kw` with the weights `W[:, :, kh, kw]`.
pub fn forward_grid(g: &ConvGeometry, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    grid_taps(g, x, w, false, bias)
}

/// [`input_grad`] of a "same" convolution on the grid: the output gradient, bordered, meets
/// `W[:, :, kh, kw]^T` at grid position `q + (k - 1 - kh) wp + (k - 1 - kw)`.
pub fn input_grad_grid(g: &ConvGeometry, dy: &[f32], w: &[f32]) -> Vec<f32> {
    grid_taps(g, dy, w, true, None)
}

/// [`grid_conv`] with the kernel taps of `W` (`[c_out, c_in, k, k]`): as they are, or
/// `transposed` and mirrored (the convolution's transpose, for the input gradient).
fn grid_taps(g: &ConvGeometry, input: &[f32], w: &[f32], transposed: bool, bias: Option<&[f32]>) -> Vec<f32> {
    let (k, ci, co) = (g.kernel, g.c_in, g.c_out);
    let wp = Shifted::new(g).wp;
    let taps = k * k;
    let (n_in, n_out) = if transposed { (co, ci) } else { (ci, co) };
    let mut mats = vec![0.0f32; taps * co * ci];
    for (i, v) in w.iter().enumerate() {
        let (o, c, t) = (i / (ci * taps), (i / taps) % ci, i % taps);
        let (row, col) = if transposed { (c, o) } else { (o, c) };
        mats[(t * n_out + row) * n_in + col] = *v;
    }
    let shifts: Vec<usize> = (0..taps)
        .map(|t| {
            let (kh, kw) = (t / k, t % k);
            if transposed { (k - 1 - kh) * wp + (k - 1 - kw) } else { kh * wp + kw }
        })
        .collect();
    grid_conv(g, input, n_in, &mats, n_out, &shifts, bias)
}

fn geometry(x: &FlexTensor, w: &FlexTensor, stride: usize, padding: usize) -> ConvGeometry {
    ConvGeometry::new(&x.layout().shape().to_vec(), &w.layout().shape().to_vec(), stride, padding)
}

fn conv_forward(
    x: &FlexTensor,
    w: &FlexTensor,
    bias: Option<&FlexTensor>,
    stride: usize,
    padding: usize,
) -> FlexTensor {
    let g = geometry(x, w, stride, padding);
    let bias = bias.map(values);
    let y = forward(&g, &values(x), &values(w), bias.as_deref());
    tensor(y, &[g.batch, g.c_out, g.h_out, g.w_out])
}

#[backend_extension(Autodiff, Flex)]
pub trait ConvBackend: Backend {
    /// `conv2d(x, weight) + bias` with a square kernel, symmetric padding, one group.
    fn fused_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;

    /// The same without bias.
    fn fused_conv2d_no_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self>;
}

impl ConvBackend for Flex {
    fn fused_conv2d(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        stride: usize,
        padding: usize,
    ) -> FlexTensor {
        conv_forward(&x, &weight, Some(&bias), stride, padding)
    }

    fn fused_conv2d_no_bias(x: FlexTensor, weight: FlexTensor, stride: usize, padding: usize) -> FlexTensor {
        conv_forward(&x, &weight, None, stride, padding)
    }
}

/// Parents `[x, weight]` or `[x, weight, bias]`.
#[derive(Debug)]
struct ConvBackward<const N: usize> {
    stride: usize,
    padding: usize,
}

impl<const N: usize> Backward<Flex, N> for ConvBackward<N> {
    /// The input and the weight.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, w) = &ops.state;
        let g = geometry(x, w, self.stride, self.padding);
        let dy = values(&grad);
        let parents = ops.parents;
        if let Some(node) = &parents[0] {
            let dx = input_grad(&g, &dy, &values(w));
            grads.register::<Flex>(node.id, tensor(dx, &[g.batch, g.c_in, g.h, g.w]));
        }
        let bias_node = if N == 3 { parents[N - 1].as_ref() } else { None };
        if parents[1].is_some() || bias_node.is_some() {
            let (dw, db) = weight_grad(&g, &dy, &values(x));
            if let Some(node) = &parents[1] {
                grads.register::<Flex>(node.id, tensor(dw, &[g.c_out, g.c_in, g.kernel, g.kernel]));
            }
            if let Some(node) = bias_node {
                grads.register::<Flex>(node.id, tensor(db, &[g.c_out]));
            }
        }
    }
}

impl<C: CheckpointStrategy> ConvBackend for Autodiff<Flex, C> {
    fn fused_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let (xp, wp) = (x.primitive().clone(), weight.primitive().clone());
        let out = conv_forward(&xp, &wp, Some(bias.primitive()), stride, padding);
        record!(ConvBackward::<3> { stride, padding }, [x.node(), weight.node(), bias.node()], (xp, wp), out)
    }

    fn fused_conv2d_no_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
    ) -> FloatTensor<Self> {
        let (xp, wp) = (x.primitive().clone(), weight.primitive().clone());
        let out = conv_forward(&xp, &wp, None, stride, padding);
        record!(ConvBackward::<2> { stride, padding }, [x.node(), weight.node()], (xp, wp), out)
    }
}

/// `conv2d(x, weight) + bias` with a square `[c_out, c_in, k, k]` kernel: the fused kernels on
/// flex, burn's `conv2d` elsewhere.
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    stride: usize,
    padding: usize,
) -> Tensor<4> {
    if !super::on_flex(&x.device()) {
        let options = ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1);
        return burn::tensor::module::conv2d(x, weight, bias, options);
    }
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(b) => <Dispatch as ConvBackend>::fused_conv2d(x, weight, b.into_dispatch(), stride, padding),
        None => <Dispatch as ConvBackend>::fused_conv2d_no_bias(x, weight, stride, padding),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::params::host_values;
    use crate::rng::SeededRng;
    use burn::tensor::{Device, TensorData};

    /// Values and all three gradients against burn's conv2d for every kind of convolution the
    /// models have (3x3 same, strided downsampling, 1x1, the DiT's patchify), odd sizes, with and
    /// without bias.
    #[test]
    fn fused_conv2d_matches_burns_conv2d() {
        let device = Device::flex().autodiff();
        let mut rng = SeededRng::new(21);
        // (batch, c_in, h, w, c_out, k, stride, padding, bias)
        let cases = [
            (2, 3, 9, 7, 5, 3, 1, 1, true),
            (3, 4, 8, 8, 6, 3, 2, 1, true),
            (2, 6, 5, 6, 4, 1, 1, 0, true),
            (2, 3, 8, 8, 7, 2, 2, 0, false),
            (1, 2, 7, 5, 3, 3, 1, 0, true),
            (2, 2, 6, 6, 3, 5, 1, 2, false),
            // Maps a multiple of 512 bytes wide: the weight gradient reads padded rows (1x1 too).
            (2, 3, 16, 16, 4, 1, 1, 0, true),
            (2, 2, 16, 8, 3, 3, 1, 1, false),
            // On the bordered grid: forward and input gradient (8 -> 4 at 16x16, 5x5 at 20x18),
            // weight gradient (both).
            (2, 8, 16, 16, 4, 3, 1, 1, true),
            (1, 8, 20, 18, 8, 5, 1, 2, false),
        ];
        for (b, ci, h, w, co, k, s, p, with_bias) in cases {
            let xs = rng.normals(b * ci * h * w);
            let ws = rng.normals(co * ci * k * k);
            let bs = rng.normals(co);
            let run = |fused: bool| {
                let x = Tensor::<4>::from_data(TensorData::new(xs.clone(), [b, ci, h, w]), &device)
                    .require_grad();
                let wt = Tensor::<4>::from_data(TensorData::new(ws.clone(), [co, ci, k, k]), &device)
                    .require_grad();
                let bias = Tensor::<1>::from_data(TensorData::new(bs.clone(), [co]), &device).require_grad();
                let bias_in = with_bias.then(|| bias.clone());
                let y = if fused {
                    conv2d(x.clone(), wt.clone(), bias_in, s, p)
                } else {
                    let options = ConvOptions::new([s; 2], [p; 2], [1, 1], 1);
                    burn::tensor::module::conv2d(x.clone(), wt.clone(), bias_in, options)
                };
                let up = Tensor::<4>::from_data(
                    TensorData::new(SeededRng::new(1).normals(y.dims().iter().product()), y.dims()),
                    &device,
                );
                let grads = (y.clone() * up).sum().backward();
                let db = with_bias.then(|| host_values(bias.grad(&grads).unwrap()));
                (
                    y.dims(),
                    host_values(y),
                    host_values(x.grad(&grads).unwrap()),
                    host_values(wt.grad(&grads).unwrap()),
                    db,
                )
            };
            let (f, t) = (run(true), run(false));
            let what = format!("b{b} c{ci}x{h}x{w} -> {co} k{k} s{s} p{p}");
            assert_eq!(f.0, t.0, "{what}: shape");
            for (name, a, r) in [("y", &f.1, &t.1), ("dx", &f.2, &t.2), ("dw", &f.3, &t.3)] {
                assert_eq!(a.len(), r.len(), "{what}: {name} length");
                for (i, (a, r)) in a.iter().zip(r.iter()).enumerate() {
                    assert!((a - r).abs() <= 1e-4 * (1.0 + r.abs()), "{what}: {name}[{i}] {a} vs {r}");
                }
            }
            if let (Some(a), Some(r)) = (&f.4, &t.4) {
                for (a, r) in a.iter().zip(r) {
                    assert!((a - r).abs() <= 1e-4 * (1.0 + r.abs()), "{what}: dbias {a} vs {r}");
                }
            }
        }
    }

    /// Tiles of a few output rows (as SD's large maps get) give the results of one tile per
    /// sample (the same forward bits; gradients up to summation order), for same, strided, 1x1
    /// and unpadded convolutions.
    #[test]
    fn fused_conv2d_tiles_add_up_to_the_whole() {
        let mut rng = SeededRng::new(6);
        // (c_in, c_out, k, stride, padding, h, w); 16x8 maps are read through padded rows.
        for (ci, co, k, s, p, h, w) in [
            (3, 4, 3, 1, 1, 11, 9),
            (3, 4, 3, 2, 1, 11, 9),
            (5, 2, 1, 1, 0, 11, 9),
            (2, 3, 3, 1, 0, 11, 9),
            (5, 2, 1, 1, 0, 16, 8),
        ] {
            let whole = ConvGeometry::new(&[2, ci, h, w], &[co, ci, k, k], s, p);
            let x = rng.normals(2 * ci * h * w);
            let w = rng.normals(co * ci * k * k);
            let dy = rng.normals(2 * co * whole.h_out * whole.w_out);
            let run = |g: &ConvGeometry| {
                (forward(g, &x, &w, None), input_grad(g, &dy, &w), weight_grad(g, &dy, &x))
            };
            let reference = run(&whole);
            for rows in [1, 2, 4] {
                let tiled = run(&ConvGeometry { tile_rows: rows, ..whole });
                assert_eq!(tiled.0, reference.0, "k{k} s{s}: forward, {rows}-row tiles");
                // The gradients add the same terms in another order.
                for (what, t, r) in
                    [("input", &tiled.1, &reference.1), ("weight", &tiled.2.0, &reference.2.0)]
                {
                    for (a, b) in t.iter().zip(r.iter()) {
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                            "k{k} s{s}: {what} gradient {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// The forward and input gradient on the bordered grid equal the unfolded ones (up to
    /// summation order) for 3x3 and 5x5 kernels on non-square maps, with and without bias, and
    /// `forward` / `input_grad` take them where they pay.
    #[test]
    fn grid_forward_and_input_grad_match_the_unfolded_ones() {
        let mut rng = SeededRng::new(10);
        // (batch, c_in, c_out, k, h, w)
        for (b, ci, co, k, h, w) in
            [(2, 8, 3, 3, 16, 18), (3, 9, 8, 3, 5, 7), (2, 8, 6, 5, 20, 13), (1, 1, 4, 3, 6, 6)]
        {
            let g = ConvGeometry::new(&[b, ci, h, w], &[co, ci, k, k], 1, k / 2);
            let x = rng.normals(b * ci * h * w);
            let wt = rng.normals(co * ci * k * k);
            let bias = rng.normals(co);
            let dy = rng.normals(b * co * h * w);
            for (what, grid, unfolded) in [
                (
                    "forward",
                    forward_grid(&g, &x, &wt, Some(&bias)),
                    forward_unfolded(&g, &x, &wt, Some(&bias)),
                ),
                (
                    "forward without bias",
                    forward_grid(&g, &x, &wt, None),
                    forward_unfolded(&g, &x, &wt, None),
                ),
                ("input gradient", input_grad_grid(&g, &dy, &wt), input_grad_unfolded(&g, &dy, &wt)),
            ] {
                assert_eq!(grid.len(), unfolded.len(), "{what}");
                for (i, (a, r)) in grid.iter().zip(&unfolded).enumerate() {
                    assert!(
                        (a - r).abs() <= 1e-5 * (1.0 + r.abs()),
                        "c{ci}->{co} k{k} {h}x{w}: {what}[{i}] {a} vs {r}"
                    );
                }
            }
            let wide = h * (w + k - 1) >= 32 * ci.max(co);
            assert_eq!(g.on_grid(), ci >= 8 && wide, "c{ci}->{co} k{k} {h}x{w}");
        }
        for (ci, co, k, s, p) in [(8, 4, 3, 2, 1), (8, 4, 1, 1, 0), (8, 4, 3, 1, 0)] {
            assert!(!ConvGeometry::new(&[2, ci, 16, 16], &[co, ci, k, k], s, p).on_grid());
        }
    }

    /// The weight gradient on the shifted grid equals the unfolded one's (up to summation order;
    /// the bias gradient bit for bit) for 3x3 and 5x5 kernels on non-square maps, and
    /// `weight_grad` takes it where it pays.
    #[test]
    fn shifted_weight_grad_matches_the_unfolded_one() {
        let mut rng = SeededRng::new(9);
        // (batch, c_in, c_out, k, h, w)
        for (b, ci, co, k, h, w) in
            [(3, 8, 9, 3, 7, 5), (2, 17, 8, 3, 4, 12), (2, 8, 8, 5, 9, 6), (1, 3, 2, 3, 5, 5)]
        {
            let g = ConvGeometry::new(&[b, ci, h, w], &[co, ci, k, k], 1, k / 2);
            let x = rng.normals(b * ci * h * w);
            let dy = rng.normals(b * co * h * w);
            let (shifted, unfolded) = (weight_grad_shifted(&g, &dy, &x), weight_grad_unfolded(&g, &dy, &x));
            assert_eq!(shifted.1, unfolded.1, "c{ci}->{co} k{k}: bias gradient");
            for (i, (a, r)) in shifted.0.iter().zip(&unfolded.0).enumerate() {
                assert!(
                    (a - r).abs() <= 1e-5 * (1.0 + r.abs()),
                    "c{ci}->{co} k{k} {h}x{w}: dw[{i}] {a} vs {r}"
                );
            }
            assert_eq!(g.shifted_weight_grad(), ci >= 8 && h * (w + k - 1) >= ci, "c{ci} k{k} {h}x{w}");
        }
        // Strided, 1x1 and thin convolutions keep the unfolded path.
        for (ci, co, k, s, p) in [(8, 8, 3, 2, 1), (8, 8, 1, 1, 0), (8, 4, 3, 1, 1), (8, 8, 3, 1, 0)] {
            assert!(!ConvGeometry::new(&[2, ci, 8, 8], &[co, ci, k, k], s, p).shifted_weight_grad());
        }
    }

    /// The same bits with one thread and with several, and whether the products run side by
    /// side or each is split across threads (batch 1 against batch 4).
    #[test]
    fn fused_conv2d_is_bit_identical_across_thread_counts() {
        let mut rng = SeededRng::new(2);
        // (batch, c_out, side): the second on the bordered grid (forward, input gradient).
        for (batch, co, side) in [(1, 16, 12), (4, 16, 12), (1, 4, 16), (4, 4, 16)] {
            let g = ConvGeometry::new(&[batch, 8, side, side], &[co, 8, 3, 3], 1, 1);
            assert_eq!(g.on_grid(), co == 4);
            let x = rng.normals(batch * 8 * side * side);
            let w = rng.normals(co * 72);
            let dy = rng.normals(batch * co * side * side);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    (forward(&g, &x, &w, Some(&w[..co])), input_grad(&g, &dy, &w), weight_grad(&g, &dy, &x))
                })
            };
            let one = run(1);
            assert!(one == run(2) && one == run(3), "batch {batch}: results depend on the thread count");
        }
    }
}
