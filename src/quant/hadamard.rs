//! HQ-DiT's randomized Hadamard "identity transform" against activation outliers.
//!
//! A linear layer `y = W x` is rewritten as `y = (W R^T)(R x)` with `R = H D`: `D` a diagonal of
//! seeded random signs and `H` a block-diagonal normalized Walsh-Hadamard matrix (blocks of the
//! largest power of two dividing the width, e.g. 128 for DiT-XL/2's 1152 = 9 x 128). `R` is
//! orthogonal, so the full-precision output is unchanged, while `R x` spreads an outlier channel
//! over its whole block and the quantizer sees a flatter distribution. `W R^T` is folded into
//! the weight once (offline: each row `w` becomes `R w`); `R x` is applied online by the layer.
//!
//! The online rotation is the fast Walsh-Hadamard transform, O(n log n), one fused operation
//! with its transpose as the backward: on flex one in-place pass per row (rows are independent,
//! so the result does not depend on the thread count), on wgpu and cuda one CubeCL kernel
//! (`hadamard_cube.rs`: a cube per block, butterflies in shared memory). Elsewhere, and for
//! blocks too wide for shared memory, `log2(block)` butterfly stages of tensor ops. All three
//! run the same butterflies in the same order, so their bits agree.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, DispatchDevice, Flex, backend_extension};
use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::kernels::host::{values_mut, writable};
use crate::rng::SeededRng;

/// A rotation as the student plan records it: enough to rebuild it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HadamardSpec {
    /// Width of the Hadamard blocks (a power of two dividing the layer's input width).
    pub block: usize,
    /// Seed of the random signs.
    pub seed: u64,
}

impl HadamardSpec {
    /// The spec for inputs of `width` features: blocks of the largest power of two dividing it;
    /// `None` for odd widths (no block of two or more fits).
    pub fn for_width(width: usize, seed: u64) -> Option<Self> {
        let block = 1usize << width.trailing_zeros();
        (width > 0 && block >= 2).then_some(Self { block, seed })
    }
}

/// The rotation `x -> H D x` along the last dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct Hadamard {
    pub spec: HadamardSpec,
    /// The diagonal of `D` (+-1), one per input feature.
    signs: Vec<f32>,
}

impl Hadamard {
    /// The rotation of `spec` for inputs of `width` features.
    pub fn new(spec: HadamardSpec, width: usize) -> Self {
        assert!(
            spec.block.is_power_of_two() && width.is_multiple_of(spec.block),
            "Hadamard block {} does not divide width {width}",
            spec.block
        );
        let mut rng = SeededRng::new(spec.seed);
        let signs = (0..width).map(|_| if rng.uniform() < 0.5 { -1.0 } else { 1.0 }).collect();
        Self { spec, signs }
    }

    pub fn width(&self) -> usize {
        self.signs.len()
    }

    /// `R x` along the last dimension of `x`.
    pub fn rotate<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let width = x.dims()[D - 1];
        assert_eq!(
            width,
            self.width(),
            "Hadamard rotation of width {} on inputs of width {width}",
            self.width()
        );
        if has_rotation_kernel(&x.device(), self.spec.block) {
            let out = <Dispatch as HadamardBackend>::hadamard_rotate(
                x.into_dispatch(),
                self.signs.clone(),
                self.spec.block,
                false,
            );
            return Tensor::from_dispatch(out);
        }
        self.rotate_ops(x)
    }

    /// [`Self::rotate`] as tensor ops (every backend; autodiff records each op).
    pub fn rotate_ops<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let width = dims[D - 1];
        let signs = Tensor::<1>::from_data(TensorData::new(self.signs.clone(), [width]), &x.device());
        let x = x * signs.reshape(broadcast_shape::<D>(width));
        let rows: usize = dims[..D - 1].iter().product();
        let y = fwht(x.reshape([rows, width]), self.spec.block);
        y.reshape(dims)
    }
}

/// Whether `device` (with or without autodiff) runs the fused rotation for blocks of `block`.
fn has_rotation_kernel(device: &Device, block: usize) -> bool {
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Flex(_) => true,
        #[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
        DispatchDevice::Cube(_) => block <= super::hadamard_cube::MAX_BLOCK,
        #[allow(unreachable_patterns)]
        _ => {
            let _ = block;
            false
        }
    }
}

#[backend_extension(Autodiff, Flex, Cube: cfg(any(feature = "wgpu", feature = "cuda-runtime")))]
pub trait HadamardBackend: Backend {
    /// `H (signs * x)` over the last dimension in normalized blocks of `block`, or with
    /// `transpose` its transpose `signs * (H x)`.
    fn hadamard_rotate(
        x: FloatTensor<Self>,
        signs: Vec<f32>,
        block: usize,
        transpose: bool,
    ) -> FloatTensor<Self>;
}

