//! The fake quantizer on burn tensors: `q(x) = z + s * grid_round((x - z) / s)`, saturating at
//! the grid's ends, with a straight-through estimator for `x` and LSQ gradients for `s` and `z`.
//!
//! Everything is plain elementwise tensor code, so it runs (and differentiates) on every
//! backend. The scale `s` and zero point `z` broadcast against `x`: a `[1, .., 1]` tensor per
//! tensor, `[C, 1, .., 1]` per output channel, or `[groups, 1]` after [`to_groups`].

use std::f32::consts::LN_2;

use burn::tensor::{Device, Tensor, TensorData};

use super::format::Format;
use crate::error::{Error, Result};

/// Rounds every element to the nearest value of `format`'s grid, ties to the even code,
/// saturating at the ends; bit-identical to [`Format::round`] on each element.
///
/// On the CPU (flex) this is one pass of [`Format::round`] over the values in host memory,
/// which flex tensors already live in; elsewhere it is [`grid_round_elementwise`]. No gradient
/// flows through it (its derivative is zero almost everywhere): use [`grid_round_ste`] inside a
/// differentiable computation.
pub fn grid_round<const D: usize>(v: Tensor<D>, format: &Format) -> Tensor<D> {
    let device = v.device();
    if device == Device::flex() {
        let dims = v.dims();
        let mut values = v.into_data().try_into_vec::<f32>().expect("f32 tensor");
        format.rounder().round_slice(&mut values);
        return Tensor::from_data(TensorData::new(values, dims), &device);
    }
    grid_round_elementwise(v, format)
}

/// [`grid_round`] written as elementwise tensor operations, for every backend.
pub fn grid_round_elementwise<const D: usize>(v: Tensor<D>, format: &Format) -> Tensor<D> {
    let negative = format.signed().then(|| v.clone().lower_elem(0.0));
    let a = if format.signed() {
        v.abs()
    } else {
        // mask_fill rather than clamp_min: backends disagree on whether clamp keeps -0.
        let not_positive = v.clone().lower_equal_elem(0.0);
        v.mask_fill(not_positive, 0.0)
    };
    // Everything beyond max saturates; capping first keeps inf inputs out of the arithmetic.
    let a = a.clamp_max(2.0 * format.max());
    let r = match format.exponent_range() {
        Some((e_min, e_max)) => round_minifloat(a, format.man_bits(), format.bias(), e_min, e_max),
        None => a.round(),
    }
    .clamp_max(format.max());
    match negative {
        Some(mask) => r.clone().mask_where(mask, r.neg()),
        None => r,
    }
}

/// Rounds non-negative magnitudes to a minifloat grid: find the binade, scale its step to 1,
/// round to an integer (burn's `round` is ties-to-even), scale back. Every step is exact in f32.
fn round_minifloat<const D: usize>(
    a: Tensor<D>,
    man_bits: u32,
    bias: i32,
    e_min: i32,
    e_max: i32,
) -> Tensor<D> {
    // floor(log2(a)) through the natural log may be one off right next to a power of two 2^k,
    // which is harmless: from either side, with either binade's step, such an `a` rounds to
    // 2^k. It would take a relative error of 2^-9 in the log to matter. log(0) = -inf clamps.
    let e = (a.clone().log() / LN_2).floor().clamp(e_min as f32, e_max as f32);
    // Below 2^e_min this is the subnormal step; above the grid the result is clamped by the caller.
    let step = pow2(e.clone() - man_bits as f32);
    let scaled = a / step.clone();
    let mut n = scaled.clone().round();
    if man_bits == 0 {
        // Without mantissa bits the code's last bit is the exponent field's: at the tie between
        // 2^e and 2^(e+1) (scaled = 1.5), round() always goes up, but the even code is 2^e when
        // the field e + bias is even.
        let half_field = (e + bias as f32) * 0.5;
        let field_even = half_field.clone().floor().equal(half_field);
        let tie = scaled.equal_elem(1.5);
        n = n.mask_fill(tie.bool_and(field_even), 1.0);
    }
    n * step
}

/// `2^e` for integer-valued `e`, exact (`powf` with an integer exponent of 2 is exact on flex;
/// checked by a test).
fn pow2<const D: usize>(e: Tensor<D>) -> Tensor<D> {
    e.full_like(2.0).powf(e)
}

