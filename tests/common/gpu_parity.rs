//! Checks shared by the GPU parity tests (`wgpu_parity.rs`, `cuda_parity.rs`): the same model
//! or quantizer on a GPU device and on flex must agree.
#![allow(dead_code)] // each test file uses a different subset

use burn::tensor::{Device, Int, Tensor, TensorData};
use msfp::config::{ModelConfig, ModelKind};
use msfp::models::Denoiser;
use msfp::nn::StepCtx;
use msfp::rng::SeededRng;

/// The output of a small tiny UNet or DiT (full precision, perturbed weights) on `device`.
pub fn tiny_forward(kind: ModelKind, device: &Device) -> Vec<f32> {
    let mut cfg = ModelConfig { kind, ..Default::default() };
    cfg.unet.base_channels = 8;
    cfg.unet.channel_mult = vec![1, 2];
    cfg.unet.attention_heads = 2;
    cfg.unet.groups = 4;
    cfg.dit.hidden = 32;
    cfg.dit.depth = 2;
    cfg.dit.heads = 2;
    // Weights come from the host RNG, so both devices build the same model; a deterministic
    // perturbation wakes up the DiT's zero-initialised (adaLN-Zero) layers.
    let model = Denoiser::new(&cfg, &mut SeededRng::new(3), device);
    let model = msfp::base::params::map_params(model, |_, t| {
        let n = t.dims()[0];
        let v: Vec<f32> = msfp::base::params::host_values(t.clone())
            .iter()
            .enumerate()
            .map(|(i, x)| x + 0.02 * (i as f32 * 0.37).sin())
            .collect();
        Tensor::from_data(TensorData::new(v, [n]), &t.device())
    });
    let x =
        Tensor::<4>::from_data(TensorData::new(SeededRng::new(4).normals(2 * 1024), [2, 1, 32, 32]), device);
    let t = Tensor::<1>::from_floats([250.0, 750.0], device);
    let y = Tensor::<1, Int>::from_ints([1, 10], device);
    model.forward(x, t, y, &StepCtx::default()).into_data().try_into_vec::<f32>().expect("f32")
}

/// What a backend's f32 convolutions and matmuls may differ from flex by, relative to the
/// output's scale: wgpu computes them in f32 (1e-4); CUDA's tuned matmuls run f32 on TF32 tensor
/// cores (10-bit mantissa, as PyTorch's cuDNN convolutions do by default), measured at 7.3e-4 on
/// the tiny UNet on an H200.
pub fn forward_tolerance(name: &str) -> f32 {
    if name.starts_with("cuda") { 5e-3 } else { 1e-4 }
}

/// Both tiny models give the same output on `gpu` as on flex within [`forward_tolerance`] of
/// max(1, max |output|); the largest differences found.
pub fn tiny_models_match_flex(gpu: &Device, name: &str) -> Vec<f32> {
    let tol = forward_tolerance(name);
    [ModelKind::TinyUnet, ModelKind::TinyDit]
        .into_iter()
        .map(|kind| {
            let (a, b) = (tiny_forward(kind, &Device::flex()), tiny_forward(kind, gpu));
            let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            let scale = a.iter().fold(1.0f32, |m, x| m.max(x.abs()));
            assert!(diff <= tol * scale, "{kind:?}: max |flex - {name}| = {diff} (output scale {scale})");
            diff
        })
        .collect()
}