/// In place: the normalized Walsh-Hadamard transform of each `block`-wide slice of each row of
/// `rows` (rows of `signs.len()` values), with the signs before it (or after it, for the
/// transpose). The same butterflies in the same order as [`fwht`], so the bits agree: the first
/// three stages run on eight values at a time in registers, the later ones as whole-vector
/// sums and differences of a group's two halves.
#[inline(always)]
fn rotate_rows_body(rows: &mut [f32], signs: &[f32], block: usize, transpose: bool) {
    let norm = (1.0 / (block as f64).sqrt()) as f32;
    for row in rows.chunks_exact_mut(signs.len()) {
        if !transpose {
            row.iter_mut().zip(signs).for_each(|(v, s)| *v *= s);
        }
        for b in row.chunks_exact_mut(block) {
            let mut h = 1;
            if block >= 8 {
                for g in b.chunks_exact_mut(8) {
                    let mut v = [0.0f32; 8];
                    v.copy_from_slice(g);
                    for stage in [1, 2, 4] {
                        for i in (0..8).filter(|i| i & stage == 0) {
                            let (x, y) = (v[i], v[i + stage]);
                            v[i] = x + y;
                            v[i + stage] = x - y;
                        }
                    }
                    g.copy_from_slice(&v);
                }
                h = 8;
            }
            while h < block {
                for group in b.chunks_exact_mut(2 * h) {
                    let (lo, hi) = group.split_at_mut(h);
                    for (a, c) in lo.iter_mut().zip(hi.iter_mut()) {
                        let (x, y) = (*a, *c);
                        *a = x + y;
                        *c = x - y;
                    }
                }
                h *= 2;
            }
            b.iter_mut().for_each(|v| *v *= norm);
        }
        if transpose {
            row.iter_mut().zip(signs).for_each(|(v, s)| *v *= s);
        }
    }
}

crate::kernels::simd_kernel! {
    /// [`rotate_rows_body`] for the widest vector unit the CPU has.
    fn rotate_rows(rows: &mut [f32], signs: &[f32], block: usize, transpose: bool) = rotate_rows_body;
}

impl HadamardBackend for Flex {
    /// In `x`'s own memory when nothing else holds it, else in one copy; rows in parallel.
    fn hadamard_rotate(x: FlexTensor, signs: Vec<f32>, block: usize, transpose: bool) -> FlexTensor {
        let mut x = writable(x);
        let width = signs.len();
        let values = values_mut(&mut x).expect("writable tensor");
        values.par_chunks_mut(width * 16).for_each(|rows| rotate_rows(rows, &signs, block, transpose));
        x
    }
}

#[derive(Debug)]
struct HadamardBackward {
    signs: Vec<f32>,
    block: usize,
    transpose: bool,
}

impl<B: HadamardBackend> Backward<B, 1> for HadamardBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node {
            // The rotation is orthogonal: its gradient is its transpose.
            grads.register::<B>(node.id, B::hadamard_rotate(grad, self.signs, self.block, !self.transpose));
        }
    }
}

impl<B: HadamardBackend, C: CheckpointStrategy> HadamardBackend for Autodiff<B, C> {
    fn hadamard_rotate(
        x: FloatTensor<Self>,
        signs: Vec<f32>,
        block: usize,
        transpose: bool,
    ) -> FloatTensor<Self> {
        let out = B::hadamard_rotate(x.primitive().clone(), signs.clone(), block, transpose);
        HadamardBackward { signs, block, transpose }.prepare::<C>([x.node()]).compute_bound().stateless(out)
    }
}

/// `[1, .., 1, width]`.
fn broadcast_shape<const D: usize>(width: usize) -> [usize; D] {
    let mut shape = [1; D];
    shape[D - 1] = width;
    shape
}

