//! The GPU check's measurements (`tools/gpu-check.sh` runs this binary on a GPU machine):
//! 1. the fused fake quantizer (e2m1, per-row scales) forward + backward on 256M floats against
//!    a plain copy of the same tensor on the same device: the fraction of copy bandwidth;
//! 2. one QAT step of the quickstart's W4A4 student (tiny UNet, TALoRA, batch 2 x 4 as in
//!    fine-tuning) on the device, timed the way `tools/bench/torch_tiny_qat.py` times PyTorch.
//! With `--parity` it first runs the checks of `tests/cuda_parity.rs` (the same code), so one
//! carried binary does the whole GPU check. Then the kernel launches, host reads and time of the
//! tiny-SD QAT step (`common/launches.rs`, as `experiments/bench-gpu-launches/` counts them on
//! lavapipe). Writes JSON to `$MSFP_BENCH_OUT` (default `experiments/bench-cuda/msfp.json`).
//!
//! 3. with `--sd-latent N`, full-size SD1.4 (random weights): teacher forward, W4A4 student
//!    forward and one QAT step at latent N, batch `--sd-batch` (2: conditional + unconditional),
//!    timed the way `tools/bench/torch_sd14_qat.py` times PyTorch + diffusers (`--sd-only`: this
//!    part alone).
//!
//! 4. with `--dit-image N`, full-size DiT-XL/2 (random weights) at N pixels, batch 2 (a class and
//!    the null class, as DiT's guided sampler runs it): the fp32 forward, the W4A4 forward without
//!    and with HQ-DiT's Hadamard rotation, one QAT step of that student with MSFP's adapters, and
//!    the rotation's cost against its layers' matmuls (`common/rotation.rs`) (`--dit-only`: this
//!    part alone).
//!
//!     cargo bench --profile dev --features cuda --bench gpu -- [--parity] [--device cuda] [--elements 268435456] [--sd-latent 64] [--dit-image 256]

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use msfp::nn::StepCtx;
use msfp::quant::Format;
use msfp::quant::fused::fake_quantize_fused;
use msfp::rng::SeededRng;

#[path = "common/dit_xl2.rs"]
mod dit;
#[path = "../tests/common/gpu_parity.rs"]
mod gpu_parity;
#[path = "common/launches.rs"]
mod launches;
#[path = "common/rotation.rs"]
mod rotation;
#[path = "common/sd14.rs"]
mod sd14;
#[path = "common/timing.rs"]
mod timing;

use timing::{arg, median_ms};

fn quantizer(device: &Device, elements: usize) -> serde_json::Value {
    let cols = 4096;
    let rows = elements / cols;
    let x = Tensor::<2>::random([rows, cols], burn::tensor::Distribution::Normal(0.0, 2.0), device);
    let scale = Tensor::<2>::from_data(
        TensorData::new((0..rows).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect::<Vec<_>>(), [rows, 1]),
        device,
    );
    let format = Format::parse("e2m1").unwrap();
    // A copy: read every element once, write it once (what the quantizer's forward must do at least).
    let (copy_ms, copy_all) = median_ms(3, 10, || {
        let y = x.clone() * 1.0;
        let _ = y.slice([0..1, 0..1]).into_scalar::<f32>();
    });
    let (fwd_ms, _) = median_ms(3, 10, || {
        let q = fake_quantize_fused(x.clone(), &format, &scale, None).expect("fused path");
        let _ = q.slice([0..1, 0..1]).into_scalar::<f32>();
    });
    let (fwdbwd_ms, fwdbwd_all) = median_ms(3, 10, || {
        let xa = Tensor::<2>::from_inner(x.clone()).require_grad();
        let sa = Tensor::<2>::from_inner(scale.clone()).require_grad();
        let q = fake_quantize_fused(xa.clone(), &format, &sa, None).expect("fused path");
        let grads = q.sum().backward();
        let dx = xa.grad(&grads).unwrap();
        let _ = dx.slice([0..1, 0..1]).into_scalar::<f32>();
    });
    let gib = (rows * cols * 4) as f64 / (1u64 << 30) as f64;
    serde_json::json!({
        "elements": rows * cols,
        "format": "e2m1",
        "copy_ms": copy_ms,
        "copy_gib_per_s": 2.0 * gib / (copy_ms / 1e3),
        "fused_forward_ms": fwd_ms,
        "fused_fwd_bwd_ms": fwdbwd_ms,
        "forward_fraction_of_copy_bandwidth": copy_ms / fwd_ms,
        "ratio_fwd_bwd_vs_copy": fwdbwd_ms / copy_ms,
        "copy_all_ms": copy_all,
        "fwd_bwd_all_ms": fwdbwd_all,
    })
}

