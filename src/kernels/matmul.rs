//! Batched matrix product `C = (A B) / divisor` over equal leading (batch) dimensions, reading
//! both operands through their strides: attention's `Q K^T` and `P V` take per-head views of the
//! projections (permuted, transposed), which burn's matmul on flex first copies into contiguous
//! memory, forward and again for each gradient. Backward: `dA = dC B^T / divisor`,
//! `dB = A^T dC / divisor`, again read in place. Batch items run in parallel.

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
use super::host::{tensor, tensor_like, values, zeros};
use super::record;

/// A tensor's matrices: the base offset of each batch item and the row/column strides, all in
/// elements of its storage.
pub(super) struct Matrices {
    pub offsets: Vec<usize>,
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

impl Matrices {
    /// `None` for negative strides (a flipped view; the caller copies it first).
    fn of(t: &FlexTensor) -> Option<Self> {
        let layout = t.layout();
        let (shape, strides) = (layout.shape(), layout.strides());
        let d = shape.len();
        if strides.iter().any(|&s| s < 0) {
            return None;
        }
        let mut offsets = vec![layout.start_offset()];
        for axis in 0..d - 2 {
            offsets = offsets
                .iter()
                .flat_map(|&o| (0..shape[axis]).map(move |i| o + i * strides[axis] as usize))
                .collect();
        }
        Some(Self { offsets, rows: shape[d - 2], cols: shape[d - 1], rs: strides[d - 2], cs: strides[d - 1] })
    }

    pub fn at(&self, data: &[f32], i: usize) -> Mat {
        Mat { ptr: data[self.offsets[i]..].as_ptr(), rs: self.rs, cs: self.cs }
    }

