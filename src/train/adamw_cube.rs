//! One parameter's AdamW update as one CubeCL kernel, for the GPU backends (wgpu, cuda).
//!
//! The tensor-op update (`AdamW::update`) is about nineteen elementwise kernels per parameter
//! tensor (clip, both moments, bias corrections, square root, the step, decay, the positivity
//! bound): 16k of the 29k launches of a tiny-SD QAT step on wgpu
//! (`experiments/bench-gpu-launches/`). Here it is one pass that reads `p, g, m, v` and writes
//! `p', m', v'`, in the same order of operations as the tensor version. flex keeps the tensor
//! ops (their bits are the recorded ones).

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::{self, calculate_cube_count_elemwise, prelude::*};
use burn_cubecl::tensor::CubeTensor;

use crate::kernels::cube::{UNITS, contiguous, cube_sum, empty};

/// The step's constants, as the tensor version applies them (f32, as burn casts its scalars).
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// `1 - beta`, rounded once from f64 as the tensor version's scalar is.
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    /// `1 - beta^step`.
    pub correction1: f32,
    pub correction2: f32,
    pub eps: f32,
    /// `lr * weight_decay`; 0 without decay.
    pub decay: f32,
    /// One step shrinks an element to half its value at most (quantizer scales).
    pub positive: bool,
}