fn qat_step(device_spec: &str, device: &Device) -> serde_json::Value {
    let out = std::env::temp_dir().join("msfp-gpu-bench");
    let overrides = vec![
        format!("run.device=\"{device_spec}\""),
        format!("run.out_dir=\"{}\"", out.display()),
        "finetune.calib_samples=4".to_string(),
    ];
    let cfg = msfp::Config::load(Path::new("configs/quickstart.toml"), &overrides)
        .expect("configs/quickstart.toml (run from the repository root)");
    let ad = device.clone().autodiff();
    let schedule = msfp::diffusion::NoiseSchedule::new(&cfg.diffusion);
    let sampler = msfp::pipeline::finetune::trajectory_sampler(&cfg, &schedule);
    let (mut model, plan) = msfp::pipeline::finetune::calibrate_student(
        msfp::models::registry::load_denoiser(&cfg.model, None, device).expect("teacher"),
        &cfg,
        &msfp::models::Family::tiny(device),
        &sampler,
        &ad,
    )
    .expect("calibration");
    let mut optim = msfp::train::optim::AdamW::new(cfg.train.weight_decay, cfg.train.grad_clip);
    let b = 2 * cfg.train.batch_size;
    let mut rng = SeededRng::new(0);
    let (x0, target0) = (rng.normals(b * 1024), rng.normals(b * 1024));
    let mut step = || {
        let x = Tensor::<4>::from_data(TensorData::new(x0.clone(), [b, 1, 32, 32]), &ad);
        let target = Tensor::<4>::from_data(TensorData::new(target0.clone(), [b, 1, 32, 32]), &ad);
        let y = Tensor::<1, Int>::from_data(
            TensorData::new((0..b as i64).map(|i| i % 11).collect::<Vec<_>>(), [b]),
            &ad,
        );
        let t = Tensor::<1>::full([b], 500.0, &ad);
        let m = model.clone();
        let loss = (m.forward(x, t, y, &StepCtx::at(500)) - target).square().mean();
        let grads = loss.backward();
        // Only the student's trainable parameters have gradients.
        let (next, _) = optim.step_groups(m, &grads, |_| 1e-4);
        model = next;
        // Wait for the device: read one parameter value back.
        let _ = msfp::base::params::collect_trainable(&model).len();
    };
    let (ms, all) = median_ms(3, 15, &mut step);
    serde_json::json!({
        "model": "tiny_unet W4A4 (configs/quickstart.toml student)",
        "batch": b,
        "quant_sites": plan.sites.len(),
        "qat_step_ms": ms,
        "all_ms": all,
    })
}

/// GPU memory in use on the first GPU (nvidia-smi), MiB; None without nvidia-smi.
fn gpu_memory_used_mib() -> Option<f64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().next()?.trim().parse().ok()
}

