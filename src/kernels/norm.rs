//! GroupNorm (optionally followed by SiLU, as every UNet block uses it) and LayerNorm without
//! affine (DiT's adaLN supplies it) as one pass for the statistics and one for the output on
//! flex, with the closed-form backward: for `xh = (x - mean) rstd` and `dxh` the gradient of
//! the normalised value, `dx = rstd (dxh - mean(dxh) - xh mean(dxh xh))` over each group/row.

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

use super::host::{tensor, values, values_mut, writable};
use super::{math, simd_kernel};

/// Independent partial sums, so that the reductions vectorise (a fixed order: same bits on
/// every machine and thread count).
const LANES: usize = 8;

#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn sum_run(xs: &[f32], shift: f32) -> (f32, f32) {
    let (mut s, mut q) = ([0.0f32; LANES], [0.0f32; LANES]);
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let d = c[l] - shift;
            s[l] += d;
            q[l] += d * d;
        }
    }
    for (l, &v) in rest.iter().enumerate() {
        let d = v - shift;
        s[l] += d;
        q[l] += d * d;
    }
    (s.iter().sum(), q.iter().sum())
}
simd_kernel!(
    /// `(sum(x - shift), sum((x - shift)^2))` over `xs`.
    fn sums(xs: &[f32], shift: f32) -> (f32, f32) = sum_run;
);

/// `(mean, 1 / sqrt(var + eps))` of `xs`: the mean first, then the variance around it.
fn moments(xs: &[f32], eps: f64) -> (f32, f32) {
    let n = xs.len() as f32;
    let mean = sums(xs, 0.0).0 / n;
    let (s, q) = sums(xs, mean);
    // sum(x - mean) is ~0 but not exactly: the correction keeps var = E[(x - m)^2] exact.
    let var = (q - s * s / n) / n;
    (mean, 1.0 / ((var.max(0.0) as f64 + eps).sqrt() as f32))
}

/// `out = ((x - mean) rstd) a + b`, then SiLU when `silu`.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn affine_run(xs: &mut [f32], mean: f32, rstd: f32, a: f32, b: f32, silu: bool) {
    if silu {
        for i in 0..xs.len() {
            let v = (xs[i] - mean) * rstd * a + b;
            xs[i] = v * math::sigmoid(v);
        }
    } else {
        for i in 0..xs.len() {
            xs[i] = (xs[i] - mean) * rstd * a + b;
        }
    }
}
simd_kernel!(fn affine(xs: &mut [f32], mean: f32, rstd: f32, a: f32, b: f32, silu: bool) = affine_run;);

/// One channel's backward, first pass: `g` becomes the gradient of the normalised-and-scaled
/// value (through SiLU when `silu`); returns `(sum(g), sum(g xh))` for this channel.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn grad_sums_run(g: &mut [f32], xs: &[f32], mean: f32, rstd: f32, a: f32, b: f32, silu: bool) -> (f32, f32) {
    let n = g.len().min(xs.len());
    let (g, xs) = (&mut g[..n], &xs[..n]);
    if silu {
        for i in 0..n {
            let v = (xs[i] - mean) * rstd * a + b;
            let s = math::sigmoid(v);
            g[i] *= s + v * s * (1.0 - s);
        }
    }
    let (mut sg, mut sgx) = ([0.0f32; LANES], [0.0f32; LANES]);
    let whole = n - n % LANES;
    for c in (0..whole).step_by(LANES) {
        for l in 0..LANES {
            let gy = g[c + l];
            sg[l] += gy;
            sgx[l] += gy * ((xs[c + l] - mean) * rstd);
        }
    }
    for i in whole..n {
        sg[i - whole] += g[i];
        sgx[i - whole] += g[i] * ((xs[i] - mean) * rstd);
    }
    (sg.iter().sum(), sgx.iter().sum())
}
simd_kernel!(
    fn grad_sums(g: &mut [f32], xs: &[f32], mean: f32, rstd: f32, a: f32, b: f32, silu: bool) -> (f32, f32)
        = grad_sums_run;
);

