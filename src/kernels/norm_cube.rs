//! GroupNorm (optionally followed by SiLU) as one CubeCL kernel forward and one backward, for the
//! GPU backends (wgpu, cuda). burn has no fused GroupNorm: as tensor ops it is a reshape, two
//! means, a square, a square root, a division and the affine (about ten launches and as many
//! passes over the activation forward, twice that backward, SiLU's on top), and every UNet block
//! runs two or three of them.
//!
//! LayerNorm without affine (SD's transformer blocks, CLIP, DiT) is the same kernel with one
//! group per row and no affine.
//!
//! One cube per (sample, group): its threads stride over the group, sum in shared memory (the
//! mean, then the variance about it, as flex does), and write the output; the backward's cube
//! sums each channel's `(sum g, sum g xh)` (the affine parameters' gradients, per sample: added
//! over the batch after) and the group's closed-form terms, then writes `dx` (see `norm.rs`).

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::{self, calculate_cube_count_elemwise, prelude::*};
use burn_cubecl::tensor::CubeTensor;

use super::cube::{UNITS, contiguous, cube_sum, empty};

#[backend_extension(Autodiff, Cube: cfg(any(feature = "wgpu", feature = "cuda-runtime")))]
pub trait GroupNormGpu: Backend {
    /// GroupNorm over `[B, C, ..]` with per-channel affine, then SiLU when `silu`.
    fn gpu_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self>;

    /// LayerNorm over the last dimension, no affine.
    fn gpu_layer_norm(x: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;
}

/// LayerNorm over the last dimension without affine on a GPU device, with or without autodiff.
pub fn layer_norm<const D: usize>(x: Tensor<D>, eps: f64) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as GroupNormGpu>::gpu_layer_norm(x.into_dispatch(), eps))
}

/// GroupNorm(+SiLU) of `x: [B, C, H, W]` on a GPU device, with or without autodiff.
pub fn group_norm(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as GroupNormGpu>::gpu_group_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        groups,
        eps,
        silu,
    ))
}

#[cube]
fn sigmoid(v: f32) -> f32 {
    1.0f32 / (1.0f32 + f32::exp(-v))
}

/// Group sizes of one launch: channels, groups, elements per channel.
#[derive(CubeLaunch, CubeType, Clone, Copy)]
struct Layout {
    channels: usize,
    groups: usize,
    spatial: usize,
}

#[cube(launch)]
fn group_norm_forward_kernel(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    out: &mut [f32],
    stats: &mut [f32],
    layout: &Layout,
    eps: f32,
    #[comptime] units: usize,
    #[comptime] silu: bool,
    #[comptime] affine: bool,
) {
    let cube = CUBE_POS;
    if cube >= stats.len() / 2 {
        terminate!();
    }
    let per_group = layout.channels / layout.groups;
    let len = per_group * layout.spatial;
    let base = cube * len;
    let first = (cube % layout.groups) * per_group;
    let t = UNIT_POS_X as usize;
    let stride = CUBE_DIM_X as usize;
    let n = f32::cast_from(len);
    let mut buf = Shared::<[f32]>::new_slice(units);
    let mut acc = 0.0f32;
    let mut i = t;
    while i < len {
        acc += x[base + i];
        i += stride;
    }
    let mean = cube_sum(&mut buf, acc, t, stride) / n;
    let mut sq = 0.0f32;
    i = t;
    while i < len {
        let d = x[base + i] - mean;
        sq += d * d;
        i += stride;
    }
    let rstd = 1.0f32 / f32::sqrt(cube_sum(&mut buf, sq, t, stride) / n + eps);
    i = t;
    while i < len {
        let mut v = (x[base + i] - mean) * rstd;
        if affine {
            let c = first + i / layout.spatial;
            v = v * gamma[c] + beta[c];
        }
        if silu {
            v *= sigmoid(v);
        }
        out[base + i] = v;
        i += stride;
    }
    if t == 0 {
        stats[2 * cube] = mean;
        stats[2 * cube + 1] = rstd;
    }
}