    /// The transposed view of item `i`.
    pub fn at_t(&self, data: &[f32], i: usize) -> Mat {
        Mat { ptr: data[self.offsets[i]..].as_ptr(), rs: self.cs, cs: self.rs }
    }
}

/// The tensor itself when its strides are usable, else a contiguous copy.
pub(super) fn strided(t: &FlexTensor) -> (FlexTensor, Matrices) {
    match Matrices::of(t) {
        Some(m) => (t.clone(), m),
        None => {
            let c = t.to_contiguous();
            let m = Matrices::of(&c).expect("contiguous strides");
            (c, m)
        }
    }
}

/// `out[i] = scale lhs_i rhs_i` (m x n each, contiguous), over all batch items in parallel.
fn products(
    m: usize,
    n: usize,
    k: usize,
    items: usize,
    scale: f32,
    operands: impl Fn(usize) -> (Mat, Mat) + Sync,
) -> Vec<f32> {
    let mut out = zeros(items * m * n);
    products_into(&mut out, m, n, k, items, scale, |i| (i * m * n, n), operands);
    out
}

/// `out[place(i)] = scale lhs_i rhs_i` with item `i`'s m x n block at `place(i) = (offset, row
/// stride)` in `out`; the blocks must not overlap.
#[allow(clippy::too_many_arguments)]
fn products_into(
    out: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    items: usize,
    scale: f32,
    place: impl Fn(usize) -> (usize, usize) + Sync,
    operands: impl Fn(usize) -> (Mat, Mat) + Sync,
) {
    let threads = inner_threads(items);
    let len = out.len();
    let dst = SendPtr(out.as_mut_ptr());
    (0..items).into_par_iter().for_each(|i| {
        let (lhs, rhs) = operands(i);
        let (offset, rs) = place(i);
        assert!(m == 0 || n == 0 || offset + (m - 1) * rs + n <= len, "product block inside the output");
        // Moves the whole `SendPtr` into the closure (a closure would capture only its field).
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        // SAFETY: the operands address live tensor storage (offsets and strides from the
        // layouts); item i's block lies inside `out` (checked) and no other item's overlaps it.
        unsafe { gemm(m, n, k, dst.0.add(offset), rs, false, lhs, rhs, scale, threads) }
    });
}

fn out_shape(a: &FlexTensor, n: usize) -> Vec<usize> {
    let mut shape = a.layout().shape().to_vec();
    *shape.last_mut().expect("a dimension") = n;
    shape
}

fn forward(a: &FlexTensor, b: &FlexTensor, scale: f32) -> FlexTensor {
    let ((a, ma), (b, mb)) = (strided(a), strided(b));
    let (da, db) = (a.storage::<f32>(), b.storage::<f32>());
    let out = products(ma.rows, mb.cols, ma.cols, ma.offsets.len(), scale, |i| (ma.at(da, i), mb.at(db, i)));
    tensor(out, &out_shape(&a, mb.cols))
}

/// `(dA, dB)` for the upstream gradient `grad` (contiguous, like the forward's output).
fn backward(
    grad: &FlexTensor,
    a: &FlexTensor,
    b: &FlexTensor,
    scale: f32,
    want: (bool, bool),
) -> (Option<FlexTensor>, Option<FlexTensor>) {
    let ((a, ma), (b, mb)) = (strided(a), strided(b));
    let (da, db) = (a.storage::<f32>(), b.storage::<f32>());
    let g = values(grad);
    let (m, k, n, items) = (ma.rows, ma.cols, mb.cols, ma.offsets.len());
    let gm = |i: usize| Mat { ptr: g[i * m * n..].as_ptr(), rs: n as isize, cs: 1 };
    let grad_a = want.0.then(|| {
        let v = products(m, k, n, items, scale, |i| (gm(i), mb.at_t(db, i)));
        tensor_like(v, &a)
    });
    let grad_b = want.1.then(|| {
        let v = products(k, n, m, items, scale, |i| (ma.at_t(da, i), gm(i)));
        tensor_like(v, &b)
    });
    (grad_a, grad_b)
}

/// `P V` for `P: [B, H, N, M]`, `V: [B, H, M, D]`, written as `[B, N, H * D]` (heads merged,
/// what every attention feeds its output projection) instead of `[B, H, N, D]`, saving the
/// permuting copy; backward reads the merged gradient per head in place.
fn merged_forward(p: &FlexTensor, v: &FlexTensor) -> FlexTensor {
    let ((p, mp), (v, mv)) = (strided(p), strided(v));
    let shape = p.layout().shape();
    let (b, h, n, d) = (shape[0], shape[1], mp.rows, mv.cols);
    let (dp, dv) = (p.storage::<f32>(), v.storage::<f32>());
    let mut out = zeros(b * n * h * d);
    let place = |i: usize| ((i / h) * n * h * d + (i % h) * d, h * d);
    products_into(&mut out, n, d, mp.cols, b * h, 1.0, place, |i| (mp.at(dp, i), mv.at(dv, i)));
    tensor(out, &[b, n, h * d])
}

fn merged_backward(
    grad: &FlexTensor,
    p: &FlexTensor,
    v: &FlexTensor,
    want: (bool, bool),
) -> (Option<FlexTensor>, Option<FlexTensor>) {
    let ((p, mp), (v, mv)) = (strided(p), strided(v));
    let shape = p.layout().shape().to_vec();
    let (h, n, m, d) = (shape[1], mp.rows, mp.cols, mv.cols);
    let (dp, dv) = (p.storage::<f32>(), v.storage::<f32>());
    let g = values(grad);
    let items = mp.offsets.len();
    // Head i's gradient block: rows of the merged [B, N, H * D] gradient, columns of head i % h.
    let gm =
        |i: usize| Mat { ptr: g[(i / h) * n * h * d + (i % h) * d..].as_ptr(), rs: (h * d) as isize, cs: 1 };
    let grad_p = want.0.then(|| tensor(products(n, m, d, items, 1.0, |i| (gm(i), mv.at_t(dv, i))), &shape));
    let grad_v = want.1.then(|| tensor_like(products(m, d, n, items, 1.0, |i| (mp.at_t(dp, i), gm(i))), &v));
    (grad_p, grad_v)
}

#[backend_extension(Autodiff, Flex)]
pub trait MatmulBackend: Backend {
    /// `(A B) * scale` over equal batch dimensions.
    fn fused_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>, scale: f32) -> FloatTensor<Self>;

