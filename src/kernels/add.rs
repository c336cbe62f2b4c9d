//! Additions onto a residual stream: the UNets' `skip + h` and timestep-embedding shift
//! `h + e[:, :, None, None]`, and DiT's gated residual `x + gate[:, None, :] * h`, each one
//! parallel pass in the memory of an operand nobody else holds. Burn's versions run on the
//! calling thread, and the shift's backward is a serial reduction over the broadcast dimensions:
//! together about 4% of a two-thread tiny-UNet step with the second core idle (perf).
//!
//! Backward: the sum passes its gradient to both operands unchanged (no copy); the shift's
//! gradient is each plane's sum, in a fixed order (the same bits on any thread count).

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

use super::host::{tensor, values, values_mut, writable, zeros};
use super::record;

/// Values per parallel work item.
const CHUNK: usize = 1 << 14;

/// Independent partial sums in a plane's sum, so that the loop vectorises.
const LANES: usize = 8;

/// `a + b` (same shape) into whichever operand nobody else holds, else a copy of `a`.
fn add_tensors(a: FlexTensor, b: FlexTensor) -> FlexTensor {
    let (mut out, other) = if !a.is_unique() && b.is_unique() { (writable(b), a) } else { (writable(a), b) };
    let other = values(&other);
    let xs = values_mut(&mut out).expect("writable tensor");
    xs.par_chunks_mut(CHUNK).zip(other.par_chunks(CHUNK)).for_each(|(x, o)| {
        x.iter_mut().zip(o).for_each(|(x, o)| *x += o);
    });
    out
}

/// `x + shift` with `x: [b, c, h, w]` and `shift: [b, c]`, into `x`'s memory when it can.
fn shift_tensor(x: FlexTensor, shift: &FlexTensor) -> FlexTensor {
    let shape = x.layout().shape().to_vec();
    let plane = shape[2] * shape[3];
    let mut out = writable(x);
    let shift = values(shift);
    let xs = values_mut(&mut out).expect("writable tensor");
    let planes_per_item = (CHUNK / plane.max(1)).max(1);
    xs.par_chunks_mut(planes_per_item * plane).zip(shift.par_chunks(planes_per_item)).for_each(|(x, s)| {
        for (p, &s) in x.chunks_mut(plane).zip(s) {
            p.iter_mut().for_each(|v| *v += s);
        }
    });
    out
}

/// Each `plane`-long run of `g` summed: `LANES` running sums, then added in order.
fn plane_sums(g: &[f32], plane: usize) -> Vec<f32> {
    g.par_chunks(plane)
        .map(|p| {
            let mut lanes = [0.0f32; LANES];
            let mut chunks = p.chunks_exact(LANES);
            for c in &mut chunks {
                lanes.iter_mut().zip(c).for_each(|(l, v)| *l += v);
            }
            lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
        })
        .collect()
}

/// `x + gate[:, None, :] * h` for `x, h: [b, n, c]`, `gate: [b, c]` (DiT's gated residual), the
/// product rounded before the sum as in the tensor ops; into `x`'s memory when it can.
fn gated_tensor(x: FlexTensor, gate: &FlexTensor, h: &FlexTensor) -> FlexTensor {
    let [_, n, c] = dims3(&x);
    let mut out = writable(x);
    let (gate, h) = (values(gate), values(h));
    let xs = values_mut(&mut out).expect("writable tensor");
    xs.par_chunks_mut(n * c).zip(h.par_chunks(n * c)).zip(gate.par_chunks(c)).for_each(|((x, h), g)| {
        for (x, h) in x.chunks_mut(c).zip(h.chunks(c)) {
            x.iter_mut().zip(h).zip(g).for_each(|((x, &h), &g)| *x += g * h);
        }
    });
    out
}

/// The gradients of [`gated_tensor`] for `h` and `gate`: `dy * gate`, and `dy * h` summed over
/// the tokens in order from zero (the bits of flex's own middle-dimension sum).
fn gated_grads(dy: &[f32], gate: &[f32], h: &[f32], [b, n, c]: [usize; 3]) -> (Vec<f32>, Vec<f32>) {
    let mut dh = zeros(b * n * c);
    let mut dgate = vec![0.0f32; b * c];
    dh.par_chunks_mut(n * c)
        .zip(dgate.par_chunks_mut(c))
        .zip(dy.par_chunks(n * c).zip(h.par_chunks(n * c)).zip(gate.par_chunks(c)))
        .for_each(|((dh, dg), ((dy, h), g))| {
            for ((dh, dy), h) in dh.chunks_mut(c).zip(dy.chunks(c)).zip(h.chunks(c)) {
                for i in 0..c {
                    dh[i] = dy[i] * g[i];
                    dg[i] += dy[i] * h[i];
                }
            }
        });
    (dh, dgate)
}