/// Second pass: `g` (the first pass's output) becomes `dx = rstd (g a - ma - xh mb)`.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn grad_input_run(g: &mut [f32], xs: &[f32], mean: f32, rstd: f32, a: f32, ma: f32, mb: f32) {
    let n = g.len().min(xs.len());
    let (g, xs) = (&mut g[..n], &xs[..n]);
    for i in 0..n {
        let xh = (xs[i] - mean) * rstd;
        g[i] = rstd * (g[i] * a - ma - xh * mb);
    }
}
simd_kernel!(fn grad_input(g: &mut [f32], xs: &[f32], mean: f32, rstd: f32, a: f32, ma: f32, mb: f32) = grad_input_run;);

/// `y = ((x - mean) rstd) (1 + scale) + shift` per channel (DiT's adaLN modulation).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn modulate_run(row: &mut [f32], mean: f32, rstd: f32, scale: &[f32], shift: &[f32]) {
    let n = row.len().min(scale.len()).min(shift.len());
    for i in 0..n {
        row[i] = (row[i] - mean) * rstd * (1.0 + scale[i]) + shift[i];
    }
}
simd_kernel!(fn modulate(row: &mut [f32], mean: f32, rstd: f32, scale: &[f32], shift: &[f32]) = modulate_run;);

/// The modulated LayerNorm's backward for one row: adds this row's terms to `dshift` (`g`) and
/// `dscale` (`g xh`), and overwrites `g` with `dx`.
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
#[inline(always)]
fn modulate_grad_run(
    g: &mut [f32],
    x: &[f32],
    mean: f32,
    rstd: f32,
    scale: &[f32],
    dshift: &mut [f32],
    dscale: &mut [f32],
) {
    let n = g.len().min(x.len()).min(scale.len()).min(dshift.len()).min(dscale.len());
    let (mut s1, mut s2) = ([0.0f32; LANES], [0.0f32; LANES]);
    for i in 0..n {
        let xh = (x[i] - mean) * rstd;
        dshift[i] += g[i];
        dscale[i] += g[i] * xh;
        let dxh = g[i] * (1.0 + scale[i]);
        g[i] = dxh;
        s1[i % LANES] += dxh;
        s2[i % LANES] += dxh * xh;
    }
    let (ma, mb) = (s1.iter().sum::<f32>() / n as f32, s2.iter().sum::<f32>() / n as f32);
    for i in 0..n {
        let xh = (x[i] - mean) * rstd;
        g[i] = rstd * (g[i] - ma - xh * mb);
    }
}
simd_kernel!(
    fn modulate_grad(g: &mut [f32], x: &[f32], mean: f32, rstd: f32, scale: &[f32], dshift: &mut [f32], dscale: &mut [f32])
        = modulate_grad_run;
);

/// What the modulated LayerNorm's backward needs besides the gradient.
#[derive(Debug, Clone)]
struct ModulateState {
    x: FlexTensor,
    scale: Vec<f32>,
    stats: Vec<(f32, f32)>,
}

/// `[B, N, C]` with per-sample `[B, C]` shift and scale: the output (in `x`'s memory when nobody
/// else holds it) and each row's `(mean, rstd)`. Samples run in parallel.
fn modulate_forward(x: FlexTensor, shift: &[f32], scale: &[f32], eps: f64) -> (FlexTensor, Vec<(f32, f32)>) {
    let shape = x.layout().shape().to_vec();
    let (n, c) = (shape[1], shape[2]);
    let mut out = writable(x);
    let ys = values_mut(&mut out).expect("writable tensor");
    let stats = ys
        .par_chunks_mut((n * c).max(1))
        .enumerate()
        .flat_map_iter(|(b, sample)| {
            let (sc, sh) = (&scale[b * c..(b + 1) * c], &shift[b * c..(b + 1) * c]);
            sample
                .chunks_mut(c)
                .map(|row| {
                    let (mean, rstd) = moments(row, eps);
                    modulate(row, mean, rstd, sc, sh);
                    (mean, rstd)
                })
                .collect::<Vec<_>>()
        })
        .collect();
    (out, stats)
}