/// Full-size SD1.4 (random weights) at `latent`, batch `batch`: the teacher's forward, the W4A4
/// student's forward and one QAT step, the way `tools/bench/torch_sd14_qat.py` times PyTorch +
/// diffusers (median of `runs` after `warmup`).
fn sd14_step(device: &Device, latent: usize, batch: usize, warmup: usize, runs: usize) -> serde_json::Value {
    let cfg = sd14::config(latent);
    let t0 = Instant::now();
    let teacher = msfp::models::registry::load_denoiser(&cfg.model, None, device).expect("SD UNet");
    let build_s = t0.elapsed().as_secs_f64();
    let parameters = teacher.num_params();
    let inputs = sd14::Inputs::new(batch, latent, device);
    let (teacher_ms, teacher_all) = median_ms(warmup, runs, || {
        let _ = inputs.forward(&teacher).slice([0..1, 0..1, 0..1, 0..1]).into_scalar::<f32>();
    });
    let gpu_teacher = gpu_memory_used_mib();
    eprintln!("sd14 teacher forward: {teacher_ms:.1} ms ({teacher_all:?})");
    drop(teacher);
    let ad = device.clone().autodiff();
    let (mut model, _plan, trainable) = sd14::student(&cfg, &ad);
    let valid = model.valid();
    let (student_ms, student_all) = median_ms(warmup, runs, || {
        let _ = inputs.forward(&valid).slice([0..1, 0..1, 0..1, 0..1]).into_scalar::<f32>();
    });
    drop(valid);
    eprintln!("sd14 student forward: {student_ms:.1} ms ({student_all:?})");
    let ad_inputs = sd14::Inputs::new(batch, latent, &ad);
    let mut optim = msfp::train::optim::AdamW::new(0.0, 1.0);
    let (qat_ms, qat_all) = median_ms(1, 3, || {
        model = sd14::qat_step(model.clone(), &ad_inputs, &mut optim);
        // Wait for the device: read one trainable value back.
        let first = msfp::base::params::collect_trainable(&model).into_values().next();
        std::hint::black_box(first);
    });
    eprintln!("sd14 QAT step: {qat_ms:.1} ms ({qat_all:?})");
    drop(model);
    // Where a QAT step's time goes: the full-precision UNet's forward + backward, with gradients
    // for its input only (what the frozen base layers need) and for every weight.
    let grad_phase = |all_weights: bool| {
        let m = msfp::models::registry::load_denoiser(&cfg.model, None, &ad).expect("SD UNet");
        let m = msfp::base::params::set_trainable(m, |_| all_weights);
        let (ms, all) = median_ms(1, 2, || {
            let x = ad_inputs.x.clone().require_grad();
            let cond = msfp::models::Cond::Tokens(ad_inputs.context.clone());
            let pred = m.forward(x.clone(), ad_inputs.t.clone(), cond, &msfp::nn::StepCtx::at(500));
            let grads = (pred - ad_inputs.target.clone()).square().mean().backward();
            let _ =
                x.grad(&grads).expect("input gradient").slice([0..1, 0..1, 0..1, 0..1]).into_scalar::<f32>();
        });
        eprintln!("sd14 fp32 forward+backward (weight gradients: {all_weights}): {ms:.1} ms ({all:?})");
        ms
    };
    let fwd_bwd_input_ms = grad_phase(false);
    let fwd_bwd_weights_ms = grad_phase(true);
    serde_json::json!({
        "model": "SD1.4 UNet, random weights, W4A4 student of configs/msfp_sd14.toml (benches/common/sd14.rs)",
        "latent": [4, latent, latent],
        "batch": batch,
        "unet_parameters": parameters,
        "student_trainable_parameters": trainable,
        "build_unet_s": build_s,
        "teacher_forward_ms": teacher_ms,
        "student_forward_ms": student_ms,
        "qat_step_ms": qat_ms,
        "fp32_forward_backward_input_grad_ms": fwd_bwd_input_ms,
        "fp32_forward_backward_weight_grads_ms": fwd_bwd_weights_ms,
        "all_ms": { "teacher_forward": teacher_all, "student_forward": student_all, "qat_step": qat_all },
        "gpu_memory_used_mib": { "after_teacher_forward": gpu_teacher, "after_qat_step": gpu_memory_used_mib() },
    })
}