/// The fused quantizer's CubeCL kernels (`quant/fused_cube.rs`) against the flex version: the
/// same values and the same STE / LSQ gradients, for FP, unsigned-FP-with-zero-point and integer
/// grids, with per-row scales over several blocks and exact ties (ties go to the even code).
pub fn fused_quantizer_matches_flex(gpu: &Device, name: &str) {
    use msfp::base::params::host_values;
    use msfp::quant::Format;
    use msfp::quant::fused::fake_quantize_fused;

    let (rows, cols) = (6, 50);
    let mut rng = SeededRng::new(7);
    let x0: Vec<f32> = rng.normals(rows * cols).iter().map(|v| v * 4.0).collect();
    let g0 = rng.normals(rows * cols);
    // Row 0 has scale 1 and zero point 0, so its inputs can sit exactly on the grid's midpoints.
    let s0: Vec<f32> = (0..rows).map(|i| if i == 0 { 1.0 } else { 0.15 + 0.1 * i as f32 }).collect();
    let z0: Vec<f32> = (0..rows).map(|i| -0.05 * i as f32).collect();
    for (spec, zero) in [("e2m1", false), ("ue2m2", true), ("int4", false), ("e4m3", false), ("e3m0", false)]
    {
        let format = Format::parse(spec).unwrap();
        let grid = format.values();
        let mut x0 = x0.clone();
        for (slot, pair) in x0[..cols].iter_mut().zip(grid.windows(2)) {
            *slot = (pair[0] + pair[1]) / 2.0;
        }
        let run = |device: &Device| {
            let t = |v: &[f32], shape: [usize; 2]| {
                Tensor::<2>::from_data(TensorData::new(v.to_vec(), shape), device)
            };
            let x = t(&x0, [rows, cols]).require_grad();
            let s = t(&s0, [rows, 1]).require_grad();
            let z = zero.then(|| t(&z0, [rows, 1]).require_grad());
            let q = fake_quantize_fused(x.clone(), &format, &s, z.as_ref())
                .unwrap_or_else(|_| panic!("{spec}: the fused path applies on {device:?}"));
            let grads = (q.clone() * t(&g0, [rows, cols])).sum().backward();
            let dz = z.map(|z| host_values(z.grad(&grads).unwrap()));
            (host_values(q), host_values(x.grad(&grads).unwrap()), host_values(s.grad(&grads).unwrap()), dz)
        };
        let (fq, fdx, fds, fdz) = run(&Device::flex().autodiff());
        let (gq, gdx, gds, gdz) = run(&gpu.clone().autodiff());
        let close = |a: &[f32], b: &[f32], tol: f32, what: &str| {
            assert_eq!(a.len(), b.len());
            for (i, (a, b)) in a.iter().zip(b).enumerate() {
                assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{spec} {what}[{i}]: {name} {a} vs flex {b}");
            }
        };
        close(&gq, &fq, 1e-6, "q");
        close(&gdx, &fdx, 0.0, "dx");
        close(&gds, &fds, 1e-5, "ds");
        if let (Some(g), Some(f)) = (gdz, fdz) {
            close(&g, &f, 1e-5, "dz");
        }
        if format.bits() == 4 {
            assert!(fdx.iter().any(|&d| d == 0.0), "{spec}: some inputs are clipped");
        }
    }
    // A transposed view (attention quantizes K^T): the same values at the same logical positions.
    let transposed = |device: &Device| {
        let x = Tensor::<2>::from_data(TensorData::new(x0.clone(), [rows, cols]), device).transpose();
        let s = Tensor::<2>::from_data(TensorData::new(vec![0.3f32], [1, 1]), device);
        let q = fake_quantize_fused(x, &Format::parse("e2m1").unwrap(), &s, None)
            .unwrap_or_else(|_| panic!("the fused path applies on {device:?}"));
        host_values(q)
    };
    assert_eq!(transposed(gpu), transposed(&Device::flex()), "e2m1 on a transposed view: {name} vs flex");
}

