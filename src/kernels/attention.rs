//! Attention `softmax(Q K^T / sqrt(d)) V` as one operation on flex, with the probabilities'
//! quantizer inside and the heads merged in the output (`[B, N, H * D]`): the `[B, H, N, M]`
//! scores are never stored. Composed from a product, a softmax, a quantizer and a product, the
//! backward keeps three score-sized tensors per attention (the softmax output, its quantized copy
//! and the quantizer's input); at SD's 64 x 64 latent, batch 2, each is 1 GB per top-level
//! self-attention, 16 GB per QAT step. Here the backward recomputes the scores from `Q` and `K`
//! (one more `Q K^T` product) a block of query rows at a time, as flash attention does.
//!
//! A head whose scores fit [`BLOCK`] elements is one block: the same products, with the same
//! shapes, as the composed version, so the same bits (values and the gradients of `Q`, `K`, `V`);
//! only the quantizer's scale and zero-point gradients are summed in another order (per row here,
//! per fixed chunk of the whole tensor there). Larger heads are split into blocks of rows, which
//! also moves the order of the sums over query rows in `dK` and `dV`.

use std::fmt::Debug;
use std::sync::Arc;

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

use super::gemm::{Mat, SendPtr, inner_threads, matmul as gemm};
use super::host::{tensor, values, zeros};
use super::matmul::{Matrices, strided};
use super::softmax::{softmax_grad_row, softmax_row};

/// Score elements per block of query rows (4 MB): three such buffers per thread in the backward.
pub const BLOCK: usize = 1 << 20;

/// The fake quantizer of the probabilities, one row at a time: implemented by the quantizer's
/// formats (`quant::fused`), which this layer does not know.
pub trait RowQuantizer: Debug + Send + Sync {
    /// `row = round(clamp((row - z) / s)) * s + z` in place.
    fn quantize(&self, s: f32, z: f32, row: &mut [f32]);

    /// The straight-through gradient: overwrites `g` (upstream, w.r.t. the quantized row) with
    /// the gradient w.r.t. the row `x` and returns this row's `(ds, dz)` (LSQ).
    fn backward(&self, s: f32, z: f32, g: &mut [f32], x: &[f32]) -> (f32, f32);
}

/// The probabilities' quantizer with its scale and zero point (`[1]` each) for this call.
#[derive(Clone)]
pub struct ProbsQuant {
    pub rows: Arc<dyn RowQuantizer>,
    pub scale: Tensor<1>,
    pub zero_point: Option<Tensor<1>>,
}

/// The quantizer and its two values as the kernels use them.
type Quant<'a> = Option<(&'a dyn RowQuantizer, f32, f32)>;

/// Shapes of one call and the per-head matrices of `Q [B, H, N, D]`, `K` and `V [B, H, M, D]`.
struct Heads {
    q: (FlexTensor, Matrices),
    k: (FlexTensor, Matrices),
    v: (FlexTensor, Matrices),
    heads: usize,
    n: usize,
    m: usize,
    d: usize,
    /// Query rows per block.
    rows: usize,
}

impl Heads {
    fn new(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor) -> Self {
        let (q, k, v) = (strided(q), strided(k), strided(v));
        let heads = q.0.layout().shape()[1];
        let (n, m, d) = (q.1.rows, k.1.rows, q.1.cols);
        let rows = (BLOCK / m.max(1)).clamp(1, n.max(1));
        Self { q, k, v, heads, n, m, d, rows }
    }

    fn items(&self) -> usize {
        self.q.1.offsets.len()
    }

    fn blocks(&self) -> usize {
        self.n.div_ceil(self.rows)
    }

    /// Rows `r0..` of head `i`'s `Q`.
    fn q_rows(&self, i: usize, r0: usize) -> Mat {
        let q = self.q.1.at(self.q.0.storage::<f32>(), i);
        Mat { ptr: q.ptr.wrapping_offset(r0 as isize * q.rs), ..q }
    }

    fn k(&self, i: usize) -> Mat {
        self.k.1.at(self.k.0.storage::<f32>(), i)
    }