fn dims3(t: &FlexTensor) -> [usize; 3] {
    t.layout().shape().to_vec().try_into().expect("a 3-d tensor")
}

#[backend_extension(Autodiff, Flex)]
pub trait AddBackend: Backend {
    /// `a + b`, same shapes.
    fn fused_add(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x + shift[:, :, None, None]` for `x: [b, c, h, w]`, `shift: [b, c]`.
    fn fused_channel_shift(x: FloatTensor<Self>, shift: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x + gate[:, None, :] * h` for `x, h: [b, n, c]`, `gate: [b, c]`.
    fn fused_add_gated(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        h: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

impl AddBackend for Flex {
    fn fused_add(a: FlexTensor, b: FlexTensor) -> FlexTensor {
        add_tensors(a, b)
    }

    fn fused_channel_shift(x: FlexTensor, shift: FlexTensor) -> FlexTensor {
        shift_tensor(x, &shift)
    }

    fn fused_add_gated(x: FlexTensor, gate: FlexTensor, h: FlexTensor) -> FlexTensor {
        gated_tensor(x, &gate, &h)
    }
}

/// Keeps `gate` and `h`.
#[derive(Debug)]
struct GatedBackward;

impl Backward<Flex, 3> for GatedBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gate, node_h] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (gate, h) = ops.state;
        let shape = dims3(&h);
        let (dh, dgate) = gated_grads(&values(&grad), &values(&gate), &values(&h), shape);
        if let Some(node) = node_h {
            grads.register::<Flex>(node.id, tensor(dh, &shape));
        }
        if let Some(node) = node_gate {
            grads.register::<Flex>(node.id, tensor(dgate, &[shape[0], shape[2]]));
        }
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, grad);
        }
    }
}

#[derive(Debug)]
struct AddBackward;

impl Backward<Flex, 2> for AddBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        for node in ops.parents.into_iter().flatten() {
            grads.register::<Flex>(node.id, grad.clone());
        }
    }
}

/// Keeps the shift's shape `[b, c]` and the plane size `h * w`.
#[derive(Debug)]
struct ShiftBackward;

impl Backward<Flex, 2> for ShiftBackward {
    type State = ([usize; 2], usize);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_shift] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let ([b, c], plane) = ops.state;
        if let Some(node) = node_shift {
            grads.register::<Flex>(node.id, tensor(plane_sums(&values(&grad), plane), &[b, c]));
        }
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, grad);
        }
    }
}

impl<C: CheckpointStrategy> AddBackend for Autodiff<Flex, C> {
    fn fused_add_gated(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        h: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), gate.node(), h.node()];
        let (g, hp) = (gate.primitive().clone(), h.primitive().clone());
        let out = gated_tensor(x.into_primitive(), &g, &hp);
        record!(GatedBackward, nodes, (g, hp), out)
    }

    fn fused_add(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let nodes = [a.node(), b.node()];
        // Unwrapped by value: an operand nothing else holds can take the sum.
        let out = add_tensors(a.into_primitive(), b.into_primitive());
        AddBackward.prepare::<C>(nodes).compute_bound().stateless(out)
    }

    fn fused_channel_shift(x: FloatTensor<Self>, shift: FloatTensor<Self>) -> FloatTensor<Self> {
        let dims = x.primitive().layout().shape().to_vec();
        let state = ([dims[0], dims[1]], dims[2] * dims[3]);
        let nodes = [x.node(), shift.node()];
        let out = shift_tensor(x.into_primitive(), shift.primitive());
        record!(ShiftBackward, nodes, state, out)
    }
}

/// `x + gate[:, None, :] * h` (`x, h: [b, n, c]`, `gate: [b, c]`): DiT's gated residual, one
/// parallel pass on flex, tensor ops elsewhere.
pub fn add_gated(x: Tensor<3>, gate: Tensor<2>, h: Tensor<3>) -> Tensor<3> {
    if !super::on_flex(&x.device()) || x.dims() != h.dims() {
        return x + gate.unsqueeze_dim::<3>(1) * h;
    }
    Tensor::from_dispatch(<Dispatch as AddBackend>::fused_add_gated(
        x.into_dispatch(),
        gate.into_dispatch(),
        h.into_dispatch(),
    ))
}

/// `a + b` for tensors of the same shape: one parallel pass on flex, burn's add elsewhere.
pub fn add<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    if !super::on_flex(&a.device()) || a.dims() != b.dims() {
        return a + b;
    }
    Tensor::from_dispatch(<Dispatch as AddBackend>::fused_add(a.into_dispatch(), b.into_dispatch()))
}

