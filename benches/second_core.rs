//! What a second core buys the tiny teachers on flex: the training step and the forward pass
//! timed on a one-thread and a two-thread pool alternately, a few runs at a time in one process,
//! so that this VM's drift (tens of percent over minutes) falls on both pools alike. The ratio of
//! the two medians is the second core's speedup; the median of the ratios of runs paired in
//! order is given beside it. Writes experiments/bench-tiny-step/second-core-msfp.json;
//! tools/bench/second_core_torch.py measures the PyTorch replica the same way.
//!
//!     cargo bench --profile dev --bench second_core [-- --rounds 8 --block 4 --warmup 5 --threads 2]

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use msfp::models::Denoiser;
use msfp::rng::SeededRng;
use msfp::train::optim::AdamW;
use rayon::ThreadPool;

#[path = "common/timing.rs"]
mod timing;
use timing::arg;
#[path = "common/tiny.rs"]
mod tiny;

/// Times `f` on each pool in turn, `block` runs at a time for `rounds` rounds (the order
/// flipped every round), after `warmup` runs on each; the first run after each switch is not
/// timed (it meets the other pool's caches and allocator arenas). Every timed run's
/// milliseconds, per pool.
fn alternate(
    pools: &[ThreadPool; 2],
    warmup: usize,
    rounds: usize,
    block: usize,
    mut f: impl FnMut(&ThreadPool),
) -> [Vec<f64>; 2] {
    for _ in 0..warmup {
        pools.iter().for_each(&mut f);
    }
    let mut ms = [Vec::new(), Vec::new()];
    for r in 0..rounds {
        for p in if r % 2 == 0 { [0, 1] } else { [1, 0] } {
            f(&pools[p]);
            for _ in 0..block {
                let t0 = Instant::now();
                f(&pools[p]);
                ms[p].push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    ms
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The two pools' medians, the speedup and the median of the pairwise ratios.
fn summary(ms: &[Vec<f64>; 2]) -> serde_json::Value {
    let pairs: Vec<f64> = ms[0].iter().zip(&ms[1]).map(|(a, b)| a / b).collect();
    let (one, many) = (median(&ms[0]), median(&ms[1]));
    serde_json::json!({
        "ms_1_thread": one,
        "ms_n_threads": many,
        "speedup": one / many,
        "speedup_pairwise_median": median(&pairs),
        "runs_1_thread": ms[0],
        "runs_n_threads": ms[1],
    })
}

fn main() {
    msfp::kernels::keep_freed_memory();
    let rounds: usize = arg("--rounds").map_or(8, |v| v.parse().expect("--rounds: a number"));
    let block: usize = arg("--block").map_or(4, |v| v.parse().expect("--block: a number"));
    let warmup: usize = arg("--warmup").map_or(5, |v| v.parse().expect("--warmup: a number"));
    let threads: usize = arg("--threads").map_or(2, |v| v.parse().expect("--threads: a number"));
    let pool =
        |n| rayon::ThreadPoolBuilder::new().num_threads(n).stack_size(8 << 20).build().expect("thread pool");
    let pools = [pool(1), pool(threads)];
    let mut rows = Vec::new();
    for (name, config) in tiny::MODELS {
        let s = tiny::setup(config);
        let mut rng = SeededRng::new(0);
        let mut model = Some(Denoiser::new(&s.cfg.model, &mut rng, &s.device));
        let mut optim = AdamW::new(0.0, 1.0);
        let step = alternate(&pools, warmup, rounds, block, |p| {
            let m = model.take().unwrap();
            model = Some(p.install(|| tiny::step(&s, m, &mut optim, &mut rng)));
        });
        let valid = model.as_ref().unwrap().valid();
        let forward = alternate(&pools, warmup, rounds, block, |p| {
            p.install(|| tiny::forward(&s, &valid, &mut rng));
        });
        let row =
            serde_json::json!({"model": name, "train_step": summary(&step), "forward": summary(&forward)});
        println!(
            "{name}: step {:.1} / {:.1} ms ({:.2}x), forward {:.1} / {:.1} ms ({:.2}x)",
            row["train_step"]["ms_1_thread"].as_f64().unwrap(),
            row["train_step"]["ms_n_threads"].as_f64().unwrap(),
            row["train_step"]["speedup"].as_f64().unwrap(),
            row["forward"]["ms_1_thread"].as_f64().unwrap(),
            row["forward"]["ms_n_threads"].as_f64().unwrap(),
            row["forward"]["speedup"].as_f64().unwrap(),
        );
        rows.push(row);
    }
    let out = serde_json::json!({
        "command": format!("cargo bench --profile dev --bench second_core -- --rounds {rounds} --block {block} --warmup {warmup} --threads {threads}"),
        "backend": "flex (CPU)",
        "threads": [1, threads],
        "results": rows,
    });
    let dir = Path::new("experiments/bench-tiny-step");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("second-core-msfp.json"), serde_json::to_vec_pretty(&out).unwrap()).unwrap();
}