/// `(dx, dshift, dscale)`.
fn modulate_backward(grad: FlexTensor, st: &ModulateState) -> (FlexTensor, FlexTensor, FlexTensor) {
    let shape = st.x.layout().shape().to_vec();
    let (batch, n, c) = (shape[0], shape[1], shape[2]);
    let xs = values(&st.x);
    let mut dx = writable(grad);
    let gs = values_mut(&mut dx).expect("writable tensor");
    let (mut dshift, mut dscale) = (vec![0.0f32; batch * c], vec![0.0f32; batch * c]);
    gs.par_chunks_mut((n * c).max(1))
        .zip(xs.par_chunks((n * c).max(1)))
        .zip(dshift.par_chunks_mut(c.max(1)).zip(dscale.par_chunks_mut(c.max(1))))
        .enumerate()
        .for_each(|(b, ((g, x), (dsh, dsc)))| {
            let sc = &st.scale[b * c..(b + 1) * c];
            for (r, (gr, xr)) in g.chunks_mut(c).zip(x.chunks(c)).enumerate() {
                let (mean, rstd) = st.stats[b * n + r];
                modulate_grad(gr, xr, mean, rstd, sc, dsh, dsc);
            }
        });
    (dx, tensor(dshift, &[batch, c]), tensor(dscale, &[batch, c]))
}

/// What the GroupNorm backward needs besides the gradient.
#[derive(Debug, Clone)]
struct GroupNormState {
    x: FlexTensor,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    /// Per (sample, group): mean and 1 / std.
    stats: Vec<(f32, f32)>,
    groups: usize,
    silu: bool,
}

/// `[B, C, ..]` as (B, C, elements per channel).
fn channel_layout(x: &FlexTensor) -> (usize, usize, usize) {
    let shape = x.layout().shape();
    let (b, c) = (shape[0], shape[1]);
    (b, c, x.layout().num_elements() / (b * c).max(1))
}

/// The output in `x`'s own memory when nobody else holds it (inference), else in a copy; and
/// each (sample, group)'s `(mean, rstd)`.
fn group_norm_forward(
    x: FlexTensor,
    gamma: &[f32],
    beta: &[f32],
    groups: usize,
    eps: f64,
    silu: bool,
) -> (FlexTensor, Vec<(f32, f32)>) {
    let (_, c, s) = channel_layout(&x);
    let per_group = c / groups;
    let mut out = writable(x);
    let ys = values_mut(&mut out).expect("writable tensor");
    let stats: Vec<(f32, f32)> = ys
        .par_chunks_mut(per_group * s)
        .enumerate()
        .map(|(i, y)| {
            let (mean, rstd) = moments(y, eps);
            let first = (i % groups) * per_group;
            for (k, ch) in y.chunks_mut(s).enumerate() {
                affine(ch, mean, rstd, gamma[first + k], beta[first + k], silu);
            }
            (mean, rstd)
        })
        .collect();
    (out, stats)
}

