//! The tiny-SD QAT step's kernel launches and host reads on wgpu (`common/launches.rs`). Counts,
//! not times, so lavapipe (Mesa's CPU Vulkan, `wgpu-cpu`) stands in for any GPU. Writes
//! experiments/bench-gpu-launches/results-wgpu-cpu.json.
//!
//!     cargo bench --profile dev --features wgpu --bench launches_wgpu [-- --device wgpu-cpu]

use std::path::PathBuf;

#[path = "common/launches.rs"]
mod launches;
#[path = "common/sd14.rs"]
mod sd14;
#[path = "common/timing.rs"]
mod timing;

fn main() {
    let spec = timing::arg("--device").unwrap_or_else(|| "wgpu-cpu".into());
    let device = msfp::device::make_device(&spec).expect("a wgpu device");
    let mut out = launches::tiny_sd_step(&spec, &device);
    out["command"] =
        format!("cargo bench --profile dev --features wgpu --bench launches_wgpu -- --device {spec}").into();
    let path = std::env::var("MSFP_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(format!("experiments/bench-gpu-launches/results-{spec}.json")));
    std::fs::create_dir_all(path.parent().expect("a directory")).expect("output directory");
    std::fs::write(&path, serde_json::to_vec_pretty(&out).expect("json")).expect("write results");
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}
