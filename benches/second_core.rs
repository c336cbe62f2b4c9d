//! What a second core buys the tiny teachers on flex: the training step and the forward pass
//! at one and at two threads, measured by short child processes that alternate, one thread
//! count after the other for a number of rounds (the order flipped every round), so that this
//! VM's drift (tens of percent over minutes) falls on both alike. Each child builds the model,
//! warms up and times a few runs on its own pool, as `msfp` runs. (Two pools in one process
//! made the one-thread runs up to a third slower than in a process of their own.) The speedup
//! is the ratio of the two medians over all timed runs; the median of the rounds' ratios is
//! given beside it. Writes experiments/bench-tiny-step/second-core-msfp.json;
//! tools/bench/second_core_torch.py measures the PyTorch replica the same way.
//!
//!     cargo bench --profile dev --bench second_core [-- --rounds 8 --runs 6 --warmup 3 --threads 2]

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use burn::module::Module;
use msfp::models::Denoiser;
use msfp::rng::SeededRng;
use msfp::train::optim::AdamW;

#[path = "common/timing.rs"]
mod timing;
use timing::{arg, median};
#[path = "common/tiny.rs"]
mod tiny;

fn number(name: &str, default: usize) -> usize {
    arg(name).map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}: a number")))
}

/// In a child: `runs` timed training steps and forwards of `model` after `warmup` of each, on
/// the kernels' pool (`RAYON_NUM_THREADS` threads), printed as one JSON line.
fn child(model: &str, warmup: usize, runs: usize) {
    let config =
        tiny::MODELS.iter().find(|(name, _)| *name == model).expect("--child: tiny_unet or tiny_dit").1;
    let out = msfp::kernels::on_pool(|| {
        let s = tiny::setup(config);
        let mut rng = SeededRng::new(0);
        let mut model = Some(Denoiser::new(&s.cfg.model, &mut rng, &s.device));
        let mut optim = AdamW::new(0.0, 1.0);
        let (_, step) = timing::median_ms(warmup, runs, || {
            model = Some(tiny::step(&s, model.take().unwrap(), &mut optim, &mut rng));
        });
        let valid = model.unwrap().valid();
        let (_, forward) = timing::median_ms(warmup, runs, || {
            std::hint::black_box(tiny::forward(&s, &valid, &mut rng));
        });
        serde_json::json!({"train_step": step, "forward": forward})
    });
    println!("{out}");
}

fn main() {
    msfp::kernels::keep_freed_memory();
    let (warmup, runs) = (number("--warmup", 3), number("--runs", 6));
    if let Some(model) = arg("--child") {
        return child(&model, warmup, runs);
    }
    let (rounds, threads) = (number("--rounds", 8), number("--threads", 2));
    let exe = std::env::current_exe().expect("own path");
    let started = Instant::now();
    let mut rows = Vec::new();
    for (name, _) in tiny::MODELS {
        // [measure][thread count] -> every timed run; and each round's ratio of medians.
        let measures = ["train_step", "forward"];
        let mut ms = vec![[Vec::new(), Vec::new()]; 2];
        let mut ratios = vec![Vec::new(); 2];
        for r in 0..rounds {
            let mut medians = [[0.0; 2]; 2];
            for which in if r % 2 == 0 { [0, 1] } else { [1, 0] } {
                let n = [1, threads][which];
                let out = Command::new(&exe)
                    .args(["--child", name, "--warmup", &warmup.to_string(), "--runs", &runs.to_string()])
                    .env("RAYON_NUM_THREADS", n.to_string())
                    .output()
                    .expect("child bench");
                assert!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stderr));
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("child's JSON line");
                for (m, key) in measures.iter().enumerate() {
                    let times: Vec<f64> =
                        v[key].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
                    medians[m][which] = median(&times);
                    ms[m][which].extend(times);
                }
            }
            for m in 0..2 {
                ratios[m].push(medians[m][0] / medians[m][1]);
            }
        }
        let mut row = serde_json::json!({"model": name});
        let mut line = name.to_string();
        for (m, key) in measures.iter().enumerate() {
            let (one, many) = (median(&ms[m][0]), median(&ms[m][1]));
            line += &format!(", {key} {one:.1} / {many:.1} ms ({:.2}x)", one / many);
            row[key] = serde_json::json!({
                "ms_1_thread": one,
                "ms_n_threads": many,
                "speedup": one / many,
                "speedup_median_of_rounds": median(&ratios[m]),
                "round_speedups": ratios[m],
                "runs_1_thread": ms[m][0],
                "runs_n_threads": ms[m][1],
            });
        }
        println!("{line}");
        rows.push(row);
    }
    let out = serde_json::json!({
        "command": format!("cargo bench --profile dev --bench second_core -- --rounds {rounds} --runs {runs} --warmup {warmup} --threads {threads}"),
        "backend": "flex (CPU)",
        "threads": [1, threads],
        "seconds": started.elapsed().as_secs_f64(),
        "results": rows,
    });
    let dir = Path::new("experiments/bench-tiny-step");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("second-core-msfp.json"), serde_json::to_vec_pretty(&out).unwrap()).unwrap();
}
