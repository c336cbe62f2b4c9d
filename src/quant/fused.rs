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
//! version.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{Device, Tensor, TensorData};

use super::format::Format;

#[backend_extension(Autodiff, Flex)]
pub trait FusedQuantBackend: Backend {
    /// `q = round(clamp((x - z) / s)) * s + z` on the grid of `format`.
    fn fused_fake_quant(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        zero_point: FloatTensor<Self>,
        format: Format,
    ) -> FloatTensor<Self>;
}

/// Host view of a flex tensor's values (copied only when it is not contiguous).
fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(v) => std::borrow::Cow::Borrowed(v),
        None => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().expect("f32 tensor").to_vec()),
    }
}

fn tensor_like(values: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, like.layout().shape().clone()))
}

/// Elements of `x` per scale block.
fn block_len(x: &FlexTensor, scale: &FlexTensor) -> usize {
    let n = x.layout().num_elements();
    n / scale.layout().num_elements().max(1)
}

/// The format's grid as the forward and the backward both round on it.
struct Grid {
    lo: f32,
    hi: f32,
    rounder: super::format::Rounder,
}

impl Grid {
    fn new(format: &Format) -> Self {
        Self { lo: format.min(), hi: format.max(), rounder: format.rounder() }
    }

    /// `round(clamp(u))`; `+ 0.0` turns a rounded -0 into +0, as the tensor version does.
    #[inline(always)]
    fn code(&self, u: f32) -> f32 {
        self.rounder.round(u.clamp(self.lo, self.hi)) + 0.0
    }
}

fn forward_flex(x: &FlexTensor, scale: &FlexTensor, zero: &FlexTensor, format: &Format) -> FlexTensor {
    let (xs, s, z) = (values(x), values(scale), values(zero));
    let block = block_len(x, scale).max(1);
    let grid = Grid::new(format);
    let mut out = vec![0.0f32; xs.len()];
    for ((o, xb), (&s, &z)) in out.chunks_mut(block).zip(xs.chunks(block)).zip(s.iter().zip(z.iter())) {
        for (o, &v) in o.iter_mut().zip(xb) {
            *o = grid.code((v - z) / s) * s + z;
        }
    }
    tensor_like(out, x)
}

/// `(dx, ds, dz)` for the upstream gradient `grad`.
fn backward_flex(
    grad: &FlexTensor,
    x: &FlexTensor,
    scale: &FlexTensor,
    zero: &FlexTensor,
    format: &Format,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let (g, xs, s, z) = (values(grad), values(x), values(scale), values(zero));
    let block = block_len(x, scale).max(1);
    let grid = Grid::new(format);
    let mut dx = vec![0.0f32; xs.len()];
    let mut ds = vec![0.0f32; s.len()];
    let mut dz = vec![0.0f32; z.len()];
    for (b, ((dxb, xb), gb)) in dx.chunks_mut(block).zip(xs.chunks(block)).zip(g.chunks(block)).enumerate() {
        let (s, z) = (s[b], z[b]);
        let (mut sum_s, mut sum_z) = (0.0f32, 0.0f32);
        for ((d, &v), &g) in dxb.iter_mut().zip(xb).zip(gb) {
            let u = (v - z) / s;
            let r = grid.code(u);
            if (grid.lo..=grid.hi).contains(&u) {
                *d = g;
                sum_s += g * (r - u);
            } else {
                sum_s += g * r;
                sum_z += g;
            }
        }
        ds[b] = sum_s;
        dz[b] = sum_z;
    }
    (tensor_like(dx, x), tensor_like(ds, scale), tensor_like(dz, zero))
}

impl FusedQuantBackend for Flex {
    fn fused_fake_quant(
        x: FlexTensor,
        scale: FlexTensor,
        zero_point: FlexTensor,
        format: Format,
    ) -> FlexTensor {
        forward_flex(&x, &scale, &zero_point, &format)
    }
}

#[derive(Debug)]
struct FusedQuantBackward {
    format: Format,
}

impl Backward<Flex, 3> for FusedQuantBackward {
    type State = (FlexTensor, FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_s, node_z] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, scale, zero) = ops.state;
        let (dx, ds, dz) = backward_flex(&grad, &x, &scale, &zero, &self.format);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, dx);
        }
        if let Some(node) = node_s {
            grads.register::<Flex>(node.id, ds);
        }
        if let Some(node) = node_z {
            grads.register::<Flex>(node.id, dz);
        }
    }
}

impl<C: CheckpointStrategy> FusedQuantBackend for Autodiff<Flex, C> {
    fn fused_fake_quant(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        zero_point: FloatTensor<Self>,
        format: Format,
    ) -> FloatTensor<Self> {
        let backward = FusedQuantBackward { format: format.clone() };
        match backward.prepare::<C>([x.node(), scale.node(), zero_point.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (x, s, z) =
                    (x.primitive().clone(), scale.primitive().clone(), zero_point.primitive().clone());
                let out = forward_flex(&x, &s, &z, &format);
                prep.finish((x, s, z), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(forward_flex(x.primitive(), scale.primitive(), zero_point.primitive(), &format))
            }
        }
    }
}

/// The fused quantizer where it applies (flex, with or without autodiff; scales per tensor or
/// per leading block); `None` elsewhere.
pub fn fake_quantize_fused<const D: usize>(
    x: &Tensor<D>,
    format: &Format,
    scale: &Tensor<D>,
    zero_point: Option<&Tensor<D>>,
) -> Option<Tensor<D>> {
    let device = x.device();
    if device != Device::flex() && device != Device::flex().autodiff() {
        return None;
    }
    let dims = x.dims();
    let blocks = scale.dims()[0];
    let leading_only = scale.dims().iter().skip(1).all(|&d| d == 1);
    if !leading_only
        || !(blocks == 1 || blocks == dims[0])
        || zero_point.is_some_and(|z| z.dims() != scale.dims())
    {
        return None;
    }
    let zero = match zero_point {
        Some(z) => z.clone(),
        None => Tensor::zeros(scale.dims(), &device),
    };
    let out = <Dispatch as FusedQuantBackend>::fused_fake_quant(
        x.clone().into_dispatch(),
        scale.clone().into_dispatch(),
        zero.into_dispatch(),
        format.clone(),
    );
    Some(Tensor::from_dispatch(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantizer::fake_quantize_ops;
    use crate::rng::SeededRng;
    use crate::train::params::host_values;

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
                    fake_quantize_fused(&x, &format, &s, z.as_ref()).expect("fused path applies")
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
                assert!(fdx.iter().any(|&d| d == 0.0) && fdx.iter().any(|&d| d != 0.0), "{spec}: clipping");
            }
        }
    }

    #[test]
    fn fused_path_applies_to_flex_with_block_scales() {
        let x = Tensor::<2>::zeros([4, 8], &Device::flex().autodiff());
        let f = Format::parse("e2m1").unwrap();
        assert!(fake_quantize_fused(&x, &f, &Tensor::ones([4, 1], &x.device()), None).is_some());
        assert!(fake_quantize_fused(&x, &f, &Tensor::ones([1, 8], &x.device()), None).is_none());
        let plain = Tensor::<2>::zeros([4, 8], &Device::flex());
        assert!(fake_quantize_fused(&plain, &f, &Tensor::ones([4, 1], &plain.device()), None).is_some());
    }
}