    fn k_t(&self, i: usize) -> Mat {
        self.k.1.at_t(self.k.0.storage::<f32>(), i)
    }

    fn v(&self, i: usize) -> Mat {
        self.v.1.at(self.v.0.storage::<f32>(), i)
    }

    fn v_t(&self, i: usize) -> Mat {
        self.v.1.at_t(self.v.0.storage::<f32>(), i)
    }

    /// Offset of head `i`'s row `r` in the merged `[B, N, H * D]` layout (row stride `H * D`).
    fn merged(&self, i: usize, r: usize) -> usize {
        let (b, h) = (i / self.heads, i % self.heads);
        (b * self.n + r) * self.heads * self.d + h * self.d
    }

    /// The probabilities of head `i`'s rows `r0..r0 + r` (`r x M`, in `p`), quantized into `pq`
    /// when there is a quantizer.
    #[allow(clippy::too_many_arguments)]
    fn probs(
        &self,
        i: usize,
        r0: usize,
        r: usize,
        p: &mut [f32],
        pq: Option<&mut [f32]>,
        quant: Quant,
        threads: usize,
    ) {
        let (m, d) = (self.m, self.d);
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        // SAFETY: the operands are head i's rows in live tensor storage; `p` holds r x M.
        unsafe { gemm(r, m, d, p.as_mut_ptr(), m, false, self.q_rows(i, r0), self.k_t(i), scale, threads) };
        p.chunks_mut(m).for_each(softmax_row);
        if let (Some((rows, s, z)), Some(pq)) = (quant, pq) {
            pq.copy_from_slice(p);
            pq.chunks_mut(m).for_each(|row| rows.quantize(s, z, row));
        }
    }
}

/// A contiguous row-major `rows x cols` buffer as a matrix, or its transpose.
fn mat(buf: &[f32], cols: usize, transposed: bool) -> Mat {
    let (rs, cs) = if transposed { (1, cols as isize) } else { (cols as isize, 1) };
    Mat { ptr: buf.as_ptr(), rs, cs }
}

fn forward(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, quant: Quant) -> FlexTensor {
    let heads = Heads::new(q, k, v);
    let (items, blocks, n, m, d, h) = (heads.items(), heads.blocks(), heads.n, heads.m, heads.d, heads.heads);
    let b = items / h.max(1);
    let mut out = zeros(b * n * h * d);
    let dst = SendPtr(out.as_mut_ptr());
    let threads = inner_threads(items * blocks);
    (0..items * blocks).into_par_iter().for_each(|unit| {
        let (i, r0) = (unit / blocks, (unit % blocks) * heads.rows);
        let r = heads.rows.min(n - r0);
        let mut p = zeros(r * m);
        let mut pq = quant.map(|_| zeros(r * m));
        heads.probs(i, r0, r, &mut p, pq.as_deref_mut(), quant, threads);
        let probs = pq.as_deref().unwrap_or(&p);
        // Moves the whole `SendPtr` into the closure (a closure would capture only its field).
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        // SAFETY: block (i, r0) writes rows r0..r0 + r of head i's columns in the merged output,
        // which no other block writes; the operands are live.
        unsafe {
            let o = dst.0.add(heads.merged(i, r0));
            gemm(r, d, m, o, h * d, false, mat(probs, m, false), heads.v(i), 1.0, threads)
        }
    });
    tensor(out, &[b, n, h * d])
}

/// The gradients of `Q`, `K`, `V` (contiguous `[B, H, ., D]`, those wanted) and the
/// quantizer's `(ds, dz)`, for the merged upstream gradient `grad`.
struct Grads {
    q: Option<FlexTensor>,
    k: Option<FlexTensor>,
    v: Option<FlexTensor>,
    scale: f32,
    zero: f32,
}

