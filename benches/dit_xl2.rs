//! DiT-XL/2 at full size (random weights; facebookresearch's architecture,
//! `DitConfig::published("DiT-XL/2", 256)`) on flex: the full-precision forward, the W4A4 FP4
//! forward (signed e2m1 weights per output channel and inputs per tensor; patch embedding and
//! final layer at e4m3; no adapters, as HQ-DiT is post-training) without and with HQ-DiT's
//! Hadamard rotation on the attention and MLP inputs, with peak resident memory after each, the
//! parameter count and the packed size against fp16. Batch 1 at latent 32 x 32 (256 px: 256
//! tokens); scales are plausible, not calibrated: the cost does not depend on them. Writes
//! `experiments/bench-dit-xl2/results.json` (or `$MSFP_BENCH_OUT`).
//!
//!     cargo bench --profile dev --bench dit_xl2 -- [--runs 3] [--image 256]

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use msfp::config::{DitConfig, ModelConfig, ModelKind};
use msfp::lora::LoraConfig;
use msfp::models::Denoiser;
use msfp::nn::StepCtx;
use msfp::pipeline::student::{self, StudentPlan};
use msfp::quant::hadamard::HadamardSpec;
use msfp::quant::plan::SiteReport;
use msfp::rng::SeededRng;

#[path = "common/scales.rs"]
mod scales;
#[path = "common/timing.rs"]
mod timing;
use timing::{arg, median_ms, peak_rss_mib};

/// The W4A4 student of `cfg` (rotated attention and MLP inputs with `hadamard`) and its plan.
fn student(cfg: &ModelConfig, hadamard: bool, device: &Device) -> (Denoiser, StudentPlan) {
    let mut model = Denoiser::new(cfg, &mut SeededRng::new(1), device);
    let eight_bit = |p: &str| p == "patch_embed" || p == "final_linear";
    let rotated =
        |p: &str| hadamard && ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"].iter().any(|k| p.ends_with(k));
    let sites = model
        .quant_sites()
        .into_iter()
        .filter(|s| s.layer.has_weight())
        .map(|s| {
            let format = if eight_bit(&s.path) { "e4m3" } else { "e2m1" };
            SiteReport {
                hadamard: rotated(&s.path)
                    .then(|| HadamardSpec::for_width(s.layer.weight_dims()[1], 7).unwrap()),
                weight_format: Some(format.into()),
                act_format: Some(format.into()),
                path: s.path,
                ..Default::default()
            }
        })
        .collect();
    let lora = LoraConfig { rank: 0, ..Default::default() };
    let plan = StudentPlan { sites, act_timestep_slots: 1, timesteps: 1000, lora };
    student::build(&mut model, &plan, 0).expect("student");
    let model = scales::plausible(model, 0.005);
    (model, plan)
}

fn main() {
    msfp::kernels::keep_freed_memory();
    msfp::kernels::on_pool(bench);
}

/// Everything `main` runs, on the kernels' thread pool.
fn bench() {
    let runs: usize = arg("--runs").map_or(3, |v| v.parse().expect("--runs N"));
    let image: usize = arg("--image").map_or(256, |v| v.parse().expect("--image 256|512"));
    let dit = DitConfig::published("DiT-XL/2", image).expect("preset");
    let latent = dit.input_size;
    let cfg = ModelConfig { kind: ModelKind::TinyDit, dit, ..Default::default() };
    let device = Device::flex();
    let t0 = Instant::now();
    let teacher = Denoiser::new(&cfg, &mut SeededRng::new(1), &device);
    let build_s = t0.elapsed().as_secs_f64();
    let parameters = teacher.num_params();
    let mut rng = SeededRng::new(2);
    let x = Tensor::<4>::from_data(
        TensorData::new(rng.normals(4 * latent * latent), [1, 4, latent, latent]),
        &device,
    );
    let t = Tensor::<1>::full([1], 500.0, &device);
    let y = Tensor::<1, Int>::from_ints([207], &device);
    let forward = |m: &Denoiser| {
        let out = m.forward(x.clone(), t.clone(), y.clone(), &StepCtx::at(500));
        assert_eq!(out.dims(), [1, 4, latent, latent], "eps half of the learned-sigma output");
        let _ = out.into_data();
    };
    let (fp_ms, fp_all) = median_ms(1, runs, || forward(&teacher));
    let rss_fp = peak_rss_mib();
    eprintln!("fp32 forward {fp_ms:.0} ms, peak RSS {rss_fp:.0} MiB");
    drop(teacher);
    let mut phases = Vec::new();
    for hadamard in [false, true] {
        let (model, plan) = student(&cfg, hadamard, &device);
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
    let out = serde_json::json!({
        "command": format!("cargo bench --profile dev --bench dit_xl2 -- --runs {runs} --image {image}"),
        "model": "DiT-XL/2, random weights (DitConfig::published)",
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
        "fp16_bytes": parameters as u64 * 2,
    });
    let path = std::env::var("MSFP_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(format!("experiments/bench-dit-xl2/results-{image}.json")));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(&out).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