/// `(dx, dgamma, dbeta)`.
fn group_norm_backward(grad: FlexTensor, st: &GroupNormState) -> (FlexTensor, FlexTensor, FlexTensor) {
    let (batch, c, s) = channel_layout(&st.x);
    let per_group = c / st.groups;
    let xs = values(&st.x);
    let mut dx = writable(grad);
    let gs = values_mut(&mut dx).expect("writable tensor");
    // Per (sample, channel): (sum g, sum g xh), in the order the channels come.
    let sums: Vec<Vec<(f32, f32)>> = gs
        .par_chunks_mut(per_group * s)
        .zip(xs.par_chunks(per_group * s))
        .enumerate()
        .map(|(i, (g, x))| {
            let (mean, rstd) = st.stats[i];
            let first = (i % st.groups) * per_group;
            let sums: Vec<(f32, f32)> = g
                .chunks_mut(s)
                .zip(x.chunks(s))
                .enumerate()
                .map(|(k, (gc, xc))| {
                    let ci = first + k;
                    grad_sums(gc, xc, mean, rstd, st.gamma[ci], st.beta[ci], st.silu)
                })
                .collect();
            let n = (per_group * s) as f32;
            let ma = sums.iter().enumerate().map(|(k, p)| p.0 * st.gamma[first + k]).sum::<f32>() / n;
            let mb = sums.iter().enumerate().map(|(k, p)| p.1 * st.gamma[first + k]).sum::<f32>() / n;
            for (k, (gc, xc)) in g.chunks_mut(s).zip(x.chunks(s)).enumerate() {
                grad_input(gc, xc, mean, rstd, st.gamma[first + k], ma, mb);
            }
            sums
        })
        .collect();
    let (mut dgamma, mut dbeta) = (vec![0.0f32; c], vec![0.0f32; c]);
    for (i, part) in sums.iter().enumerate() {
        let first = (i % st.groups) * per_group;
        for (k, &(sg, sgx)) in part.iter().enumerate() {
            dbeta[first + k] += sg;
            dgamma[first + k] += sgx;
        }
    }
    debug_assert_eq!(sums.len(), batch * st.groups);
    (dx, tensor(dgamma, &[c]), tensor(dbeta, &[c]))
}

/// What the LayerNorm backward needs besides the gradient.
#[derive(Debug, Clone)]
struct LayerNormState {
    x: FlexTensor,
    stats: Vec<(f32, f32)>,
}

/// Rows of the last dimension per parallel work item (fixed: the same split on any thread count).
const ROWS: usize = 64;

fn layer_norm_forward(x: FlexTensor, eps: f64) -> (FlexTensor, Vec<(f32, f32)>) {
    let d = *x.layout().shape().last().expect("a dimension");
    let mut out = writable(x);
    let ys = values_mut(&mut out).expect("writable tensor");
    let stats = ys
        .par_chunks_mut(ROWS * d)
        .flat_map_iter(|y| {
            y.chunks_mut(d)
                .map(|row| {
                    let (mean, rstd) = moments(row, eps);
                    affine(row, mean, rstd, 1.0, 0.0, false);
                    (mean, rstd)
                })
                .collect::<Vec<_>>()
        })
        .collect();
    (out, stats)
}

fn layer_norm_backward(grad: FlexTensor, st: &LayerNormState) -> FlexTensor {
    let d = *st.x.layout().shape().last().expect("a dimension");
    let xs = values(&st.x);
    let mut dx = writable(grad);
    let gs = values_mut(&mut dx).expect("writable tensor");
    gs.par_chunks_mut(ROWS * d).zip(xs.par_chunks(ROWS * d)).enumerate().for_each(|(c, (g, x))| {
        for (r, (gr, xr)) in g.chunks_mut(d).zip(x.chunks(d)).enumerate() {
            let (mean, rstd) = st.stats[c * ROWS + r];
            let (sg, sgx) = grad_sums(gr, xr, mean, rstd, 1.0, 0.0, false);
            grad_input(gr, xr, mean, rstd, 1.0, sg / d as f32, sgx / d as f32);
        }
    });
    dx
}

#[backend_extension(Autodiff, Flex)]
pub trait NormBackend: Backend {
    /// GroupNorm over `[B, C, ..]` with per-channel affine, then SiLU when `silu`.
    fn fused_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self>;