fn backward(
    grad: &FlexTensor,
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    quant: Quant,
    want: [bool; 3],
) -> Grads {
    let heads = Heads::new(q, k, v);
    let (items, n, m, d, h) = (heads.items(), heads.n, heads.m, heads.d, heads.heads);
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let g = values(grad);
    // Only the wanted gradients get memory (the products below write only those).
    let buffer = |wanted: bool, len: usize| if wanted { zeros(len) } else { Vec::new() };
    let (mut dq, mut dk, mut dv) =
        (buffer(want[0], items * n * d), buffer(want[1], items * m * d), buffer(want[2], items * m * d));
    let (dq_ptr, dk_ptr, dv_ptr) =
        (SendPtr(dq.as_mut_ptr()), SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
    let threads = inner_threads(items);
    let sums: Vec<(f32, f32)> = (0..items)
        .into_par_iter()
        .map(|i| {
            let (dq_ptr, dk_ptr, dv_ptr) = (dq_ptr, dk_ptr, dv_ptr);
            let mut p = zeros(heads.rows * m);
            let mut pq = quant.map(|_| zeros(heads.rows * m));
            let mut dp = zeros(heads.rows * m);
            let (mut ds, mut dz) = (0.0f32, 0.0f32);
            for (blk, r0) in (0..n).step_by(heads.rows).enumerate() {
                let r = heads.rows.min(n - r0);
                let (p, dp) = (&mut p[..r * m], &mut dp[..r * m]);
                let mut pq = pq.as_deref_mut().map(|pq| &mut pq[..r * m]);
                heads.probs(i, r0, r, p, pq.as_deref_mut(), quant, threads);
                let probs = pq.as_deref().unwrap_or(p);
                let g_rows = Mat { ptr: g[heads.merged(i, r0)..].as_ptr(), rs: (h * d) as isize, cs: 1 };
                let accumulate = blk > 0;
                // SAFETY: head i writes only its own blocks of dq, dk and dv (item i's offsets);
                // the operands are live buffers and tensor storage.
                unsafe {
                    if want[2] {
                        let dv_i = dv_ptr.0.add(i * m * d);
                        gemm(m, d, r, dv_i, d, accumulate, mat(probs, m, true), g_rows, 1.0, threads);
                    }
                    gemm(r, m, d, dp.as_mut_ptr(), m, false, g_rows, heads.v_t(i), 1.0, threads);
                }
                if let Some((rows, s, z)) = quant {
                    for (g_row, p_row) in dp.chunks_mut(m).zip(p.chunks(m)) {
                        let (a, b) = rows.backward(s, z, g_row, p_row);
                        ds += a;
                        dz += b;
                    }
                }
                dp.chunks_mut(m).zip(p.chunks(m)).for_each(|(g, y)| softmax_grad_row(g, y));
                // SAFETY: as above.
                unsafe {
                    if want[0] {
                        let dq_i = dq_ptr.0.add((i * n + r0) * d);
                        gemm(r, d, m, dq_i, d, false, mat(dp, m, false), heads.k(i), scale, threads);
                    }
                    if want[1] {
                        let dk_i = dk_ptr.0.add(i * m * d);
                        gemm(
                            m,
                            d,
                            r,
                            dk_i,
                            d,
                            accumulate,
                            mat(dp, m, true),
                            heads.q_rows(i, r0),
                            scale,
                            threads,
                        );
                    }
                }
            }
            (ds, dz)
        })
        .collect();
    let b = items / h.max(1);
    let (scale_grad, zero_grad) = sums.iter().fold((0.0, 0.0), |(a, b), &(s, z)| (a + s, b + z));
    Grads {
        q: want[0].then(|| tensor(dq, &[b, h, n, d])),
        k: want[1].then(|| tensor(dk, &[b, h, m, d])),
        v: want[2].then(|| tensor(dv, &[b, h, m, d])),
        scale: scale_grad,
        zero: zero_grad,
    }
}

/// The quantizer and the host values of its scale and zero point.
fn quant_of<'a>(rows: &'a Option<Arc<dyn RowQuantizer>>, s: &FlexTensor, z: &FlexTensor) -> Quant<'a> {
    rows.as_deref().map(|rows| (rows, values(s)[0], values(z)[0]))
}

#[backend_extension(Autodiff, Flex)]
pub trait AttentionBackend: Backend {
    /// `softmax(Q K^T / sqrt(d))` quantized by `rows` (with `scale`, `zero_point`, `[1]` each)
    /// when given, times `V`, heads merged: `[B, H, N, D] x [B, H, M, D]^2 -> [B, N, H * D]`.
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        zero_point: FloatTensor<Self>,
        rows: Option<Arc<dyn RowQuantizer>>,
    ) -> FloatTensor<Self>;
}