/// The quantizer's backward on blocks long enough for its in-kernel reduction: one cube per
/// block (per-row scales over 3000 values), several cubes per block whose partial sums a second
/// reduction adds (one scale over 3 x 7000 values, as a per-tensor activation scale), each with
/// and without a zero point, for a frozen input (no `dx`) and for a transposed input and gradient
/// (read through their strides): the same `dx` bits as flex and the same scale and zero-point
/// gradients up to summation order.
pub fn fused_quantizer_long_blocks_match_flex(gpu: &Device, name: &str) {
    use msfp::base::params::host_values;
    use msfp::quant::Format;
    use msfp::quant::fused::fake_quantize_fused;

    for (rows, cols, per_tensor) in [(4, 3000, false), (3, 7000, true)] {
        let x0: Vec<f32> = SeededRng::new(11).normals(rows * cols).iter().map(|v| v * 3.0).collect();
        let g0 = SeededRng::new(12).normals(rows * cols);
        let blocks = if per_tensor { 1 } else { rows };
        let s0: Vec<f32> = (0..blocks).map(|i| 0.4 + 0.1 * i as f32).collect();
        let z0: Vec<f32> = (0..blocks).map(|i| -0.2 - 0.05 * i as f32).collect();
        let cases = [
            ("e2m1", false, false, false),
            ("ue2m2", true, false, false),
            ("e2m1", false, true, false),
            ("ue2m2", true, false, true),
        ];
        for (spec, zero, frozen, transposed) in cases {
            let format = Format::parse(spec).unwrap();
            let run = |device: &Device| {
                let t = |v: &[f32], shape: [usize; 2]| {
                    Tensor::<2>::from_data(TensorData::new(v.to_vec(), shape), device)
                };
                // Transposed views (read through their strides by the GPU kernels): the input,
                // and so the gradient that reaches the quantizer.
                let x = if transposed { t(&x0, [cols, rows]).transpose() } else { t(&x0, [rows, cols]) };
                let x = if frozen { x } else { x.require_grad() };
                let s = t(&s0, [blocks, 1]).require_grad();
                let z = zero.then(|| t(&z0, [blocks, 1]).require_grad());
                let q = fake_quantize_fused(x.clone(), &format, &s, z.as_ref())
                    .unwrap_or_else(|_| panic!("{spec}: the fused path applies on {device:?}"));
                let g = if transposed { t(&g0, [cols, rows]).transpose() } else { t(&g0, [rows, cols]) };
                let grads = (q * g).sum().backward();
                let dx = x.grad(&grads).map(host_values);
                let dz = z.map(|z| host_values(z.grad(&grads).unwrap()));
                (dx, host_values(s.grad(&grads).unwrap()), dz)
            };
            let (fdx, fds, fdz) = run(&Device::flex().autodiff());
            let (gdx, gds, gdz) = run(&gpu.clone().autodiff());
            let what = format!(
                "{spec} over [{rows}, {cols}] (per tensor: {per_tensor}, frozen: {frozen}, transposed: {transposed})"
            );
            assert_eq!(gdx.is_none(), frozen, "{what}: dx only for a trained input");
            assert_eq!(gdx, fdx, "{what}: dx on {name} vs flex");
            // Sums of thousands of terms in another order: relative to the sum of their sizes.
            let close = |a: &[f32], b: &[f32], what: &str| {
                assert_eq!(a.len(), b.len());
                for (a, b) in a.iter().zip(b) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{what}: {name} {a} vs flex {b}");
                }
            };
            close(&gds, &fds, &format!("{what} ds"));
            if let (Some(g), Some(f)) = (&gdz, &fdz) {
                close(g, f, &format!("{what} dz"));
            }
        }
    }
}

/// AdamW's step on a GPU (`AdamW::step_deferred`: the clipping factor on the device, each
/// parameter's update one kernel, `train/adamw_cube.rs`) against flex's tensor ops: the same
/// parameters within f32 rounding over three clipped steps (weight decay on, first-step moments,
/// one parameter under the positivity bound), and on the GPU no read to the host in the step.
pub fn adamw_step_matches_flex(gpu: &Device, name: &str) {
    use msfp::base::params::{collect_grads, host_reads, host_values};
    use msfp::nn::Linear;
    use msfp::train::optim::AdamW;

    let run = |device: &Device| {
        let mut layer = Linear::new(6, 5, true, &mut SeededRng::new(4), device);
        let x = Tensor::<2>::from_data(TensorData::new(SeededRng::new(5).normals(8 * 6), [8, 6]), device);
        let mut opt = AdamW::new(0.01, 0.5);
        let mut reads = 0;
        let mut norms = Vec::new();
        for _ in 0..3 {
            // Large gradients, so that the 0.5 bound clips every step.
            let loss = (layer.forward(x.clone(), &StepCtx::default()) * 40.0).square().mean();
            let grads = collect_grads(&layer, &loss.backward());
            let before = host_reads();
            // The bias as a quantizer scale would be: bounded to half its value per step (a rate
            // large enough for the bound to bite).
            let lr = |p: &str| if p == "bias" { 1.0 } else { 0.01 };
            let (next, squared) = opt.step_deferred(layer, grads, lr, |p| p == "bias");
            reads += host_reads() - before;
            norms.push(host_values(squared)[0].sqrt());
            layer = next;
        }
        let mut values = host_values(layer.weight.val().flatten::<1>(0, 1));
        values.extend(host_values(layer.bias.as_ref().expect("bias").val()));
        (values, norms, reads)
    };
    let (f, fnorms, _) = run(&Device::flex().autodiff());
    let (g, gnorms, greads) = run(&gpu.clone().autodiff());
    assert!(fnorms.iter().all(|&n| n > 0.5), "every step clips: norms {fnorms:?}");
    assert_eq!(greads, 0, "{name}: the step itself reads nothing back");
    for (a, b) in gnorms.iter().zip(&fnorms) {
        assert!((a - b).abs() <= 1e-5 * b, "gradient norm: {name} {a} vs flex {b}");
    }
    for (i, (a, b)) in g.iter().zip(&f).enumerate() {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "parameter {i}: {name} {a} vs flex {b}");
    }
}