    /// LayerNorm over the last dimension, no affine.
    fn fused_layer_norm(x: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;

    /// `layer_norm(x) (1 + scale) + shift` for `x: [B, N, C]`, `shift, scale: [B, C]`.
    fn fused_layer_norm_modulate(
        x: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
}

impl NormBackend for Flex {
    fn fused_group_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FlexTensor {
        group_norm_forward(x, &values(&gamma), &values(&beta), groups, eps, silu).0
    }

    fn fused_layer_norm(x: FlexTensor, eps: f64) -> FlexTensor {
        layer_norm_forward(x, eps).0
    }

    fn fused_layer_norm_modulate(
        x: FlexTensor,
        shift: FlexTensor,
        scale: FlexTensor,
        eps: f64,
    ) -> FlexTensor {
        modulate_forward(x, &values(&shift), &values(&scale), eps).0
    }
}

/// A normalisation with two per-channel parameter tensors besides its input (GroupNorm's gamma
/// and beta, adaLN's shift and scale): its saved state gives all three gradients.
trait AffineNormState: Clone + Send + std::fmt::Debug + 'static {
    /// `(dx, d first parameter, d second parameter)`.
    fn grads(&self, grad: FlexTensor) -> (FlexTensor, FlexTensor, FlexTensor);
}

impl AffineNormState for GroupNormState {
    fn grads(&self, grad: FlexTensor) -> (FlexTensor, FlexTensor, FlexTensor) {
        group_norm_backward(grad, self)
    }
}

impl AffineNormState for ModulateState {
    fn grads(&self, grad: FlexTensor) -> (FlexTensor, FlexTensor, FlexTensor) {
        modulate_backward(grad, self)
    }
}

/// The backward of GroupNorm (state [`GroupNormState`]) or adaLN ([`ModulateState`]).
#[derive(Debug)]
struct AffineNormBackward<S>(std::marker::PhantomData<S>);

impl<S: AffineNormState> AffineNormBackward<S> {
    fn new() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<S: AffineNormState> Backward<Flex, 3> for AffineNormBackward<S> {
    type State = S;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_a, node_b] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (dx, da, db) = ops.state.grads(grad);
        for (node, g) in [(node_x, dx), (node_a, da), (node_b, db)] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 1> for LayerNormBackward {
    type State = LayerNormState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(node) = node {
            grads.register::<Flex>(node.id, layer_norm_backward(grad, &ops.state));
        }
    }
}

impl<C: CheckpointStrategy> NormBackend for Autodiff<Flex, C> {
    fn fused_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        let (g, b) = (values(gamma.primitive()).into_owned(), values(beta.primitive()).into_owned());
        let prep =
            AffineNormBackward::<GroupNormState>::new().prepare::<C>([x.node(), gamma.node(), beta.node()]);
        match prep.compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let x = x.primitive().clone();
                let (out, stats) = group_norm_forward(x.clone(), &g, &b, groups, eps, silu);
                prep.finish(GroupNormState { x, gamma: g, beta: b, stats, groups, silu }, out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(group_norm_forward(x.into_primitive(), &g, &b, groups, eps, silu).0)
            }
        }
    }

    fn fused_layer_norm(x: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        match LayerNormBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let x = x.primitive().clone();
                let (out, stats) = layer_norm_forward(x.clone(), eps);
                prep.finish(LayerNormState { x, stats }, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(layer_norm_forward(x.into_primitive(), eps).0),
        }
    }

    fn fused_layer_norm_modulate(
        x: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        let (sh, sc) = (values(shift.primitive()).into_owned(), values(scale.primitive()).into_owned());
        match AffineNormBackward::<ModulateState>::new()
            .prepare::<C>([x.node(), shift.node(), scale.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let x = x.primitive().clone();
                let (out, stats) = modulate_forward(x.clone(), &sh, &sc, eps);
                prep.finish(ModulateState { x, scale: sc, stats }, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(modulate_forward(x.into_primitive(), &sh, &sc, eps).0),
        }
    }
}

/// GroupNorm as burn's tensor ops (every backend but flex, and the reference in tests).
pub fn group_norm_ops(x: Tensor<4>, gamma: Tensor<1>, beta: Tensor<1>, groups: usize, eps: f64) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let xg = x.reshape([b, groups, (c / groups) * h * w]);
    let mean = xg.clone().mean_dim(2);
    let centered = xg - mean;
    let var = centered.clone().square().mean_dim(2);
    let normed = (centered / (var + eps).sqrt()).reshape([b, c, h, w]);
    normed * gamma.reshape([1, c, 1, 1]) + beta.reshape([1, c, 1, 1])
}