impl AttentionBackend for Flex {
    fn fused_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        scale: FlexTensor,
        zero_point: FlexTensor,
        rows: Option<Arc<dyn RowQuantizer>>,
    ) -> FlexTensor {
        forward(&q, &k, &v, quant_of(&rows, &scale, &zero_point))
    }
}

#[derive(Debug)]
struct AttentionBackward {
    rows: Option<Arc<dyn RowQuantizer>>,
}

impl Backward<Flex, 5> for AttentionBackward {
    /// `Q`, `K`, `V` (views: no copy), the scale and the zero point.
    type State = [FlexTensor; 5];

    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let [q, k, v, s, z] = &ops.state;
        let [nq, nk, nv, ns, nz] = ops.parents;
        let want = [nq.is_some(), nk.is_some(), nv.is_some()];
        let out = backward(&grad, q, k, v, quant_of(&self.rows, s, z), want);
        for (node, g) in [(nq, out.q), (nk, out.k), (nv, out.v)] {
            if let (Some(node), Some(g)) = (node, g) {
                grads.register::<Flex>(node.id, g);
            }
        }
        if let Some(node) = ns {
            grads.register::<Flex>(node.id, tensor(vec![out.scale], &[1]));
        }
        if let Some(node) = nz {
            grads.register::<Flex>(node.id, tensor(vec![out.zero], &[1]));
        }
    }
}

impl<C: CheckpointStrategy> AttentionBackend for Autodiff<Flex, C> {
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        zero_point: FloatTensor<Self>,
        rows: Option<Arc<dyn RowQuantizer>>,
    ) -> FloatTensor<Self> {
        let nodes = [q.node(), k.node(), v.node(), scale.node(), zero_point.node()];
        let state = [q, k, v, scale, zero_point].map(|t| t.primitive().clone());
        let [qp, kp, vp, sp, zp] = &state;
        let out = forward(qp, kp, vp, quant_of(&rows, sp, zp));
        match (AttentionBackward { rows }).prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

/// Attention on flex as one operation (see the module docs): `Q [B, H, N, D]`, `K`, `V
/// [B, H, M, D]` (strided views are read in place) and the probabilities' quantizer, if any;
/// `[B, N, H * D]` out. On the GPU backends, without a quantizer, burn's attention: its flash
/// kernel where autotune picks it (cuda), so the scores are never stored; burn composes it under
/// autodiff and on wgpu. `None` elsewhere or where the batch and head dimensions differ.
pub fn attention(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    probs: Option<&ProbsQuant>,
) -> Option<Tensor<3>> {
    let ([b, h, _, d], [bk, hk, m, dk], [bv, hv, mv, _]) = (q.dims(), k.dims(), v.dims());
    #[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
    if probs.is_none() && super::on_cube(&q.device()) {
        let options = burn::tensor::ops::AttentionModuleOptions::default();
        let out = burn::tensor::module::attention(q.clone(), k.clone(), v.clone(), None, None, options);
        let [b, h, n, d] = out.dims();
        return Some(out.swap_dims(1, 2).reshape([b, n, h * d]));
    }
    if !super::on_flex(&q.device()) || (b, h, d) != (bk, hk, dk) || (b, h, m) != (bv, hv, mv) {
        return None;
    }
    let device = q.device();
    let (scale, zero, rows) = match probs {
        Some(p) => (
            p.scale.clone(),
            p.zero_point.clone().unwrap_or_else(|| Tensor::zeros([1], &device)),
            Some(p.rows.clone()),
        ),
        None => (Tensor::ones([1], &device), Tensor::zeros([1], &device), None),
    };
    Some(Tensor::from_dispatch(<Dispatch as AttentionBackend>::fused_attention(
        q.clone().into_dispatch(),
        k.clone().into_dispatch(),
        v.clone().into_dispatch(),
        scale.into_dispatch(),
        zero.into_dispatch(),
        rows,
    )))
}