/// GroupNorm(+SiLU) and LayerNorm on a GPU (`kernels/norm_cube.rs`: one kernel forward, one
/// backward) against flex's fused versions: outputs and the gradients of the input (and
/// GroupNorm's scale and shift), with and without SiLU, over one and two samples, groups of 2 to
/// 10 channels, odd spatial sizes and rows of 48 and 320.
pub fn norms_match_flex(gpu: &Device, name: &str) {
    use msfp::base::params::host_values;
    use msfp::kernels::norm::{group_norm, layer_norm};

    for (b, c, h, w, groups, silu) in
        [(2, 8, 5, 7, 4, true), (1, 20, 3, 3, 2, false), (2, 64, 16, 16, 32, true)]
    {
        let n = b * c * h * w;
        let x0: Vec<f32> = SeededRng::new(21).normals(n).iter().map(|v| v * 2.0 + 0.5).collect();
        let g0 = SeededRng::new(22).normals(n);
        let gamma0: Vec<f32> = SeededRng::new(23).normals(c).iter().map(|v| 1.0 + 0.2 * v).collect();
        let beta0: Vec<f32> = SeededRng::new(24).normals(c).iter().map(|v| 0.1 * v).collect();
        let run = |device: &Device| {
            let x = Tensor::<4>::from_data(TensorData::new(x0.clone(), [b, c, h, w]), device).require_grad();
            let gamma = Tensor::<1>::from_data(TensorData::new(gamma0.clone(), [c]), device).require_grad();
            let beta = Tensor::<1>::from_data(TensorData::new(beta0.clone(), [c]), device).require_grad();
            let y = group_norm(x.clone(), gamma.clone(), beta.clone(), groups, 1e-5, silu);
            let upstream = Tensor::<4>::from_data(TensorData::new(g0.clone(), [b, c, h, w]), device);
            let grads = (y.clone() * upstream).sum().backward();
            (
                host_values(y),
                host_values(x.grad(&grads).expect("dx")),
                host_values(gamma.grad(&grads).expect("dgamma")),
                host_values(beta.grad(&grads).expect("dbeta")),
            )
        };
        let (flex, other) = (run(&Device::flex().autodiff()), run(&gpu.clone().autodiff()));
        let what = format!("GroupNorm [{b}, {c}, {h}, {w}] / {groups} (silu: {silu})");
        for (label, a, f) in [
            ("y", &other.0, &flex.0),
            ("dx", &other.1, &flex.1),
            ("dgamma", &other.2, &flex.2),
            ("dbeta", &other.3, &flex.3),
        ] {
            assert_eq!(a.len(), f.len());
            let scale = f.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            for (i, (a, f)) in a.iter().zip(f.iter()).enumerate() {
                assert!((a - f).abs() <= 1e-4 * scale, "{what} {label}[{i}]: {name} {a} vs flex {f}");
            }
        }
    }
    for shape in [[2, 7, 48], [1, 3, 320]] {
        let n = shape.iter().product();
        let x0: Vec<f32> = SeededRng::new(25).normals(n).iter().map(|v| v * 3.0 - 1.0).collect();
        let g0 = SeededRng::new(26).normals(n);
        let run = |device: &Device| {
            let x = Tensor::<3>::from_data(TensorData::new(x0.clone(), shape), device).require_grad();
            let y = layer_norm(x.clone(), 1e-6);
            let grads = (y.clone() * Tensor::<3>::from_data(TensorData::new(g0.clone(), shape), device))
                .sum()
                .backward();
            (host_values(y), host_values(x.grad(&grads).expect("dx")))
        };
        let (flex, other) = (run(&Device::flex().autodiff()), run(&gpu.clone().autodiff()));
        for (label, a, f) in [("y", &other.0, &flex.0), ("dx", &other.1, &flex.1)] {
            let scale = f.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            for (i, (a, f)) in a.iter().zip(f.iter()).enumerate() {
                assert!(
                    (a - f).abs() <= 1e-4 * scale,
                    "LayerNorm {shape:?} {label}[{i}]: {name} {a} vs flex {f}"
                );
            }
        }
    }
}