/// Full-size DiT-XL/2 (random weights) at `image` pixels, batch `batch`: the fp32 forward, the
/// W4A4 forward without and with the Hadamard rotation, one QAT step of the rotated student with
/// adapters of rank 16 (median of `runs` after `warmup`), and the rotation's cost.
fn dit_xl2_step(
    device: &Device,
    image: usize,
    batch: usize,
    warmup: usize,
    runs: usize,
) -> serde_json::Value {
    let cfg = dit::config("DiT-XL/2", image);
    let wait = |t: Tensor<4>| t.slice([0..1, 0..1, 0..1, 0..1]).into_scalar::<f32>();
    let teacher = msfp::models::Denoiser::new(&cfg, &mut SeededRng::new(1), device);
    let parameters = teacher.num_params();
    let inputs = dit::Inputs::new(&cfg, batch, device);
    let (fp_ms, fp_all) = median_ms(warmup, runs, || {
        wait(inputs.forward(&teacher));
    });
    eprintln!("dit-xl2 fp32 forward: {fp_ms:.1} ms ({fp_all:?})");
    drop(teacher);
    let mut w4a4 = Vec::new();
    for hadamard in [false, true] {
        let (model, _) = dit::student(&cfg, hadamard, 0, device);
        let (ms, all) = median_ms(warmup, runs, || {
            wait(inputs.forward(&model));
        });
        eprintln!("dit-xl2 W4A4 forward (Hadamard {hadamard}): {ms:.1} ms ({all:?})");
        w4a4.push(serde_json::json!({ "hadamard": hadamard, "forward_ms": ms, "all_ms": all }));
    }
    let ad = device.clone().autodiff();
    let (model, plan) = dit::student(&cfg, true, 16, &ad);
    let mut model = dit::trainable(model);
    let trainable: usize = msfp::base::params::collect_trainable(&model).values().map(|t| t.data.len()).sum();
    let ad_inputs = dit::Inputs::new(&cfg, batch, &ad);
    let mut optim = msfp::train::optim::AdamW::new(0.0, 1.0);
    let (qat_ms, qat_all) = median_ms(1, runs, || {
        model = dit::qat_step(model.clone(), &ad_inputs, &mut optim);
        // Wait for the device: read one trainable value back.
        let first = msfp::base::params::collect_trainable(&model).into_values().next();
        std::hint::black_box(first);
    });
    eprintln!("dit-xl2 QAT step: {qat_ms:.1} ms ({qat_all:?})");
    let gpu_after_qat = gpu_memory_used_mib();
    drop(model);
    serde_json::json!({
        "model": "DiT-XL/2, random weights (DitConfig::published), W4A4 e2m1 (benches/common/dit_xl2.rs)",
        "image": image,
        "latent": [cfg.dit.in_channels, cfg.dit.input_size, cfg.dit.input_size],
        "batch": batch,
        "parameters": parameters,
        "rotated_sites": plan.sites.iter().filter(|s| s.hadamard.is_some()).count(),
        "qat_trainable_parameters": trainable,
        "fp32_forward_ms": fp_ms,
        "w4a4": w4a4,
        "qat_step_hadamard_lora16_ms": qat_ms,
        "all_ms": { "fp32_forward": fp_all, "qat_step": qat_all },
        "gpu_memory_used_mib_after_qat_step": gpu_after_qat,
        "rotation_cost": rotation::cost(device, 20),
    })
}