    /// `P V` with the heads merged: `[B, H, N, M] x [B, H, M, D] -> [B, N, H * D]`.
    fn fused_matmul_merge_heads(p: FloatTensor<Self>, v: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl MatmulBackend for Flex {
    fn fused_matmul(a: FlexTensor, b: FlexTensor, scale: f32) -> FlexTensor {
        forward(&a, &b, scale)
    }

    fn fused_matmul_merge_heads(p: FlexTensor, v: FlexTensor) -> FlexTensor {
        merged_forward(&p, &v)
    }
}

/// `scale` for the plain product; `None` for the merged-heads one.
#[derive(Debug)]
struct MatmulBackward {
    scale: Option<f32>,
}

impl Backward<Flex, 2> for MatmulBackward {
    /// Both operands (views: no copy is kept).
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_a, node_b] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (a, b) = &ops.state;
        let want = (node_a.is_some(), node_b.is_some());
        let (ga, gb) = match self.scale {
            Some(scale) => backward(&grad, a, b, scale, want),
            None => merged_backward(&grad, a, b, want),
        };
        if let (Some(node), Some(g)) = (node_a, ga) {
            grads.register::<Flex>(node.id, g);
        }
        if let (Some(node), Some(g)) = (node_b, gb) {
            grads.register::<Flex>(node.id, g);
        }
    }
}

impl<C: CheckpointStrategy> MatmulBackend for Autodiff<Flex, C> {
    fn fused_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        let (ap, bp) = (a.primitive().clone(), b.primitive().clone());
        let out = forward(&ap, &bp, scale);
        record!(MatmulBackward { scale: Some(scale) }, [a.node(), b.node()], (ap, bp), out)
    }

    fn fused_matmul_merge_heads(p: FloatTensor<Self>, v: FloatTensor<Self>) -> FloatTensor<Self> {
        let (pp, vp) = (p.primitive().clone(), v.primitive().clone());
        let out = merged_forward(&pp, &vp);
        record!(MatmulBackward { scale: None }, [p.node(), v.node()], (pp, vp), out)
    }
}

/// `(P V)` with heads merged: `[B, H, N, M] x [B, H, M, D] -> [B, N, H * D]`; on flex written in
/// that layout directly, elsewhere `P.matmul(V).swap_dims(1, 2).reshape(..)`.
pub fn matmul_merge_heads(p: Tensor<4>, v: Tensor<4>) -> Tensor<3> {
    let ([b, h, n, m], [bv, hv, mv, d]) = (p.dims(), v.dims());
    if !super::on_flex(&p.device()) || (b, h, m) != (bv, hv, mv) {
        return p.matmul(v).swap_dims(1, 2).reshape([b, n, h * d]);
    }
    Tensor::from_dispatch(<Dispatch as MatmulBackend>::fused_matmul_merge_heads(
        p.into_dispatch(),
        v.into_dispatch(),
    ))
}