/// The gradient of the normalised-and-scaled value at one element (through SiLU when `silu`).
#[cube]
fn pre_activation_grad(g: f32, xh: f32, a: f32, b: f32, #[comptime] silu: bool) -> f32 {
    let mut gy = g;
    if silu {
        let v = xh * a + b;
        let s = sigmoid(v);
        gy *= s + v * s * (1.0f32 - s);
    }
    gy
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn group_norm_backward_kernel(
    g: &[f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    stats: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    layout: &Layout,
    #[comptime] units: usize,
    #[comptime] silu: bool,
    #[comptime] affine: bool,
) {
    let cube = CUBE_POS;
    if cube >= stats.len() / 2 {
        terminate!();
    }
    let per_group = layout.channels / layout.groups;
    let spatial = layout.spatial;
    let len = per_group * spatial;
    let base = cube * len;
    let sample = cube / layout.groups;
    let first = (cube % layout.groups) * per_group;
    let t = UNIT_POS_X as usize;
    let stride = CUBE_DIM_X as usize;
    let (mean, rstd) = (stats[2 * cube], stats[2 * cube + 1]);
    let mut buf = Shared::<[f32]>::new_slice(units);
    let mut ma = 0.0f32;
    let mut mb = 0.0f32;
    for k in 0..per_group {
        let c = first + k;
        let mut a = 1.0f32;
        let mut b = 0.0f32;
        if affine {
            a = gamma[c];
            b = beta[c];
        }
        let mut sg = 0.0f32;
        let mut sgx = 0.0f32;
        let mut j = t;
        while j < spatial {
            let idx = base + k * spatial + j;
            let xh = (x[idx] - mean) * rstd;
            let gy = pre_activation_grad(g[idx], xh, a, b, silu);
            sg += gy;
            sgx += gy * xh;
            j += stride;
        }
        let sg = cube_sum(&mut buf, sg, t, stride);
        let sgx = cube_sum(&mut buf, sgx, t, stride);
        if affine && t == 0 {
            dbeta[sample * layout.channels + c] = sg;
            dgamma[sample * layout.channels + c] = sgx;
        }
        ma += sg * a;
        mb += sgx * a;
    }
    let n = f32::cast_from(len);
    ma /= n;
    mb /= n;
    let mut i = t;
    while i < len {
        let mut a = 1.0f32;
        let mut b = 0.0f32;
        if affine {
            let c = first + i / spatial;
            a = gamma[c];
            b = beta[c];
        }
        let xh = (x[base + i] - mean) * rstd;
        let gy = pre_activation_grad(g[base + i], xh, a, b, silu);
        dx[base + i] = rstd * (gy * a - ma - xh * mb);
        i += stride;
    }
}

/// How a normalisation groups its input: `batch` samples of `channels` channels of `spatial`
/// elements, normalised in `groups` groups of consecutive channels per sample (GroupNorm), or a
/// LayerNorm's rows as one sample of one-channel groups.
#[derive(Debug, Clone, Copy)]
struct Grouping {
    batch: usize,
    channels: usize,
    spatial: usize,
    groups: usize,
}

impl Grouping {
    /// GroupNorm of `[B, C, ..]`.
    fn channels(x: &CubeTensor, groups: usize) -> Self {
        let shape = x.meta.shape();
        let (batch, channels) = (shape[0], shape[1]);
        Self { batch, channels, spatial: x.meta.num_elements() / (batch * channels).max(1), groups }
    }

    /// LayerNorm over the last dimension.
    fn rows(x: &CubeTensor) -> Self {
        let d = *x.meta.shape().last().expect("a dimension");
        let rows = x.meta.num_elements() / d.max(1);
        Self { batch: 1, channels: rows, spatial: d, groups: rows }
    }

    fn cubes(&self) -> usize {
        self.batch * self.groups
    }

    fn launch(&self, x: &CubeTensor) -> (CubeCount, CubeDim, LayoutLaunch) {
        let dim = CubeDim::new_1d(UNITS as u32);
        let count = calculate_cube_count_elemwise(&x.client, self.cubes() * UNITS, dim);
        (count, dim, LayoutLaunch::new(self.channels, self.groups, self.spatial))
    }
}

/// The output and the `[cubes, 2]` (mean, rstd) of each group; `affine` is (gamma, beta).
fn forward(
    x: &CubeTensor,
    affine: Option<(&CubeTensor, &CubeTensor)>,
    grouping: Grouping,
    eps: f64,
    silu: bool,
) -> (CubeTensor, CubeTensor) {
    let out = empty(x, x.meta.shape().clone());
    let stats = empty(x, Shape::new([grouping.cubes(), 2]));
    let (count, dim, layout) = grouping.launch(x);
    // Without affine the input stands in for gamma and beta (the kernel reads neither).
    let (gamma, beta) = affine.unwrap_or((x, x));
    group_norm_forward_kernel::launch(
        &x.client.clone(),
        count,
        dim,
        x.clone().into_buffer_arg(),
        gamma.clone().into_buffer_arg(),
        beta.clone().into_buffer_arg(),
        out.clone().into_buffer_arg(),
        stats.clone().into_buffer_arg(),
        layout,
        eps as f32,
        UNITS,
        silu,
        affine.is_some(),
    );
    (out, stats)
}

impl GroupNormGpu for CubeBackend {
    fn gpu_group_norm(
        x: CubeTensor,
        gamma: CubeTensor,
        beta: CubeTensor,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> CubeTensor {
        let x = contiguous(x);
        let grouping = Grouping::channels(&x, groups);
        forward(&x, Some((&contiguous(gamma), &contiguous(beta))), grouping, eps, silu).0
    }

    fn gpu_layer_norm(x: CubeTensor, eps: f64) -> CubeTensor {
        let x = contiguous(x);
        let grouping = Grouping::rows(&x);
        forward(&x, None, grouping, eps, false).0
    }
}

#[derive(Debug, Clone)]
struct NormState {
    x: CubeTensor,
    affine: Option<(CubeTensor, CubeTensor)>,
    stats: CubeTensor,
    grouping: Grouping,
    silu: bool,
}

impl NormState {
    /// `dx`, and with affine `(dgamma, dbeta)`.
    fn grads(&self, grad: CubeTensor) -> (CubeTensor, Option<(CubeTensor, CubeTensor)>) {
        let grad = contiguous(grad);
        let Grouping { batch, channels, .. } = self.grouping;
        let x = &self.x;
        let dx = empty(x, x.meta.shape().clone());
        let parts = if self.affine.is_some() { batch * channels } else { 1 };
        let (dgamma, dbeta) = (empty(x, Shape::new([parts])), empty(x, Shape::new([parts])));
        let (count, dim, layout) = self.grouping.launch(x);
        let (gamma, beta) = self.affine.clone().unwrap_or((x.clone(), x.clone()));
        group_norm_backward_kernel::launch(
            &x.client.clone(),
            count,
            dim,
            grad.into_buffer_arg(),
            x.clone().into_buffer_arg(),
            gamma.into_buffer_arg(),
            beta.into_buffer_arg(),
            self.stats.clone().into_buffer_arg(),
            dx.clone().into_buffer_arg(),
            dgamma.clone().into_buffer_arg(),
            dbeta.clone().into_buffer_arg(),
            layout,
            UNITS,
            self.silu,
            self.affine.is_some(),
        );
        // Per sample -> per channel (one sample: the sums already).
        let over_batch = |t: CubeTensor| {
            let t = CubeBackend::float_reshape(t, Shape::new([batch, channels]));
            let t = if batch > 1 { CubeBackend::float_sum_dim(t, 0) } else { t };
            CubeBackend::float_reshape(t, Shape::new([channels]))
        };
        (dx, self.affine.is_some().then(|| (over_batch(dgamma), over_batch(dbeta))))
    }
}

#[derive(Debug)]
struct NormBackward;

impl Backward<CubeBackend, 3> for NormBackward {
    type State = NormState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let (dx, affine) = ops.state.grads(grads.consume::<CubeBackend>(&ops.node));
        let (dgamma, dbeta) = affine.expect("GroupNorm has an affine");
        for (node, g) in [(node_x, dx), (node_gamma, dgamma), (node_beta, dbeta)] {
            if let Some(node) = node {
                grads.register::<CubeBackend>(node.id, g);
            }
        }
    }
}

impl Backward<CubeBackend, 1> for NormBackward {
    type State = NormState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let (dx, _) = ops.state.grads(grads.consume::<CubeBackend>(&ops.node));
        if let Some(node) = node_x {
            grads.register::<CubeBackend>(node.id, dx);
        }
    }
}

impl<C: CheckpointStrategy> GroupNormGpu for Autodiff<CubeBackend, C> {
    fn gpu_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        let prep =
            Backward::<CubeBackend, 3>::prepare::<C>(NormBackward, [x.node(), gamma.node(), beta.node()]);
        let (xp, gp, bp) = (
            contiguous(x.primitive().clone()),
            contiguous(gamma.primitive().clone()),
            contiguous(beta.primitive().clone()),
        );
        let grouping = Grouping::channels(&xp, groups);
        match prep.compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, stats) = forward(&xp, Some((&gp, &bp)), grouping, eps, silu);
                prep.finish(NormState { x: xp, affine: Some((gp, bp)), stats, grouping, silu }, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(&xp, Some((&gp, &bp)), grouping, eps, silu).0),
        }
    }

    fn gpu_layer_norm(x: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let prep = Backward::<CubeBackend, 1>::prepare::<C>(NormBackward, [x.node()]);
        let xp = contiguous(x.primitive().clone());
        let grouping = Grouping::rows(&xp);
        match prep.compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, stats) = forward(&xp, None, grouping, eps, false);
                prep.finish(NormState { x: xp, affine: None, stats, grouping, silu: false }, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(&xp, None, grouping, eps, false).0),
        }
    }
}