fn main() {
    let spec = arg("--device").unwrap_or_else(|| "cuda".into());
    let elements: usize = arg("--elements").map(|v| v.parse().expect("--elements N")).unwrap_or(1 << 28);
    let device = match msfp::device::make_device(&spec) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gpu bench: {e}");
            std::process::exit(2);
        }
    };
    let mut parity = serde_json::Value::Null;
    if std::env::args().any(|a| a == "--parity") {
        // Each check on its own: a failure is recorded with its message and the rest still run.
        let check = |what: &str, f: &dyn Fn() -> serde_json::Value| {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let v = r.unwrap_or_else(|e| {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                serde_json::json!({ "failed": msg })
            });
            eprintln!("parity {what}: {v}");
            v
        };
        parity = serde_json::json!({
            "tiny_forward_max_abs_diff": check("tiny forward", &|| {
                serde_json::json!(gpu_parity::tiny_models_match_flex(&device, &spec))
            }),
            "fused_quantizer": check("fused quantizer", &|| {
                gpu_parity::fused_quantizer_matches_flex(&device, &spec);
                serde_json::json!("ok")
            }),
            "hadamard_rotation": check("Hadamard rotation", &|| {
                gpu_parity::hadamard_rotation_matches_flex(&device, &spec);
                serde_json::json!("ok")
            }),
            "fused_quantizer_long_blocks": check("fused quantizer, long blocks", &|| {
                gpu_parity::fused_quantizer_long_blocks_match_flex(&device, &spec);
                serde_json::json!("ok")
            }),
            "norms": check("GroupNorm and LayerNorm", &|| {
                gpu_parity::norms_match_flex(&device, &spec);
                serde_json::json!("ok")
            }),
            "softmax": check("softmax", &|| {
                gpu_parity::softmax_matches_flex(&device, &spec);
                serde_json::json!("ok")
            }),
            "slot": check("adapter slot", &|| {
                gpu_parity::slot_matches_flex(&device, &spec);
                serde_json::json!("ok")
            }),
            "adamw": check("AdamW step", &|| {
                gpu_parity::adamw_step_matches_flex(&device, &spec);
                serde_json::json!("ok")
            }),
            "qat_losses_flex_vs_gpu": check("quickstart QAT", &|| {
                serde_json::json!(gpu_parity::quickstart_qat_matches_flex(&spec))
            }),
            "tolerance": gpu_parity::forward_tolerance(&spec),
        });
    }
    let only_sd = std::env::args().any(|a| a == "--sd-only");
    let only_dit = std::env::args().any(|a| a == "--dit-only");
    let (quant, qat, counts) = if only_sd || only_dit {
        (serde_json::Value::Null, serde_json::Value::Null, serde_json::Value::Null)
    } else {
        let quant = quantizer(&device, elements);
        eprintln!("quantizer: {quant}");
        let qat = qat_step(&spec, &device);
        eprintln!("qat step: {qat}");
        // What experiments/bench-gpu-launches counts on lavapipe, here on the GPU (with autotune).
        let counts = launches::tiny_sd_step(&spec, &device);
        eprintln!(
            "tiny SD QAT step: {} launches, {} host reads",
            counts["launches_per_step"], counts["host_reads_per_step"]
        );
        (quant, qat, counts)
    };
    let sd = match arg("--sd-latent") {
        Some(l) => {
            let latent = l.parse().expect("--sd-latent N");
            let batch = arg("--sd-batch").map(|v| v.parse().expect("--sd-batch N")).unwrap_or(2);
            sd14_step(&device, latent, batch, 2, 5)
        }
        None => serde_json::Value::Null,
    };
    let dit = match arg("--dit-image") {
        Some(i) => dit_xl2_step(&device, i.parse().expect("--dit-image 256|512"), 2, 2, 5),
        None => serde_json::Value::Null,
    };
    let out = serde_json::json!({
        "command": format!(
            "cargo bench --profile dev --features cuda --bench gpu -- {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
        "device": spec,
        "gpu": std::env::var("MSFP_GPU_NAME").unwrap_or_default(),
        "parity": parity,
        "quantizer": quant,
        "qat_step": qat,
        "tiny_sd_launches": counts,
        "sd14": sd,
        "dit_xl2": dit,
    });
    let path = std::env::var("MSFP_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("experiments/bench-cuda/msfp.json"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("output folder");
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&out).unwrap()).expect("write results");
    println!("{}", path.display());
}