#[backend_extension(Cube: cfg(any(feature = "wgpu", feature = "cuda-runtime")))]
pub trait FusedAdamW: Backend {
    /// `(p', m', v')` from a parameter, its gradient, the moments (not read when `first`: the
    /// first step starts them at zero) and the clipping factor `[1]` (not read unless `clipped`).
    #[allow(clippy::too_many_arguments)]
    fn fused_adamw(
        p: FloatTensor<Self>,
        g: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        clip: FloatTensor<Self>,
        first: bool,
        clipped: bool,
        lr: f32,
        beta1: f32,
        beta2: f32,
        one_minus_beta1: f32,
        one_minus_beta2: f32,
        correction1: f32,
        correction2: f32,
        eps: f32,
        decay: f32,
        positive: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// `acc + sum(g * g)`, `[1]`: one launch per gradient for the global norm (the tensor ops take
    /// four: square, a zeroed output, the sum, the add).
    fn sum_squares_onto(acc: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// `acc + sum(g * g)` on a GPU device.
pub fn sum_squares_onto(acc: Tensor<1>, g: Tensor<1>) -> Tensor<1> {
    Tensor::from_dispatch(<Dispatch as FusedAdamW>::sum_squares_onto(acc.into_dispatch(), g.into_dispatch()))
}

/// The update on a GPU device's tensors (no autodiff: the optimizer works on the values).
pub fn update(
    p: Tensor<1>,
    g: Tensor<1>,
    moments: Option<(Tensor<1>, Tensor<1>)>,
    clip: Option<Tensor<1>>,
    h: AdamStep,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    // Stand-ins the kernel never reads: the gradient for absent moments and clipping factor.
    let first = moments.is_none();
    let clipped = clip.is_some();
    let (m, v) = moments.unwrap_or_else(|| (g.clone(), g.clone()));
    let clip = clip.unwrap_or_else(|| g.clone());
    let (p, m, v) = <Dispatch as FusedAdamW>::fused_adamw(
        p.into_dispatch(),
        g.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        clip.into_dispatch(),
        first,
        clipped,
        h.lr,
        h.beta1,
        h.beta2,
        h.one_minus_beta1,
        h.one_minus_beta2,
        h.correction1,
        h.correction2,
        h.eps,
        h.decay,
        h.positive,
    );
    (Tensor::from_dispatch(p), Tensor::from_dispatch(m), Tensor::from_dispatch(v))
}

#[derive(CubeLaunch, CubeType, Clone, Copy)]
struct StepArgs {
    lr: f32,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    correction1: f32,
    correction2: f32,
    eps: f32,
    decay: f32,
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn adamw_kernel(
    p: &[f32],
    g: &[f32],
    m: &[f32],
    v: &[f32],
    clip: &[f32],
    p_out: &mut [f32],
    m_out: &mut [f32],
    v_out: &mut [f32],
    h: &StepArgs,
    #[comptime] first: bool,
    #[comptime] clipped: bool,
    #[comptime] decayed: bool,
    #[comptime] positive: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= p_out.len() {
        terminate!();
    }
    let mut gi = g[i];
    if clipped {
        gi *= clip[0];
    }
    let mut mi = gi * h.one_minus_beta1;
    let mut vi = (gi * gi) * h.one_minus_beta2;
    if !first {
        mi = m[i] * h.beta1 + mi;
        vi = v[i] * h.beta2 + vi;
    }
    let step = (mi / h.correction1) / (f32::sqrt(vi / h.correction2) + h.eps);
    let mut pi = p[i];
    if decayed {
        pi -= pi * h.decay;
    }
    let mut next = pi - step * h.lr;
    if positive {
        next = f32::max(next, pi * 0.5f32);
    }
    p_out[i] = next;
    m_out[i] = mi;
    v_out[i] = vi;
}

/// One cube: each thread strides over `g`, then the threads' sums halve in shared memory.
#[cube(launch)]
fn sum_squares_kernel(acc: &[f32], g: &[f32], out: &mut [f32], #[comptime] units: usize) {
    let t = UNIT_POS_X as usize;
    let stride = CUBE_DIM_X as usize;
    let mut sum = 0.0f32;
    let mut i = t;
    while i < g.len() {
        let v = g[i];
        sum += v * v;
        i += stride;
    }
    let mut buf = Shared::<[f32]>::new_slice(units);
    let total = cube_sum(&mut buf, sum, t, stride);
    if t == 0 {
        out[0] = acc[0] + total;
    }
}

impl FusedAdamW for CubeBackend {
    fn fused_adamw(
        p: CubeTensor,
        g: CubeTensor,
        m: CubeTensor,
        v: CubeTensor,
        clip: CubeTensor,
        first: bool,
        clipped: bool,
        lr: f32,
        beta1: f32,
        beta2: f32,
        one_minus_beta1: f32,
        one_minus_beta2: f32,
        correction1: f32,
        correction2: f32,
        eps: f32,
        decay: f32,
        positive: bool,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let (p, g) = (contiguous(p), contiguous(g));
        let (m, v, clip) = (contiguous(m), contiguous(v), contiguous(clip));
        let like = || empty(&p, p.meta.shape().clone());
        let (p_out, m_out, v_out) = (like(), like(), like());
        let n = p.meta.num_elements();
        let client = p.client.clone();
        let dim = CubeDim::new(&client, n);
        let count = calculate_cube_count_elemwise(&client, n, dim);
        adamw_kernel::launch(
            &client,
            count,
            dim,
            p.into_buffer_arg(),
            g.into_buffer_arg(),
            m.into_buffer_arg(),
            v.into_buffer_arg(),
            clip.into_buffer_arg(),
            p_out.clone().into_buffer_arg(),
            m_out.clone().into_buffer_arg(),
            v_out.clone().into_buffer_arg(),
            StepArgsLaunch::new(
                lr,
                beta1,
                beta2,
                one_minus_beta1,
                one_minus_beta2,
                correction1,
                correction2,
                eps,
                decay,
            ),
            first,
            clipped,
            decay != 0.0,
            positive,
        );
        (p_out, m_out, v_out)
    }

    fn sum_squares_onto(acc: CubeTensor, g: CubeTensor) -> CubeTensor {
        let (acc, g) = (contiguous(acc), contiguous(g));
        let out = empty(&acc, acc.meta.shape().clone());
        sum_squares_kernel::launch(
            &acc.client.clone(),
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(UNITS as u32),
            acc.into_buffer_arg(),
            g.into_buffer_arg(),
            out.clone().into_buffer_arg(),
            UNITS,
        );
        out
    }
}
