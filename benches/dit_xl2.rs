//! DiT-XL/2 at full size (random weights; facebookresearch's architecture,
//! `DitConfig::published("DiT-XL/2", 256)`) on flex: the full-precision forward, the W4A4 FP4
//! forward (signed e2m1 weights per output channel and inputs per tensor; patch embedding and
//! final layer at e4m3; no adapters, as HQ-DiT is post-training) without and with HQ-DiT's
//! Hadamard rotation on the attention and MLP inputs, with peak resident memory after each, the
//! parameter count and the packed size against fp16. Batch 1 at latent 32 x 32 (256 px: 256
//! tokens); scales are plausible, not calibrated: the cost does not depend on them. Writes
//! `experiments/bench-dit-xl2/results.json` (or `$MSFP_BENCH_OUT`).
//!
//! With `--qat`, also one QAT step (median of `--runs`) of the rotated student with MSFP's
//! adapters (two of rank 16 per layer) and its peak memory; `--model DiT-S/2` (or B/2) runs a
//! smaller preset.
//!
//!     cargo bench --profile dev --bench dit_xl2 -- [--runs 3] [--image 256] [--qat] [--model DiT-XL/2]

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::Device;
use msfp::models::Denoiser;
use msfp::rng::SeededRng;

#[path = "common/dit_xl2.rs"]
mod dit;
#[path = "common/timing.rs"]
mod timing;
use timing::{arg, median_ms, peak_rss_mib};

fn main() {
    msfp::kernels::keep_freed_memory();
    msfp::kernels::on_pool(bench);
}

/// Everything `main` runs, on the kernels' thread pool.
fn bench() {
    let runs: usize = arg("--runs").map_or(3, |v| v.parse().expect("--runs N"));
    let image: usize = arg("--image").map_or(256, |v| v.parse().expect("--image 256|512"));
    let name = arg("--model").unwrap_or_else(|| "DiT-XL/2".into());
    let cfg = dit::config(&name, image);
    let latent = cfg.dit.input_size;
    let device = Device::flex();
    let t0 = Instant::now();
    let teacher = Denoiser::new(&cfg, &mut SeededRng::new(1), &device);
    let build_s = t0.elapsed().as_secs_f64();
    let parameters = teacher.num_params();
    let inputs = dit::Inputs::new(&cfg, 1, &device);
    let forward = |m: &Denoiser| {
        let _ = inputs.forward(m).into_data();
    };
    let (fp_ms, fp_all) = median_ms(1, runs, || forward(&teacher));
    let rss_fp = peak_rss_mib();
    eprintln!("fp32 forward {fp_ms:.0} ms, peak RSS {rss_fp:.0} MiB");
    drop(teacher);
    let mut phases = Vec::new();
    for hadamard in [false, true] {
        let (model, plan) = dit::student(&cfg, hadamard, 0, &device);
        let (ms, all) = median_ms(1, runs, || forward(&model));
        let rss = peak_rss_mib();
        eprintln!("W4A4 forward (Hadamard {hadamard}) {ms:.0} ms, peak RSS {rss:.0} MiB");
        let path =
            std::env::temp_dir().join(format!("msfp-dit-xl2-{}-{hadamard}.safetensors", std::process::id()));
        let run_cfg = msfp::Config { model: cfg.clone(), ..Default::default() };
        msfp::pipeline::export::export(&model, &plan, &run_cfg, &path).expect("export");
        let packed = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let _ = std::fs::remove_file(&path);
        phases.push(serde_json::json!({
            "hadamard": hadamard, "forward_ms": ms, "all_ms": all, "peak_rss_mib": rss, "packed_bytes": packed,
            "packed_vs_fp16": packed as f64 / (parameters as f64 * 2.0),
        }));
    }
    let qat = std::env::args().any(|a| a == "--qat").then(|| {
        let ad = device.clone().autodiff();
        let (model, _) = dit::student(&cfg, true, 16, &ad);
        let mut model = dit::trainable(model);
        let trainable: usize =
            msfp::base::params::collect_trainable(&model).values().map(|t| t.data.len()).sum();
        let inputs = dit::Inputs::new(&cfg, 1, &ad);
        let mut optim = msfp::train::optim::AdamW::new(0.0, 1.0);
        let (ms, all) = median_ms(0, runs, || model = dit::qat_step(model.clone(), &inputs, &mut optim));
        let rss = peak_rss_mib();
        eprintln!("QAT step (Hadamard, adapters of rank 16) {ms:.0} ms, peak RSS {rss:.0} MiB");
        serde_json::json!({ "step_ms": ms, "all_ms": all, "peak_rss_mib": rss, "trainable_parameters": trainable })
    });
    let qat_flag = if qat.is_some() { " --qat" } else { "" };
    let out = serde_json::json!({
        "command": format!(
            "cargo bench --profile dev --bench dit_xl2 -- --runs {runs} --image {image} --model {name}{qat_flag}"
        ),
        "model": format!("{name}, random weights (DitConfig::published)"),
        "backend": "flex (CPU)",
        "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all cores".into()),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "latent": [4, latent, latent],
        "batch": 1,
        "parameters": parameters,
        "build_s": build_s,
        "fp32_forward_ms": fp_ms,
        "fp32_all_ms": fp_all,
        "fp32_peak_rss_mib": rss_fp,
        "w4a4": phases,
        "qat_step_hadamard_lora16": qat,
        "fp16_bytes": parameters as u64 * 2,
    });
    let path = std::env::var("MSFP_BENCH_OUT").map(PathBuf::from).unwrap_or_else(|_| {
        let stem = if name == "DiT-XL/2" { String::new() } else { name.replace('/', "") + "-" };
        PathBuf::from(format!("experiments/bench-dit-xl2/results-{stem}{image}.json"))
    });
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(&out).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