/// `x + shift[:, :, None, None]` (`x: [b, c, h, w]`, `shift: [b, c]`): a timestep embedding
/// added to every position of each channel.
pub fn add_channel_shift(x: Tensor<4>, shift: Tensor<2>) -> Tensor<4> {
    let [b, c, _, _] = x.dims();
    if !super::on_flex(&x.device()) {
        return x + shift.reshape([b, c, 1, 1]);
    }
    assert_eq!(shift.dims(), [b, c], "a shift per sample and channel");
    Tensor::from_dispatch(<Dispatch as AddBackend>::fused_channel_shift(
        x.into_dispatch(),
        shift.into_dispatch(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::params::host_values;
    use crate::rng::SeededRng;
    use burn::tensor::{Device, TensorData};

    /// DiT's gated residual against the tensor ops, bit for bit: values, and the gradients of
    /// x, h and the gate (the gate's summed over tokens in flex's order).
    #[test]
    fn fused_gated_residual_matches_the_tensor_ops() {
        let device = Device::flex().autodiff();
        let mut rng = SeededRng::new(9);
        let (b, n, c) = (3, 70, 48);
        let (x0, h0, g0, dy0) =
            (rng.normals(b * n * c), rng.normals(b * n * c), rng.normals(b * c), rng.normals(b * n * c));
        let run = |fused: bool| {
            let t3 = |v: &[f32]| Tensor::<3>::from_data(TensorData::new(v.to_vec(), [b, n, c]), &device);
            let (x, h) = (t3(&x0).require_grad(), t3(&h0).require_grad());
            let g = Tensor::<2>::from_data(TensorData::new(g0.clone(), [b, c]), &device).require_grad();
            let (xi, hi) = (x.clone() * 1.0, h.clone() * 1.0);
            let out =
                if fused { add_gated(xi, g.clone(), hi) } else { xi + g.clone().unsqueeze_dim::<3>(1) * hi };
            let grads = (out.clone() * t3(&dy0)).sum().backward();
            let grad3 = |t: &Tensor<3>| host_values(t.grad(&grads).unwrap());
            (host_values(out), grad3(&x), grad3(&h), host_values(g.grad(&grads).unwrap()))
        };
        let (f, t) = (run(true), run(false));
        assert_eq!(f.0, t.0, "values");
        assert_eq!(f.1, t.1, "dx");
        assert_eq!(f.2, t.2, "dh");
        assert_eq!(f.3, t.3, "dgate");
    }

    /// Values (the same bits: one f32 add each) and gradients against burn's broadcasting add,
    /// with planes spanning several work items and a transposed operand; the shift's gradient
    /// within the rounding of a plane's sum.
    #[test]
    fn fused_adds_match_the_tensor_ops() {
        let device = Device::flex().autodiff();
        let mut rng = SeededRng::new(5);
        let dims = [3, 4, 96, 80];
        let n: usize = dims.iter().product();
        let (x0, y0, s0, g0) = (rng.normals(n), rng.normals(n), rng.normals(12), rng.normals(n));
        let t = |v: &[f32], d: [usize; 4]| Tensor::<4>::from_data(TensorData::new(v.to_vec(), d), &device);
        for transposed in [false, true] {
            let run = |fused: bool| {
                let x = t(&x0, dims).require_grad();
                let y = t(&y0, [3, 4, 80, 96]).require_grad();
                let y_in = if transposed { y.clone().swap_dims(2, 3) } else { y.clone().reshape(dims) };
                let s = Tensor::<2>::from_data(TensorData::new(s0.clone(), [3, 4]), &device).require_grad();
                let out = if fused {
                    add(add_channel_shift(x.clone() * 1.0, s.clone()), y_in)
                } else {
                    x.clone() * 1.0 + s.clone().reshape([3, 4, 1, 1]) + y_in
                };
                let grads = (out.clone() * t(&g0, dims)).sum().backward();
                let grad = |v: Option<Tensor<4>>| host_values(v.unwrap());
                (
                    host_values(out),
                    grad(x.grad(&grads)),
                    grad(y.grad(&grads)),
                    host_values(s.grad(&grads).unwrap()),
                )
            };
            let ((fo, fdx, fdy, fds), (to, tdx, tdy, tds)) = (run(true), run(false));
            assert_eq!(fo, to, "transposed {transposed}: values");
            assert_eq!(fdx, tdx, "transposed {transposed}: dx is the gradient itself");
            assert_eq!(fdy, tdy, "transposed {transposed}: dy is the gradient itself");
            for (i, (a, b)) in fds.iter().zip(&tds).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "transposed {transposed}: dshift[{i}] {a} vs {b}"
                );
            }
        }
    }
}