/// GroupNorm of `[B, C, H, W]` with per-channel affine, followed by SiLU when `silu`.
pub fn group_norm(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Tensor<4> {
    #[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
    if super::on_cube(&x.device()) {
        return super::norm_cube::group_norm(x, gamma, beta, groups, eps, silu);
    }
    if !super::on_flex(&x.device()) {
        let y = group_norm_ops(x, gamma, beta, groups, eps);
        return if silu {
            super::activation::activate_ops(y, super::activation::Activation::Silu)
        } else {
            y
        };
    }
    Tensor::from_dispatch(<Dispatch as NormBackend>::fused_group_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        groups,
        eps,
        silu,
    ))
}

/// LayerNorm over the last dimension without affine, as burn's tensor ops.
pub fn layer_norm_ops<const D: usize>(x: Tensor<D>, eps: f64) -> Tensor<D> {
    let mean = x.clone().mean_dim(D - 1);
    let centered = x - mean;
    let var = centered.clone().square().mean_dim(D - 1);
    centered / (var + eps).sqrt()
}

/// LayerNorm over the last dimension without affine.
pub fn layer_norm<const D: usize>(x: Tensor<D>, eps: f64) -> Tensor<D> {
    #[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
    if super::on_cube(&x.device()) {
        return super::norm_cube::layer_norm(x, eps);
    }
    if !super::on_flex(&x.device()) {
        return layer_norm_ops(x, eps);
    }
    Tensor::from_dispatch(<Dispatch as NormBackend>::fused_layer_norm(x.into_dispatch(), eps))
}

/// `layer_norm(x) (1 + scale) + shift` as burn's tensor ops.
pub fn layer_norm_modulate_ops(x: Tensor<3>, shift: Tensor<2>, scale: Tensor<2>, eps: f64) -> Tensor<3> {
    layer_norm_ops(x, eps) * (scale.unsqueeze_dim::<3>(1) + 1.0) + shift.unsqueeze_dim::<3>(1)
}

