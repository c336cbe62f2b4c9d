//! The cost of HQ-DiT's online Hadamard rotation against the matmul of the layer it feeds, at
//! DiT-XL/2's shapes (`common/rotation.rs`), on flex or, with `--device`, another backend
//! (`wgpu`, `wgpu-cpu`, `cuda`; built with that feature). Medians of `--runs` after one warm-up.
//! Writes `experiments/bench-hadamard/results.json` (or `$MSFP_BENCH_OUT`).
//!
//!     cargo bench --profile dev --bench hadamard -- [--runs 20] [--device flex]

use std::path::PathBuf;

#[path = "common/timing.rs"]
mod timing;
use timing::arg;
#[path = "common/rotation.rs"]
mod rotation;

fn main() {
    msfp::kernels::on_pool(bench);
}

fn bench() {
    let runs: usize = arg("--runs").map_or(20, |v| v.parse().expect("--runs N"));
    let spec = arg("--device").unwrap_or_else(|| "flex".into());
    let device = msfp::device::make_device(&spec).unwrap_or_else(|e| {
        eprintln!("hadamard bench: {e}");
        std::process::exit(2);
    });
    let layers = rotation::cost(&device, runs);
    let out = serde_json::json!({
        "command": format!("cargo bench --profile dev --bench hadamard -- --runs {runs} --device {spec}"),
        "backend": spec,
        "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all cores".into()),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "layers": layers,
    });
    let path = std::env::var("MSFP_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("experiments/bench-hadamard/results.json"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(&out).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