/// The normalized Walsh-Hadamard transform of each `block`-wide slice of each row of `x`
/// (`[rows, width]`): stage `h` pairs element `i` with `i + h` inside every `2h`-wide group and
/// replaces them by their sum and difference; the `1 / sqrt(block)` makes it orthogonal.
fn fwht(x: Tensor<2>, block: usize) -> Tensor<2> {
    let [rows, width] = x.dims();
    let mut y = x;
    let mut h = 1;
    while h < block {
        let groups = width / (2 * h);
        let pairs = y.reshape([rows, groups, 2, h]);
        let a = pairs.clone().narrow(2, 0, 1);
        let b = pairs.narrow(2, 1, 1);
        y = Tensor::cat(vec![a.clone() + b.clone(), a - b], 2).reshape([rows, width]);
        h *= 2;
    }
    y * (1.0 / (block as f64).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        crate::base::params::host_values(t)
    }

    /// The dense block-diagonal Hadamard matrix (Sylvester's construction), normalized.
    fn dense(width: usize, block: usize) -> Vec<f32> {
        let mut h = vec![1.0f32];
        let mut n = 1;
        while n < block {
            let mut next = vec![0.0; 4 * n * n];
            for i in 0..n {
                for j in 0..n {
                    let v = h[i * n + j];
                    next[i * 2 * n + j] = v;
                    next[i * 2 * n + j + n] = v;
                    next[(i + n) * 2 * n + j] = v;
                    next[(i + n) * 2 * n + j + n] = -v;
                }
            }
            h = next;
            n *= 2;
        }
        let norm = 1.0 / (block as f32).sqrt();
        let mut out = vec![0.0; width * width];
        for b in 0..width / block {
            for i in 0..block {
                for j in 0..block {
                    out[(b * block + i) * width + b * block + j] = h[i * block + j] * norm;
                }
            }
        }
        out
    }

    #[test]
    fn blocks_are_the_largest_power_of_two_dividing_the_width() {
        assert_eq!(HadamardSpec::for_width(1152, 0).unwrap().block, 128); // DiT-XL/2: 9 x 128
        assert_eq!(HadamardSpec::for_width(4608, 0).unwrap().block, 512);
        assert_eq!(HadamardSpec::for_width(32, 0).unwrap().block, 32);
        assert_eq!(HadamardSpec::for_width(12, 0).unwrap().block, 4);
        assert_eq!(HadamardSpec::for_width(9, 0), None);
    }

    /// The butterflies equal the dense block-diagonal matrix times the signed input, and the
    /// rotation is orthogonal: norms are kept and rotating the rows of W keeps W x.
    #[test]
    fn fast_transform_matches_the_dense_matrix_and_keeps_products() {
        let device = Device::flex();
        let (rows, width) = (3, 24);
        let spec = HadamardSpec::for_width(width, 5).unwrap();
        assert_eq!(spec.block, 8);
        let r = Hadamard::new(spec, width);
        assert!(r.signs.iter().any(|&s| s < 0.0) && r.signs.iter().any(|&s| s > 0.0));
        let x0 = SeededRng::new(1).normals(rows * width);
        let x = Tensor::<2>::from_data(TensorData::new(x0.clone(), [rows, width]), &device);
        let fast = host(r.rotate(x.clone()));
        let h = dense(width, spec.block);
        for row in 0..rows {
            for i in 0..width {
                let want: f32 = (0..width).map(|j| h[i * width + j] * r.signs[j] * x0[row * width + j]).sum();
                assert!(
                    (fast[row * width + i] - want).abs() < 1e-5,
                    "row {row} [{i}]: {} vs {want}",
                    fast[row * width + i]
                );
            }
        }
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&fast) - norm(&x0)).abs() < 1e-4 * norm(&x0));
        let w = Tensor::<2>::from_data(
            TensorData::new(SeededRng::new(2).normals(5 * width), [5, width]),
            &device,
        );
        let plain = host(x.clone().matmul(w.clone().transpose()));
        let rotated = host(r.rotate(x).matmul(r.rotate(w).transpose()));
        for (a, b) in plain.iter().zip(&rotated) {
            assert!((a - b).abs() < 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
        }
    }

    /// Every linear layer of a DiT rotated (attention qkv and proj and the MLP on token inputs
    /// `[B, N, D]`, adaLN modulation, the timestep embedding and the final layer on `[B, D]`):
    /// the full-precision output stays within 1e-5.
    #[test]
    fn rotating_every_linear_layer_of_a_dit_keeps_its_output() {
        use crate::models::Denoiser;
        use crate::models::{ModelConfig, ModelKind};
        use burn::tensor::Int;
        let device = Device::flex();
        let mut cfg = ModelConfig { kind: ModelKind::TinyDit, ..Default::default() };
        (cfg.dit.hidden, cfg.dit.depth, cfg.dit.heads) = (32, 2, 2);
        let build = || {
            let m = Denoiser::new(&cfg, &mut SeededRng::new(3), &device);
            // Wake up the zero-initialised (adaLN-Zero) layers.
            crate::base::params::map_params(m, |_, t| {
                let v: Vec<f32> = host(t.clone())
                    .iter()
                    .enumerate()
                    .map(|(i, x)| x + 0.05 * (i as f32 * 0.37).sin())
                    .collect();
                let n = v.len();
                Tensor::from_data(TensorData::new(v, [n]), &t.device())
            })
        };
        let plain = build();
        let mut rotated = build();
        let mut kinds = Vec::new();
        for (i, mut site) in rotated.quant_sites().into_iter().enumerate() {
            if let crate::nn::site::LayerMut::Linear(_) = site.layer {
                let spec = HadamardSpec::for_width(site.layer.weight_dims()[1], i as u64).unwrap();
                site.layer.set_hadamard(spec).unwrap();
                kinds.push(site.path.rsplit('.').next().unwrap().to_string());
            }
        }
        for kind in ["qkv", "proj", "fc1", "fc2", "ada_ln", "t_embed_1", "final_linear"] {
            assert!(kinds.iter().any(|k| k == kind), "{kind} rotated ({kinds:?})");
        }
        let x = Tensor::<4>::from_data(
            TensorData::new(SeededRng::new(4).normals(2 * 1024), [2, 1, 32, 32]),
            &device,
        );
        let (t, y) = (
            Tensor::<1>::from_floats([250.0, 750.0], &device),
            Tensor::<1, Int>::from_ints([1, 10], &device),
        );
        let ctx = crate::nn::StepCtx::default();
        let a = host(plain.forward(x.clone(), t.clone(), y.clone(), &ctx));
        let b = host(rotated.forward(x, t, y, &ctx));
        let scale = a.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-5 * scale, "max |plain - rotated| = {diff} (scale {scale})");
        assert!(a.iter().any(|v| v.abs() > 1e-3), "a non-trivial output");
    }

    /// What the rotation is for: one outlier feature (50x) forces a coarse per-tensor FP4 scale
    /// on every other feature; rotated, the outlier is spread over its block and the same
    /// quantizer's error (measured back in the original basis) drops several-fold.
    #[test]
    fn rotation_lowers_the_fp4_error_of_an_input_with_an_outlier_feature() {
        use crate::quant::Format;
        let device = Device::flex();
        let (rows, width) = (64, 64);
        let mut x0 = SeededRng::new(6).normals(rows * width);
        for r in 0..rows {
            x0[r * width + 5] *= 50.0;
        }
        let x = Tensor::<2>::from_data(TensorData::new(x0.clone(), [rows, width]), &device);
        let e2m1 = Format::parse("e2m1").unwrap();
        let quantize = |v: Tensor<2>| {
            let scale = v.clone().abs().max().into_scalar::<f32>() / 6.0;
            let s = Tensor::<2>::from_data(TensorData::new(vec![scale], [1, 1]), &device);
            crate::quant::fake_quantize(v, &e2m1, s, None)
        };
        let mse =
            |q: Vec<f32>| q.iter().zip(&x0).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / x0.len() as f32;
        let direct = mse(host(quantize(x.clone())));
        let r = Hadamard::new(HadamardSpec::for_width(width, 1).unwrap(), width);
        // Back to the original basis: R^T y = D H y (H is symmetric, D its own inverse).
        let q = quantize(r.rotate(x));
        let back =
            fwht(q, width) * Tensor::<2>::from_data(TensorData::new(r.signs.clone(), [1, width]), &device);
        let rotated = mse(host(back));
        assert!(rotated * 3.0 < direct, "rotated {rotated} vs direct {direct}");
    }

    /// The fused flex rotation against the tensor-op version: the same bits forward (also on a
    /// transposed view), the same gradient (its transpose) within rounding.
    #[test]
    fn fused_rotation_matches_the_tensor_version() {
        let device = Device::flex().autodiff();
        let r = Hadamard::new(HadamardSpec::for_width(48, 9).unwrap(), 48);
        let x0 = SeededRng::new(3).normals(2 * 5 * 48);
        let g0 = SeededRng::new(4).normals(2 * 5 * 48);
        let run = |fused: bool| {
            let x = Tensor::<3>::from_data(TensorData::new(x0.clone(), [2, 5, 48]), &device).require_grad();
            let y = if fused { r.rotate(x.clone()) } else { r.rotate_ops(x.clone()) };
            let g = Tensor::<3>::from_data(TensorData::new(g0.clone(), [2, 5, 48]), &device);
            let grads = (y.clone() * g).sum().backward();
            (host(y), host(x.grad(&grads).unwrap()))
        };
        let ((fy, fdx), (ty, tdx)) = (run(true), run(false));
        assert_eq!(fy, ty, "forward bits");
        for (a, b) in fdx.iter().zip(&tdx) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
        let flex = Device::flex();
        let view = Tensor::<2>::from_data(TensorData::new(x0[..48 * 4].to_vec(), [48, 4]), &flex).transpose();
        assert_eq!(host(r.rotate(view.clone())), host(r.rotate_ops(view)), "a transposed view");
    }

    #[test]
    fn signs_are_seeded() {
        let a = Hadamard::new(HadamardSpec { block: 4, seed: 3 }, 16);
        assert_eq!(a, Hadamard::new(HadamardSpec { block: 4, seed: 3 }, 16));
        assert_ne!(a.signs, Hadamard::new(HadamardSpec { block: 4, seed: 4 }, 16).signs);
    }
}