/// [`grid_round`] with a straight-through estimator: the forward value is the rounded one (as a
/// number: a rounded -0 comes out as +0), the gradient is the identity.
pub fn grid_round_ste<const D: usize>(v: Tensor<D>, format: &Format) -> Tensor<D> {
    let v_const = v.clone().detach();
    // Exact: v lies within half a grid step of its rounding, so v + (r - v) == r.
    let offset = grid_round(v_const.clone(), format) - v_const;
    v + offset
}

/// `z + s * grid_round(clamp((x - z) / s, min, max))`, differentiable: the gradient for `x` is
/// 1 inside the clip range `[z + s*min, z + s*max]` and 0 outside; `s` and `z` get LSQ's
/// gradients (inside: `round(v) - v` and 0; outside: the clip level and 1), since `clamp`
/// masks the gradient and only `round` is straight-through.
///
/// `scale` (and `zero_point`) must broadcast against `x`.
pub fn fake_quantize<const D: usize>(
    x: Tensor<D>,
    format: &Format,
    scale: Tensor<D>,
    zero_point: Option<Tensor<D>>,
) -> Tensor<D> {
    match super::fused::fake_quantize_fused(x, format, &scale, zero_point.as_ref()) {
        Ok(q) => q,
        Err(x) => fake_quantize_ops(x, format, scale, zero_point),
    }
}

/// The quantizer as plain tensor ops (every backend; autodiff records each op).
pub fn fake_quantize_ops<const D: usize>(
    x: Tensor<D>,
    format: &Format,
    scale: Tensor<D>,
    zero_point: Option<Tensor<D>>,
) -> Tensor<D> {
    let shifted = match &zero_point {
        Some(z) => x - z.clone(),
        None => x,
    };
    let v = (shifted / scale.clone()).clamp(format.min(), format.max());
    let q = grid_round_ste(v, format) * scale;
    match zero_point {
        Some(z) => q + z,
        None => q,
    }
}

/// Views `x` as `[numel / group, group]`: each row is `group` consecutive elements along the
/// last dimension, so a `[numel / group, 1]` scale is one scale per group.
pub fn to_groups<const D: usize>(x: Tensor<D>, group: usize) -> Result<Tensor<2>> {
    let dims = x.dims();
    let last = dims[D - 1];
    if group == 0 || !last.is_multiple_of(group) {
        return Err(Error::usage(format!(
            "group size {group} does not divide the last dimension {last} of {dims:?}"
        )));
    }
    let numel: usize = dims.iter().product();
    Ok(x.reshape([numel / group, group]))
}

/// Undoes [`to_groups`].
pub fn from_groups<const D: usize>(groups: Tensor<2>, dims: [usize; D]) -> Tensor<D> {
    groups.reshape(dims)
}

/// Shape of a per-output-channel scale for a tensor of shape `dims`: `[dims[0], 1, .., 1]`.
pub fn per_channel_shape<const D: usize>(dims: [usize; D]) -> [usize; D] {
    let mut shape = [1; D];
    shape[0] = dims[0];
    shape
}

