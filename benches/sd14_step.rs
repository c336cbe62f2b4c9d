//! Stable Diffusion v1.4 at full size (random weights: `model.sd.random_weights`), on flex: the
//! teacher UNet's forward, the W4A4 student's forward and one QAT step (forward, backward, AdamW
//! on the adapters and quantizer scales) at one latent size and batch (1 unless `--batch`), with the peak resident
//! memory after each phase, the parameter count and the packed size against fp16. The student is
//! the job's structure (`configs/msfp_sd14.toml`: signed FP4 e2m1 weights per output channel,
//! unsigned ue2m2 + zero point inputs after SiLU/GELU/softmax and e2m1 elsewhere, conv_in and
//! conv_out at e4m3, TALoRA 2 adapters of rank 16, branch placement) with plausible scales instead
//! of calibrated ones: the cost does not depend on the values. Writes
//! `experiments/bench-sd14-step/results.json` (or `$MSFP_BENCH_OUT`).
//!
//!     cargo bench --profile dev --bench sd14_step -- [--latent 64] [--batch 2] [--runs 2] [--no-qat]
//!
//! `--no-qat` measures the forwards only. `--qat-only` (`--forward-only`) builds the student and
//! times its QAT steps (its forwards) alone, writing no results: the window a profiler (`perf
//! record`) should see.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::Device;

#[path = "common/sd14.rs"]
mod sd14;
#[path = "common/timing.rs"]
mod timing;
use timing::{arg, peak_rss_mib};

/// Seconds of each of `runs` calls of `f`.
fn time(runs: usize, mut f: impl FnMut()) -> Vec<f64> {
    (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect()
}

fn main() {
    msfp::kernels::keep_freed_memory();
    msfp::kernels::on_pool(bench);
}

/// Everything `main` runs, on the kernels' thread pool.
fn bench() {
    let latent: usize = arg("--latent").map(|v| v.parse().expect("--latent N")).unwrap_or(64);
    let runs: usize = arg("--runs").map(|v| v.parse().expect("--runs N")).unwrap_or(2);
    let batch: usize = arg("--batch").map(|v| v.parse().expect("--batch N")).unwrap_or(1);
    let qat = !std::env::args().any(|a| a == "--no-qat");
    let cfg = sd14::config(latent);
    let device = Device::flex();
    if std::env::args().any(|a| a == "--qat-only") {
        let ad = device.autodiff();
        let (mut model, _, _) = sd14::student(&cfg, &ad);
        let inputs = sd14::Inputs::new(batch, latent, &ad);
        let mut optim = msfp::train::optim::AdamW::new(0.0, 1.0);
        let qat_s = time(runs, || model = sd14::qat_step(model.clone(), &inputs, &mut optim));
        eprintln!("QAT step: {qat_s:?} s, peak RSS {:.0} MiB", peak_rss_mib());
        return;
    }
    if std::env::args().any(|a| a == "--forward-only") {
        let (model, _, _) = sd14::student(&cfg, &device.clone().autodiff());
        let (valid, inputs) = (model.valid(), sd14::Inputs::new(batch, latent, &device));
        let forward_s = time(runs, || {
            let _ = inputs.forward(&valid).into_data();
        });
        eprintln!("student forward: {forward_s:?} s, peak RSS {:.0} MiB", peak_rss_mib());
        return;
    }
    let t0 = Instant::now();
    let teacher = msfp::models::registry::load_denoiser(&cfg.model, None, &device).expect("SD UNet");
    let build_s = t0.elapsed().as_secs_f64();
    let parameters = teacher.num_params();
    let inputs = sd14::Inputs::new(batch, latent, &device);
    let teacher_s = time(runs, || {
        let _ = inputs.forward(&teacher).into_data();
    });
    let rss_teacher = peak_rss_mib();
    eprintln!("teacher forward: {teacher_s:?} s, peak RSS {rss_teacher:.0} MiB");

    let ad = device.clone().autodiff();
    let (mut model, plan, trainable) = sd14::student_of(teacher.clone(), &cfg);
    let valid = model.valid();
    let student_s = time(runs, || {
        let _ = inputs.forward(&valid).into_data();
    });
    let rss_student = peak_rss_mib();
    eprintln!("student forward: {student_s:?} s, peak RSS {rss_student:.0} MiB");
    // The same student deployed (weights quantized once, as evaluation and the packed model run it).
    let deployed = msfp::pipeline::export::deploy(&valid);
    drop(valid);
    let deployed_s = time(runs, || {
        let _ = inputs.forward(&deployed).into_data();
    });
    drop(deployed);
    eprintln!("deployed student forward: {deployed_s:?} s");

    let mut optim = msfp::train::optim::AdamW::new(0.0, 1.0);
    let ad_inputs = sd14::Inputs::new(batch, latent, &ad);
    let qat_s = time(if qat { runs } else { 0 }, || {
        model = sd14::qat_step(model.clone(), &ad_inputs, &mut optim);
    });
    let rss_qat = peak_rss_mib();
    eprintln!("QAT step: {qat_s:?} s, peak RSS {rss_qat:.0} MiB");

    let dir = tempfile_dir();
    let packed = dir.join("sd14.packed.safetensors");
    msfp::pipeline::export::export(&model.valid(), &plan, &cfg, &packed).expect("export");
    let packed_bytes = std::fs::metadata(&packed).map(|m| m.len()).unwrap_or(0);
    let _ = std::fs::remove_file(&packed);

    // The upper median (of two runs: the slower).
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let out = serde_json::json!({
        "command": format!(
            "cargo bench --profile dev --bench sd14_step -- --latent {latent} --batch {batch} --runs {runs}{}",
            if qat { "" } else { " --no-qat" }
        ),
        "backend": "flex (CPU)",
        "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all cores".into()),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "latent": [4, latent, latent],
        "batch": batch,
        "unet_parameters": parameters,
        "student_trainable_parameters": trainable,
        "build_unet_s": build_s,
        "teacher_forward_s": median(&teacher_s),
        "student_forward_s": median(&student_s),
        "deployed_student_forward_s": median(&deployed_s),
        "qat_step_s": median(&qat_s),
        "all_runs_s": { "teacher_forward": teacher_s, "student_forward": student_s, "deployed_student_forward": deployed_s, "qat_step": qat_s },
        "peak_rss_mib": { "after_teacher_forward": rss_teacher, "after_student_forward": rss_student, "after_qat_step": qat.then_some(rss_qat) },
        "packed_bytes": packed_bytes,
        "fp16_bytes": parameters as u64 * 2,
        "packed_vs_fp16": packed_bytes as f64 / (parameters as f64 * 2.0),
    });
    let path = std::env::var("MSFP_BENCH_OUT").map(PathBuf::from).unwrap_or_else(|_| {
        let suffix = if batch == 1 { String::new() } else { format!("-batch{batch}") };
        PathBuf::from(format!("experiments/bench-sd14-step/results-latent{latent}{suffix}.json"))
    });
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(&out).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}

fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("msfp-sd14-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