/// Softmax over the last dimension on a GPU (`kernels/softmax_cube.rs`: one kernel forward, one
/// backward) against flex's fused version: values and gradients on rows of 19 and 300 (wider
/// than a cube), large logits and a masked (-inf) entry.
pub fn softmax_matches_flex(gpu: &Device, name: &str) {
    use msfp::base::params::host_values;
    use msfp::kernels::softmax::softmax;

    for shape in [[3, 50, 19], [2, 4, 300]] {
        let n: usize = shape.iter().product();
        let mut x0: Vec<f32> = SeededRng::new(31).normals(n).iter().map(|v| v * 6.0 + 30.0).collect();
        x0[5] = f32::NEG_INFINITY;
        let g0 = SeededRng::new(32).normals(n);
        let run = |device: &Device| {
            let x = Tensor::<3>::from_data(TensorData::new(x0.clone(), shape), device).require_grad();
            let y = softmax(x.clone());
            let grads = (y.clone() * Tensor::<3>::from_data(TensorData::new(g0.clone(), shape), device))
                .sum()
                .backward();
            (host_values(y), host_values(x.grad(&grads).expect("dx")))
        };
        let (flex, other) = (run(&Device::flex().autodiff()), run(&gpu.clone().autodiff()));
        assert_eq!(other.0[5], 0.0, "{name}: a masked entry has probability 0");
        for (label, a, f) in [("y", &other.0, &flex.0), ("dx", &other.1, &flex.1)] {
            for (i, (a, f)) in a.iter().zip(f.iter()).enumerate() {
                assert!(
                    (a - f).abs() <= 1e-5 * (1.0 + f.abs()),
                    "softmax {shape:?} {label}[{i}]: {name} {a} vs flex {f}"
                );
            }
        }
    }
}

/// One slot of a stacked parameter (`kernels::slot`, TALoRA's routed adapter; on a GPU with a
/// one-kernel backward): the same values and gradient bits as flex's slice, at every slot.
pub fn slot_matches_flex(gpu: &Device, name: &str) {
    use msfp::base::params::host_values;
    use msfp::kernels::slot;

    let shape = [3, 4, 5];
    let x0 = SeededRng::new(41).normals(60);
    let g0 = SeededRng::new(42).normals(20);
    // Used as is, and transposed (its gradient then arrives as a permuted view).
    for (j, transposed) in [(0, false), (1, false), (2, false), (1, true)] {
        let run = |device: &Device| {
            let x = Tensor::<3>::from_data(TensorData::new(x0.clone(), shape), device).require_grad();
            let y = slot(x.clone(), j);
            let loss = match transposed {
                false => y.clone() * Tensor::<3>::from_data(TensorData::new(g0.clone(), [1, 4, 5]), device),
                true => {
                    y.clone().swap_dims(1, 2)
                        * Tensor::<3>::from_data(TensorData::new(g0.clone(), [1, 5, 4]), device)
                }
            };
            let grads = loss.sum().backward();
            (host_values(y), host_values(x.grad(&grads).expect("dx")))
        };
        let what = format!("slot {j} (transposed: {transposed})");
        assert_eq!(run(&gpu.clone().autodiff()), run(&Device::flex().autodiff()), "{what}: {name} vs flex");
    }
}