/// [`fake_quantize`] with one scale (and zero point) per group of `group` consecutive elements
/// along the last dimension; `scale` is `[numel / group, 1]`, groups in row-major order.
pub fn fake_quantize_grouped<const D: usize>(
    x: Tensor<D>,
    format: &Format,
    group: usize,
    scale: Tensor<2>,
    zero_point: Option<Tensor<2>>,
) -> Result<Tensor<D>> {
    let dims = x.dims();
    let groups = to_groups(x, group)?;
    let rows = groups.dims()[0];
    for (what, t) in [("scale", Some(&scale)), ("zero point", zero_point.as_ref())] {
        if let Some(t) = t
            && t.dims() != [rows, 1]
        {
            return Err(Error::usage(format!(
                "{what} has shape {:?}, expected [{rows}, 1] for groups of {group} in {dims:?}",
                t.dims()
            )));
        }
    }
    Ok(from_groups(fake_quantize(groups, format, scale, zero_point), dims))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, TensorData};

    use super::*;
    use crate::quant::fixtures;

    fn fmt(spec: &str) -> Format {
        spec.parse().expect("valid spec")
    }

    fn tensor(values: &[f32], device: &Device) -> Tensor<1> {
        Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec::<f32>().expect("f32 data")
    }

    /// Deterministic pseudo-random u32s (xorshift), enough to spread test inputs.
    fn xorshift(seed: u32) -> impl Iterator<Item = u32> {
        let mut s = seed;
        std::iter::from_fn(move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            Some(s)
        })
    }

    /// Grid values, ties and their neighbours, in-range randoms, random f32 bit patterns.
    fn probe_inputs(format: &Format) -> Vec<f32> {
        let grid = format.values();
        let mut xs = vec![0.0, -0.0, f32::MAX, f32::MIN, f32::INFINITY, f32::NEG_INFINITY];
        for w in grid.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            xs.extend([w[0], w[0].next_up(), w[0].next_down(), mid]);
            xs.extend([mid.next_up(), mid.next_down()]);
        }
        let span = 1.5 * (format.max() - format.min());
        for (i, r) in xorshift(0x9E37_79B9).take(6000).enumerate() {
            let unit = (r >> 8) as f32 / (1 << 24) as f32;
            if i % 2 == 0 {
                xs.push(format.min() - 0.25 * span + unit * span);
            } else {
                // Small magnitudes across many binades.
                xs.push((unit - 0.5) * 2f32.powi(-(i as i32 % 40)) * format.max());
            }
        }
        xs.extend(xorshift(12345).take(2000).map(f32::from_bits).filter(|x| !x.is_nan()));
        xs
    }

    #[test]
    fn scalar_fast_round_equals_grid_search() {
        for spec in fixtures::all_specs() {
            let format = fmt(&spec);
            let mut xs = probe_inputs(&format);
            if fixtures::REFERENCE_FORMATS.contains(&spec.as_str()) {
                xs.extend(fixtures::vectors(&spec).into_iter().map(|(x, _)| x));
            }
            for x in xs {
                let (fast, search) = (format.round(x), format.round_by_search(x));
                assert_eq!(fast.to_bits(), search.to_bits(), "{spec}: x = {x:e}");
            }
        }
    }

    #[test]
    fn flex_round_is_ties_to_even() {
        let device = Device::flex();
        let x = [0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 4.4999995, 8_388_607.5];
        let want = [0.0, 2.0, 2.0, 4.0, 0.0, -2.0, -2.0, 4.0, 8_388_608.0];
        assert_eq!(values(tensor(&x, &device).round()), want);
    }

    #[test]
    fn flex_pow2_is_exact() {
        let device = Device::flex();
        let exps: Vec<f32> = (-149..=127).map(|e| e as f32).collect();
        let got = values(pow2(tensor(&exps, &device)));
        for (e, p) in (-149..=127).zip(got) {
            let want = if e >= -126 {
                f32::from_bits(((e + 127) as u32) << 23)
            } else {
                f32::from_bits(1 << (e + 149))
            };
            assert_eq!(p.to_bits(), want.to_bits(), "2^{e}");
        }
    }

    #[test]
    fn tensor_round_equals_scalar_bit_for_bit() {
        let device = Device::flex();
        for spec in fixtures::all_specs() {
            let format = fmt(&spec);
            let xs = probe_inputs(&format);
            let got = values(grid_round_elementwise(tensor(&xs, &device), &format));
            let host = values(grid_round(tensor(&xs, &device), &format));
            assert!(got.iter().zip(&host).all(|(a, b)| a.to_bits() == b.to_bits()), "{spec}: host path");
            let bad: Vec<_> = xs
                .iter()
                .zip(&got)
                .filter(|(x, g)| format.round(**x).to_bits() != g.to_bits())
                .take(5)
                .map(|(x, g)| (*x, format.round(*x), *g))
                .collect();
            assert!(bad.is_empty(), "{spec}: (input, scalar, tensor) {bad:?}");
        }
    }

    #[test]
    fn tensor_round_equals_ml_dtypes() {
        let device = Device::flex();
        for name in fixtures::REFERENCE_FORMATS {
            let format = fmt(name);
            let (xs, want): (Vec<f32>, Vec<f32>) = fixtures::vectors(name).into_iter().unzip();
            let got = values(grid_round_elementwise(tensor(&xs, &device), &format));
            let bad: Vec<_> = (0..xs.len())
                .filter(|&i| got[i] != want[i])
                .take(5)
                .map(|i| (xs[i], want[i], got[i]))
                .collect();
            assert!(bad.is_empty(), "{name}: (input, ml_dtypes, ours) {bad:?}");
        }
    }

    /// `z + s * round((x - z) / s)` in f32, the reference the tensor quantizer must match.
    fn scalar_fake_quant(format: &Format, x: f32, s: f32, z: f32) -> f32 {
        z + s * format.round((x - z) / s)
    }

    #[test]
    fn fake_quantize_forward_matches_scalar_formula() {
        // On flex (plain and autodiff) `fake_quantize` is the fused operation; the tensor-op
        // version (what the GPU backends run) must give the same bits.
        let mut by_path: Vec<Vec<u32>> = Vec::new();
        let paths: [(Device, bool); 3] =
            [(Device::flex(), true), (Device::flex().autodiff(), true), (Device::flex().autodiff(), false)];
        for (device, fused) in paths {
            let mut bits = Vec::new();
            for (spec, s, z) in [
                ("e2m1", 0.37f32, 0.0f32),
                ("e4m3", 0.011, 0.0),
                ("ue2m2", 0.21, -0.278),
                ("uint4", 0.13, -1.0),
                ("int8", 0.02, 0.0),
            ] {
                let format = fmt(spec);
                let xs: Vec<f32> = xorshift(7)
                    .take(4000)
                    .map(|r| ((r >> 8) as f32 / (1 << 24) as f32 - 0.5) * 4.0 * s * format.max())
                    .collect();
                let x = tensor(&xs, &device).reshape([40, 100]);
                let scale = Tensor::<2>::full([1, 1], s, &device);
                let zero = (z != 0.0).then(|| Tensor::<2>::full([1, 1], z, &device));
                let got = if fused {
                    values(fake_quantize(x.clone(), &format, scale, zero))
                } else {
                    values(fake_quantize_ops(x.clone(), &format, scale, zero))
                };
                bits.extend(got.iter().map(|g| g.to_bits()));
                for (x, g) in xs.iter().zip(got) {
                    let want = scalar_fake_quant(&format, *x, s, z);
                    // Equal as numbers: the STE's `v + (r - v)` turns a rounded -0 into +0.
                    assert_eq!(g, want, "{spec} x={x}");
                    if want != 0.0 {
                        assert_eq!(g.to_bits(), want.to_bits(), "{spec} x={x}");
                    }
                }
            }
            by_path.push(bits);
        }
        assert!(by_path[0] == by_path[1] && by_path[1] == by_path[2], "fused and tensor-op versions differ");
    }

    #[test]
    fn per_channel_and_grouped_scales_broadcast() {
        let device = Device::flex();
        let format = fmt("e2m1");
        let xs: Vec<f32> = (0..24).map(|i| (i as f32 - 11.5) * 0.7).collect();
        let x = Tensor::<3>::from_data(TensorData::new(xs.clone(), [2, 3, 4]), &device);

        let channel = [0.5f32, 2.0];
        let shape = per_channel_shape(x.dims());
        assert_eq!(shape, [2, 1, 1]);
        let s = Tensor::<3>::from_data(TensorData::new(channel.to_vec(), shape), &device);
        let got = values(fake_quantize(x.clone(), &format, s, None));
        for (i, g) in got.iter().enumerate() {
            let want = scalar_fake_quant(&format, xs[i], channel[i / 12], 0.0);
            assert_eq!(*g, want, "channel element {i}");
        }

        // Groups of 2 along the last dim: 12 groups, scales 0.25, 0.5, ...
        let group_scales: Vec<f32> = (0..12).map(|g| 0.25 * (g + 1) as f32).collect();
        let s = Tensor::<2>::from_data(TensorData::new(group_scales.clone(), [12, 1]), &device);
        let got = fake_quantize_grouped(x.clone(), &format, 2, s, None).expect("valid groups");
        assert_eq!(got.dims(), [2, 3, 4]);
        for (i, g) in values(got).iter().enumerate() {
            let want = scalar_fake_quant(&format, xs[i], group_scales[i / 2], 0.0);
            assert_eq!(*g, want, "group element {i}");
        }

        assert!(to_groups(x.clone(), 3).is_err());
        let wrong = Tensor::<2>::ones([6, 1], &device);
        assert!(fake_quantize_grouped(x, &format, 2, wrong, None).is_err());
    }

    /// Autodiff gradients of `sum(w * q)` for a per-channel quantizer of `[2, 5]` inputs, checked
    /// against (a) LSQ's analytic formulas and (b) central finite differences of the
    /// smooth-within-bin surrogate `z + s * (clamp((x - z)/s) + c)`, with `c = round - clamp`
    /// frozen at the evaluation point (what the STE differentiates).
    fn check_gradients(spec: &str, xs: [f32; 10], s: [f32; 2], z: Option<[f32; 2]>) {
        let format = fmt(spec);
        let device = Device::flex().autodiff();
        let w: Vec<f32> = (0..10).map(|i| 0.5 + 0.1 * i as f32).collect();
        let zv = z.unwrap_or([0.0; 2]);

        let x = Tensor::<2>::from_data(TensorData::new(xs.to_vec(), [2, 5]), &device).require_grad();
        let st = Tensor::<2>::from_data(TensorData::new(s.to_vec(), [2, 1]), &device).require_grad();
        let zt =
            z.map(|z| Tensor::<2>::from_data(TensorData::new(z.to_vec(), [2, 1]), &device).require_grad());
        let wt = Tensor::<2>::from_data(TensorData::new(w.clone(), [2, 5]), &device);
        let q = fake_quantize(x.clone(), &format, st.clone(), zt.clone());
        let grads = (q * wt).sum().backward();
        let dx = values(x.grad(&grads).expect("dx"));
        let ds = values(st.grad(&grads).expect("ds"));
        let dz = zt.map(|zt| values(zt.grad(&grads).expect("dz")));

        let (lo, hi) = (format.min() as f64, format.max() as f64);
        let mut want_ds = [0.0f64; 2];
        let mut want_dz = [0.0f64; 2];
        let mut fd_ds = [0.0f64; 2];
        let mut fd_dz = [0.0f64; 2];
        let h = 1e-4;
        for i in 0..10 {
            let c = i / 5;
            let (x, s, z, w) = (xs[i] as f64, s[c] as f64, zv[c] as f64, w[i] as f64);
            let v = (x - z) / s;
            let inside = (lo..=hi).contains(&v);
            let r = format.round(v as f32) as f64;
            // Analytic STE / LSQ.
            let want_dx = if inside { w } else { 0.0 };
            want_ds[c] += w * if inside { r - v } else { r };
            want_dz[c] += w * if inside { 0.0 } else { 1.0 };
            assert!((dx[i] as f64 - want_dx).abs() < 1e-5, "{spec} dx[{i}] = {}", dx[i]);
            // Finite differences of the surrogate.
            let frozen = r - v.clamp(lo, hi);
            let f = |x: f64, s: f64, z: f64| z + s * (((x - z) / s).clamp(lo, hi) + frozen);
            let fd_dx = w * (f(x + h, s, z) - f(x - h, s, z)) / (2.0 * h);
            fd_ds[c] += w * (f(x, s + h, z) - f(x, s - h, z)) / (2.0 * h);
            fd_dz[c] += w * (f(x, s, z + h) - f(x, s, z - h)) / (2.0 * h);
            assert!((dx[i] as f64 - fd_dx).abs() < 1e-4, "{spec} dx[{i}] vs fd {fd_dx}");
        }
        for c in 0..2 {
            let tol = 1e-3 * (1.0 + want_ds[c].abs());
            assert!((ds[c] as f64 - want_ds[c]).abs() < tol, "{spec} ds[{c}] {ds:?} vs {want_ds:?}");
            assert!((ds[c] as f64 - fd_ds[c]).abs() < tol, "{spec} ds[{c}] {ds:?} vs fd {fd_ds:?}");
            if let Some(dz) = &dz {
                assert!((dz[c] as f64 - want_dz[c]).abs() < 1e-4, "{spec} dz {dz:?} vs {want_dz:?}");
                assert!((dz[c] as f64 - fd_dz[c]).abs() < 1e-3, "{spec} dz {dz:?} vs fd {fd_dz:?}");
            }
        }
    }

    #[test]
    fn ste_and_lsq_gradients_signed_fp() {
        // Channel 0 (s = 0.5, range [-3, 3]): two values clipped. Channel 1 (s = 0.25): one.
        check_gradients("e2m1", [-3.7, -0.4, 0.26, 0.9, 3.3, 0.1, -1.2, 1.4, 0.61, -2.0], [0.5, 0.25], None);
    }

    #[test]
    fn ste_and_lsq_gradients_with_zero_point() {
        // Unsigned grid [0, 7] * s shifted by z: values below z clip to the bottom level.
        check_gradients(
            "ue2m2",
            [-0.6, -0.1, 0.33, 1.1, 2.9, -0.2, 0.05, 0.7, 1.23, 0.9],
            [0.3, 0.12],
            Some([-0.278, -0.05]),
        );
        check_gradients(
            "int4",
            [-3.7, -0.4, 0.26, 0.9, 3.3, 0.1, -1.2, 1.4, 0.61, -2.0],
            [0.4, 0.2],
            Some([0.1, -0.3]),
        );
    }
}
