//! One of the packed q/k/v projection's three parts, split into attention heads:
//! `[B, N, 3C] -> [B, H, N, C / H]`, the `part`-th block of `C` columns.
//!
//! As tensor ops it is a reshape, a permute and a slice per part; the slice's backward is a
//! zeroed full-size tensor plus a slice write and the permute's a transposing copy, all on the
//! calling thread (about 5% of a two-thread tiny-DiT step with the second core idle, perf).
//! Here the forward is one parallel copy per part and the backward one parallel scatter into
//! zeros. The three parts' gradients have disjoint support, so their sum (autodiff adds them)
//! has the same bits as before.

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
use std::mem::MaybeUninit;

use super::host::{filled, tensor, values, write, zeros};
use super::record;

/// The split's sizes: `[b, n, parts * c]` in, `[b, heads, n, c / heads]` out.
#[derive(Debug, Clone, Copy)]
struct Split {
    b: usize,
    n: usize,
    parts: usize,
    part: usize,
    heads: usize,
    d: usize,
}

impl Split {
    fn new(x: &FlexTensor, parts: usize, part: usize, heads: usize) -> Self {
        let s = x.layout().shape();
        let (b, n, width) = (s[0], s[1], s[2]);
        assert!(width.is_multiple_of(parts * heads), "{width} columns into {parts} parts of {heads} heads");
        Self { b, n, parts, part, heads, d: width / parts / heads }
    }

    fn width(&self) -> usize {
        self.parts * self.heads * self.d
    }

    /// Column of head `h`'s first value in a row of the packed input.
    fn column(&self, h: usize) -> usize {
        (self.part * self.heads + h) * self.d
    }
}

/// `[b, n, width] -> [b, h, n, d]` for one part: each (sample, head) plane in parallel.
fn take(x: &[f32], s: Split) -> Vec<f32> {
    let fill = |bh: usize, plane: &mut [MaybeUninit<f32>]| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let first = s.column(h);
        for (i, row) in plane.chunks_mut(s.d).enumerate() {
            let at = (b * s.n + i) * s.width() + first;
            write(row, &x[at..at + s.d]);
        }
    };
    // SAFETY: each run is one (sample, head) plane of `n` rows of `d` values, each row written.
    unsafe { filled(s.b * s.heads * s.n * s.d, s.n * s.d, fill) }
}

/// The gradient of [`take`]: `g` scattered back into zeros shaped like the packed input.
fn take_grad(g: &[f32], s: Split) -> Vec<f32> {
    let mut dx = zeros(s.b * s.n * s.width());
    dx.par_chunks_mut(s.n * s.width()).enumerate().for_each(|(b, sample)| {
        for h in 0..s.heads {
            let (first, plane) = (s.column(h), &g[(b * s.heads + h) * s.n * s.d..][..s.n * s.d]);
            for (row, src) in sample.chunks_mut(s.width()).zip(plane.chunks(s.d)) {
                row[first..first + s.d].copy_from_slice(src);
            }
        }
    });
    dx
}

fn take_tensor(x: &FlexTensor, s: Split) -> FlexTensor {
    tensor(take(&values(x), s), &[s.b, s.heads, s.n, s.d])
}

#[backend_extension(Autodiff, Flex)]
pub trait HeadsBackend: Backend {
    /// Part `part` of `parts` equal column blocks of `x: [B, N, parts * C]`, as `[B, H, N, C / H]`.
    fn fused_take_heads(x: FloatTensor<Self>, parts: usize, part: usize, heads: usize) -> FloatTensor<Self>;
}

impl HeadsBackend for Flex {
    fn fused_take_heads(x: FlexTensor, parts: usize, part: usize, heads: usize) -> FlexTensor {
        take_tensor(&x, Split::new(&x, parts, part, heads))
    }
}

#[derive(Debug)]
struct TakeBackward;

impl Backward<Flex, 1> for TakeBackward {
    type State = Split;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node {
            let s = ops.state;
            grads.register::<Flex>(node.id, tensor(take_grad(&values(&grad), s), &[s.b, s.n, s.width()]));
        }
    }
}

impl<C: CheckpointStrategy> HeadsBackend for Autodiff<Flex, C> {
    fn fused_take_heads(x: FloatTensor<Self>, parts: usize, part: usize, heads: usize) -> FloatTensor<Self> {
        let s = Split::new(x.primitive(), parts, part, heads);
        let out = take_tensor(x.primitive(), s);
        record!(TakeBackward, [x.node()], s, out)
    }
}

/// `[q, k, v]`, each `[B, H, N, C / H]`, from a packed projection `[B, N, 3C]` with tensor ops:
/// what runs on every backend but flex, and the reference the fused split is tested against.
pub fn split_qkv_ops(qkv: Tensor<3>, heads: usize) -> [Tensor<4>; 3] {
    let [b, n, width] = qkv.dims();
    let d = width / 3 / heads;
    // [B, N, 3, H, D] -> [3, B, H, N, D]
    let qkv = qkv.reshape([b, n, 3, heads, d]).permute([2, 0, 3, 1, 4]);
    [0, 1, 2].map(|i| qkv.clone().slice([i..i + 1]).squeeze_dim::<4>(0))
}

/// `[q, k, v]`, each `[B, H, N, C / H]`, from a packed projection `[B, N, 3C]`: one parallel copy
/// per part on flex, tensor ops elsewhere.
pub fn split_qkv(qkv: Tensor<3>, heads: usize) -> [Tensor<4>; 3] {
    if !super::on_flex(&qkv.device()) {
        return split_qkv_ops(qkv, heads);
    }
    [0, 1, 2].map(|part| {
        Tensor::from_dispatch(<Dispatch as HeadsBackend>::fused_take_heads(
            qkv.clone().into_dispatch(),
            3,
            part,
            heads,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::params::host_values;
    use crate::rng::SeededRng;
    use burn::tensor::{Device, TensorData};

    /// The three parts and the packed input's gradient against the tensor-op split, bit for bit
    /// (copies, and a sum of gradients with disjoint support), on an input that is an
    /// intermediate and on a strided view.
    #[test]
    fn fused_split_matches_the_tensor_ops() {
        let device = Device::flex().autodiff();
        let mut rng = SeededRng::new(8);
        let (b, n, heads, d) = (2, 40, 3, 8);
        let x0 = rng.normals(b * n * 3 * heads * d);
        let g0: Vec<Vec<f32>> = (0..3).map(|_| rng.normals(b * heads * n * d)).collect();
        for transposed in [false, true] {
            let run = |fused: bool| {
                let shape = if transposed { [b, 3 * heads * d, n] } else { [b, n, 3 * heads * d] };
                let x = Tensor::<3>::from_data(TensorData::new(x0.clone(), shape), &device).require_grad();
                let input = if transposed { x.clone().swap_dims(1, 2) } else { x.clone() * 1.0 };
                let parts = if fused { split_qkv(input, heads) } else { split_qkv_ops(input, heads) };
                let loss = parts
                    .iter()
                    .zip(&g0)
                    .map(|(p, g)| {
                        (p.clone()
                            * Tensor::<4>::from_data(TensorData::new(g.clone(), [b, heads, n, d]), &device))
                        .sum()
                    })
                    .reduce(|a, c| a + c)
                    .unwrap();
                let grads = loss.backward();
                (parts.map(host_values), host_values(x.grad(&grads).unwrap()))
            };
            let ((fp, fdx), (tp, tdx)) = (run(true), run(false));
            assert_eq!(fp, tp, "transposed {transposed}: q, k, v");
            assert_eq!(fdx, tdx, "transposed {transposed}: the packed gradient");
        }
    }
}