/// HQ-DiT's online rotation (`quant/hadamard_cube.rs` on the GPU) against flex: the same bits
/// forward and backward (its transpose) at the widths of the tiny DiT, DiT-XL/2's attention
/// (1152: nine blocks of 128 per row) and MLP (4608: blocks of 512, several butterfly pairs per
/// thread), on a transposed view, and on a block too wide for shared memory (the tensor-op path,
/// whose gradient agrees up to rounding).
pub fn hadamard_rotation_matches_flex(gpu: &Device, name: &str) {
    use msfp::base::params::host_values;
    use msfp::quant::hadamard::{Hadamard, HadamardSpec};

    for (rows, width) in [(5, 48), (3, 1152), (2, 4608), (1, 8192)] {
        let r = Hadamard::new(HadamardSpec::for_width(width, 9).unwrap(), width);
        let x0 = SeededRng::new(3).normals(rows * width);
        let g0 = SeededRng::new(4).normals(rows * width);
        let run = |device: &Device| {
            let t = |v: &[f32]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [rows, width]), device);
            let x = t(&x0).require_grad();
            let y = r.rotate(x.clone());
            let grads = (y.clone() * t(&g0)).sum().backward();
            (host_values(y), host_values(x.grad(&grads).unwrap()))
        };
        let (fy, fdx) = run(&Device::flex().autodiff());
        let (gy, gdx) = run(&gpu.clone().autodiff());
        // Past the kernel's shared memory, the tensor ops' own backward runs the stages in
        // reverse order: the same gradient up to rounding.
        let grad_tol = if width > 4096 { 1e-5 } else { 0.0 };
        let first_off = |a: &[f32], b: &[f32], tol: f32| {
            a.iter().zip(b).position(|(p, q)| (p - q).abs() > tol * (1.0 + q.abs())).map(|i| (i, a[i], b[i]))
        };
        assert_eq!(first_off(&gy, &fy, 0.0), None, "rotation of width {width}: (index, {name}, flex)");
        assert_eq!(first_off(&gdx, &fdx, grad_tol), None, "gradient of width {width}: (index, {name}, flex)");
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&gy) - norm(&x0)).abs() < 1e-4 * norm(&x0), "width {width}: the rotation keeps norms");
    }
    let r = Hadamard::new(HadamardSpec::for_width(64, 2).unwrap(), 64);
    let x0 = SeededRng::new(5).normals(64 * 6);
    let view = |device: &Device| {
        let x = Tensor::<2>::from_data(TensorData::new(x0.clone(), [64, 6]), device).transpose();
        host_values(r.rotate(x))
    };
    let (a, b) = (view(gpu), view(&Device::flex()));
    assert!(a == b, "rotation of a transposed view: {name} differs from flex");
}

/// Calibration and four fine-tuning steps of `configs/quickstart.toml` (relative to the working
/// directory: the repository root) on `device`, into `out`; the four losses.
pub fn quickstart_losses(device: &str, out: &std::path::Path) -> Vec<f64> {
    let overrides: Vec<String> = vec![
        format!("run.device=\"{device}\""),
        format!("run.out_dir=\"{}\"", out.display()),
        "train.steps=4".into(),
        "train.log_every=1".into(),
        "finetune.calib_samples=4".into(),
    ];
    let cfg = msfp::Config::load(std::path::Path::new("configs/quickstart.toml"), &overrides)
        .expect("configs/quickstart.toml (run from the repository root)");
    msfp::pipeline::finetune::fit(&cfg, msfp::pipeline::pretrain::Resume::No)
        .unwrap_or_else(|e| panic!("quickstart fit on {device}: {e}"));
    msfp::train::metrics::MetricsLog::read_all(out).iter().map(|m| m.loss).collect()
}

/// Four QAT steps of the quickstart on `gpu_spec` give the losses they give on flex within
/// [`forward_tolerance`] (relative).
pub fn quickstart_qat_matches_flex(gpu_spec: &str) -> Vec<(f64, f64)> {
    let dir = std::env::temp_dir().join(format!("msfp-qat-parity-{}", std::process::id()));
    let flex = quickstart_losses("flex", &dir.join("flex"));
    let gpu = quickstart_losses(gpu_spec, &dir.join(gpu_spec.replace(':', "-")));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(flex.len(), 4, "four logged steps on flex");
    assert_eq!(gpu.len(), 4, "four logged steps on {gpu_spec}");
    let tol = forward_tolerance(gpu_spec) as f64;
    for (i, (f, g)) in flex.iter().zip(&gpu).enumerate() {
        assert!((f - g).abs() <= tol * (1.0 + f.abs()), "step {}: {gpu_spec} loss {g} vs flex {f}", i + 1);
    }
    flex.into_iter().zip(gpu).collect()
}