/// `a.matmul(b) / divisor` for equal batch dimensions: the strided kernel on flex (with
/// `1 / divisor` applied inside the product), burn's matmul and division elsewhere or when the
/// batch dimensions differ (broadcasting).
pub fn matmul_div<const D: usize>(a: Tensor<D>, b: Tensor<D>, divisor: f64) -> Tensor<D> {
    let (da, db) = (a.dims(), b.dims());
    let same_batch = da[..D - 2] == db[..D - 2] && da[D - 1] == db[D - 2];
    if !super::on_flex(&a.device()) || !same_batch {
        let c = a.matmul(b);
        return if divisor == 1.0 { c } else { c / divisor };
    }
    let scale = (1.0 / divisor) as f32;
    Tensor::from_dispatch(<Dispatch as MatmulBackend>::fused_matmul(
        a.into_dispatch(),
        b.into_dispatch(),
        scale,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::params::host_values;
    use crate::rng::SeededRng;
    use burn::tensor::{Device, TensorData};

    /// `P V` with heads merged against burn's matmul, permute and reshape: values and both
    /// gradients, with `V` a strided per-head view.
    #[test]
    fn fused_merged_heads_product_matches_burns_ops() {
        let device = Device::flex().autodiff();
        let (b, h, n, m, d) = (2, 3, 5, 4, 6);
        let mut rng = SeededRng::new(31);
        let (p0, v0, up) =
            (rng.normals(b * h * n * m), rng.normals(b * m * h * d), rng.normals(b * n * h * d));
        let run = |fused: bool| {
            let p = Tensor::<4>::from_data(TensorData::new(p0.clone(), [b, h, n, m]), &device).require_grad();
            let v0t =
                Tensor::<3>::from_data(TensorData::new(v0.clone(), [b, m, h * d]), &device).require_grad();
            let v = v0t.clone().reshape([b, m, h, d]).swap_dims(1, 2);
            let o = if fused {
                matmul_merge_heads(p.clone(), v)
            } else {
                p.clone().matmul(v).swap_dims(1, 2).reshape([b, n, h * d])
            };
            let up = Tensor::<3>::from_data(TensorData::new(up.clone(), [b, n, h * d]), &device);
            let grads = (o.clone() * up).sum().backward();
            (host_values(o), host_values(p.grad(&grads).unwrap()), host_values(v0t.grad(&grads).unwrap()))
        };
        let (f, t) = (run(true), run(false));
        for (what, a, r) in [("values", &f.0, &t.0), ("dP", &f.1, &t.1), ("dV", &f.2, &t.2)] {
            for (i, (a, r)) in a.iter().zip(r.iter()).enumerate() {
                assert!((a - r).abs() <= 1e-5 * (1.0 + r.abs()), "{what}[{i}]: {a} vs {r}");
            }
        }
    }

    /// Attention's shapes: per-head views of a fused projection (permuted), `K^T` as a
    /// transposed view, and a divisor; values and both gradients against burn's matmul.
    #[test]
    fn fused_matmul_on_views_matches_burns_matmul() {
        let device = Device::flex().autodiff();
        let (b, n, h, d) = (2, 5, 3, 4);
        let mut rng = SeededRng::new(30);
        let x0 = rng.normals(b * n * 2 * h * d);
        let up = rng.normals(b * h * n * n);
        let run = |fused: bool| {
            let x = Tensor::<3>::from_data(TensorData::new(x0.clone(), [b, n, 2 * h * d]), &device)
                .require_grad();
            // [B, N, 2, H, D] -> [2, B, H, N, D]: q and k are strided views.
            let qk = x.clone().reshape([b, n, 2, h, d]).permute([2, 0, 3, 1, 4]);
            let q = qk.clone().slice([0..1]).squeeze_dim::<4>(0);
            let k = qk.slice([1..2]).squeeze_dim::<4>(0);
            let s = if fused { matmul_div(q, k.transpose(), 2.0) } else { q.matmul(k.transpose()) / 2.0 };
            let up =
                Tensor::<1>::from_data(TensorData::new(up.clone(), [up.len()]), &device).reshape(s.dims());
            let grads = (s.clone() * up).sum().backward();
            (host_values(s), host_values(x.grad(&grads).unwrap()))
        };
        let (f, t) = (run(true), run(false));
        for (what, a, r) in [("values", &f.0, &t.0), ("gradient", &f.1, &t.1)] {
            for (i, (a, r)) in a.iter().zip(r.iter()).enumerate() {
                assert!((a - r).abs() <= 1e-5 * (1.0 + r.abs()), "{what}[{i}]: {a} vs {r}");
            }
        }
    }
}