/// DiT's adaLN: LayerNorm without affine over `[B, N, C]`, then `* (1 + scale) + shift` with
/// per-sample `[B, C]` modulation broadcast over the tokens; one fused pass on flex.
pub fn layer_norm_modulate(x: Tensor<3>, shift: Tensor<2>, scale: Tensor<2>, eps: f64) -> Tensor<3> {
    if !super::on_flex(&x.device()) {
        return layer_norm_modulate_ops(x, shift, scale, eps);
    }
    Tensor::from_dispatch(<Dispatch as NormBackend>::fused_layer_norm_modulate(
        x.into_dispatch(),
        shift.into_dispatch(),
        scale.into_dispatch(),
        eps,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::params::host_values;
    use crate::kernels::activation::{Activation, activate_ops};
    use crate::rng::SeededRng;
    use burn::tensor::{Device, TensorData};

    fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len());
        for (i, (a, b)) in a.iter().zip(b).enumerate() {
            assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what}[{i}]: {a} vs {b}");
        }
    }

    /// Values and the three gradients of the fused GroupNorm (with and without SiLU) against
    /// the tensor ops, on an input with a large common offset and one transposed (strided).
    #[test]
    fn fused_group_norm_matches_the_tensor_ops() {
        let device = Device::flex().autodiff();
        let mut rng = SeededRng::new(9);
        let shape = [3, 12, 5, 7];
        let n: usize = shape.iter().product();
        let x0: Vec<f32> =
            rng.normals(n).iter().enumerate().map(|(i, v)| v * 2.0 + (i % 3) as f32 + 4.0).collect();
        let (g0, b0) = (rng.normals(12), rng.normals(12));
        let up = rng.normals(n);
        for (silu, transposed) in [(false, false), (true, false), (true, true)] {
            let run = |fused: bool| {
                let t = |v: &[f32], s: [usize; 1]| {
                    Tensor::<1>::from_data(TensorData::new(v.to_vec(), s), &device)
                };
                let x = Tensor::<4>::from_data(TensorData::new(x0.clone(), shape), &device).require_grad();
                let (gamma, beta) = (t(&g0, [12]).require_grad(), t(&b0, [12]).require_grad());
                let input = if transposed { x.clone().swap_dims(2, 3) } else { x.clone() };
                let y = if fused {
                    group_norm(input, gamma.clone(), beta.clone(), 4, 1e-5, silu)
                } else {
                    let y = group_norm_ops(input, gamma.clone(), beta.clone(), 4, 1e-5);
                    if silu { activate_ops(y, Activation::Silu) } else { y }
                };
                let dims = y.dims();
                let up = Tensor::<1>::from_data(TensorData::new(up.clone(), [n]), &device).reshape(dims);
                let grads = (y.clone() * up).sum().backward();
                let grad = |p: Tensor<1>| host_values(p.grad(&grads).unwrap());
                (host_values(y), host_values(x.grad(&grads).unwrap()), grad(gamma), grad(beta))
            };
            let (f, t) = (run(true), run(false));
            let what = format!("silu {silu}, transposed {transposed}");
            close(&f.0, &t.0, 1e-5, &format!("{what}: y"));
            close(&f.1, &t.1, 2e-4, &format!("{what}: dx"));
            close(&f.2, &t.2, 1e-4, &format!("{what}: dgamma"));
            close(&f.3, &t.3, 1e-4, &format!("{what}: dbeta"));
        }
    }

    /// The modulated LayerNorm against the tensor ops, with shift and scale as strided column
    /// views of one projection (as DiT's `chunk` gives them): values and all three gradients.
    #[test]
    fn fused_layer_norm_modulate_matches_the_tensor_ops() {
        let device = Device::flex().autodiff();
        let mut rng = SeededRng::new(14);
        let (b, n, c) = (3, 70, 16);
        let x0: Vec<f32> = rng.normals(b * n * c).iter().map(|v| v * 2.0 + 3.0).collect();
        let m0 = rng.normals(b * 2 * c);
        let up = rng.normals(b * n * c);
        let run = |fused: bool| {
            let x = Tensor::<3>::from_data(TensorData::new(x0.clone(), [b, n, c]), &device).require_grad();
            let mods =
                Tensor::<2>::from_data(TensorData::new(m0.clone(), [b, 2 * c]), &device).require_grad();
            let [shift, scale]: [Tensor<2>; 2] = mods.clone().chunk(2, 1).try_into().unwrap();
            let y = if fused {
                layer_norm_modulate(x.clone(), shift, scale, 1e-6)
            } else {
                layer_norm_modulate_ops(x.clone(), shift, scale, 1e-6)
            };
            let up = Tensor::<3>::from_data(TensorData::new(up.clone(), [b, n, c]), &device);
            let grads = (y.clone() * up).sum().backward();
            (host_values(y), host_values(x.grad(&grads).unwrap()), host_values(mods.grad(&grads).unwrap()))
        };
        let (f, t) = (run(true), run(false));
        close(&f.0, &t.0, 1e-5, "y");
        close(&f.1, &t.1, 2e-4, "dx");
        close(&f.2, &t.2, 1e-4, "dshift/dscale");
    }

    #[test]
    fn fused_layer_norm_matches_the_tensor_ops() {
        let device = Device::flex().autodiff();
        let mut rng = SeededRng::new(4);
        // 130 rows: more than one parallel block of rows, the last one partial.
        let shape = [2, 65, 24];
        let n: usize = shape.iter().product();
        let x0: Vec<f32> = rng.normals(n).iter().map(|v| v * 3.0 + 10.0).collect();
        let up = rng.normals(n);
        let run = |fused: bool| {
            let x = Tensor::<3>::from_data(TensorData::new(x0.clone(), shape), &device).require_grad();
            let y = if fused { layer_norm(x.clone(), 1e-6) } else { layer_norm_ops(x.clone(), 1e-6) };
            let up = Tensor::<3>::from_data(TensorData::new(up.clone(), shape), &device);
            let grads = (y.clone() * up).sum().backward();
            (host_values(y), host_values(x.grad(&grads).unwrap()))
        };
        let (f, t) = (run(true), run(false));
        close(&f.0, &t.0, 1e-5, "y");
        close(&f.1, &t.1, 2e-4, "dx");
    }
}
