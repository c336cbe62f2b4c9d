//! One full-precision training step (forward, backward, AdamW) of each shipped tiny teacher at
//! its configured batch size, on flex, beside the forward pass alone as the in-process baseline;
//! plus the peak heap allocated during one step (times: criterion's median, as the PyTorch replica
//! reports its median); for the UNet also the quickstart's W4A4 student's QAT step (forward,
//! backward, AdamW on its adapters and scales) beside the teacher's step on the same kind of
//! batch (one timestep for all samples, as fine-tuning has). Writes
//! experiments/bench-tiny-step/results.json.
//!
//!     cargo bench --profile dev --bench tiny_step

use std::path::Path;
use std::sync::atomic::Ordering;

use burn::module::Module;
use criterion::Criterion;
use msfp::config::Config;
use msfp::models::Denoiser;
use msfp::rng::SeededRng;
use msfp::train::optim::AdamW;

#[path = "common/alloc.rs"]
mod counting_alloc;
use counting_alloc::{Counting, LIVE, PEAK};
#[path = "common/student.rs"]
mod student;
#[path = "common/tiny.rs"]
mod tiny;
use tiny::{forward, setup, step, step_at_one_t};

#[global_allocator]
static GLOBAL: Counting = Counting;

fn median_ns(name: &str) -> Option<f64> {
    let p = Path::new("target/criterion").join(name).join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn main() {
    msfp::kernels::keep_freed_memory();
    msfp::kernels::on_pool(bench);
}

/// Everything `main` runs, on the kernels' thread pool.
fn bench() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(std::time::Duration::from_secs(2))
        .measurement_time(std::time::Duration::from_secs(20))
        .configure_from_args();
    let mut rows = Vec::new();
    for (name, config) in tiny::MODELS {
        let s = setup(config);
        let mut rng = SeededRng::new(0);
        let mut model = Some(Denoiser::new(&s.cfg.model, &mut rng, &s.device));
        let mut optim = AdamW::new(0.0, 1.0);
        c.bench_function(&format!("train_step_{name}"), |b| {
            b.iter(|| model = Some(step(&s, model.take().unwrap(), &mut optim, &mut rng)))
        });
        let valid = model.as_ref().unwrap().valid();
        c.bench_function(&format!("forward_{name}"), |b| b.iter(|| forward(&s, &valid, &mut rng)));

        // The quickstart's W4A4 student of this teacher (its TALoRA, conv_in/conv_out at 8 bits):
        // one QAT step against the teacher's own step on the same kind of batch (one timestep).
        let qat = (name == "tiny_unet").then(|| {
            let quickstart =
                Config::load(Path::new("configs/quickstart.toml"), &[]).expect("quickstart config");
            let teacher = model.as_ref().unwrap().clone();
            let (student, _, _) =
                student::w4a4(teacher, quickstart.lora, |p| p == "conv_in" || p == "conv_out");
            let (mut student, mut optim) = (Some(student), AdamW::new(0.0, 1.0));
            c.bench_function(&format!("qat_step_{name}"), |b| {
                b.iter(|| student = Some(step_at_one_t(&s, student.take().unwrap(), &mut optim, &mut rng)))
            });
            let (mut teacher, mut optim) = (model.clone(), AdamW::new(0.0, 1.0));
            c.bench_function(&format!("train_step_one_t_{name}"), |b| {
                b.iter(|| teacher = Some(step_at_one_t(&s, teacher.take().unwrap(), &mut optim, &mut rng)))
            });
            median_ns(&format!("qat_step_{name}")).zip(median_ns(&format!("train_step_one_t_{name}")))
        });

        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        model = Some(step(&s, model.take().unwrap(), &mut optim, &mut rng));
        let peak = PEAK.load(Ordering::Relaxed) - base;
        let (st, fw) = (median_ns(&format!("train_step_{name}")), median_ns(&format!("forward_{name}")));
        rows.push(serde_json::json!({
            "model": name,
            "config": config,
            "batch_size": s.cfg.train.batch_size,
            "parameters": model.as_ref().unwrap().num_params(),
            "train_step_ms": st.map(|v| v / 1e6),
            "forward_ms": fw.map(|v| v / 1e6),
            "ratio_step_vs_forward": st.zip(fw).map(|(a, b)| a / b),
            "qat_step_ms": qat.flatten().map(|(q, _)| q / 1e6),
            "train_step_one_t_ms": qat.flatten().map(|(_, t)| t / 1e6),
            "ratio_qat_step_vs_train_step": qat.flatten().map(|(q, t)| q / t),
            "peak_step_heap_mib": peak as f64 / (1024.0 * 1024.0),
        }));
    }
    c.final_summary();
    let out = serde_json::json!({
        "command": "cargo bench --profile dev --bench tiny_step",
        "backend": "flex (CPU)",
        "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all cores".into()),
        "results": rows,
    });
    let dir = Path::new("experiments/bench-tiny-step");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(&out).unwrap()).unwrap();
}
