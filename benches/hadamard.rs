//! The cost of HQ-DiT's online Hadamard rotation (`quant/hadamard.rs`) against the matmul of the
//! layer it feeds, at DiT-XL/2's shapes on flex: 2 x 256 tokens (latent 32, patch 2, batch 2),
//! the inputs of `attn.qkv` (1152 -> 3456, blocks of 128), `attn.proj` (1152 -> 1152) and
//! `mlp.fc2` (4608 -> 1152, blocks of 512). Medians of `--runs` after one warm-up. Writes
//! `experiments/bench-hadamard/results.json` (or `$MSFP_BENCH_OUT`).
//!
//!     cargo bench --profile dev --bench hadamard -- [--runs 20]

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use msfp::quant::hadamard::{Hadamard, HadamardSpec};
use msfp::rng::SeededRng;

#[path = "common/timing.rs"]
mod timing;
use timing::{arg, median_ms};

fn main() {
    let runs: usize = arg("--runs").map_or(20, |v| v.parse().expect("--runs N"));
    let device = Device::flex();
    let tokens = 2 * 256;
    let mut rng = SeededRng::new(0);
    let mut rows = Vec::new();
    for (layer, d_in, d_out) in [("attn.qkv", 1152, 3456), ("attn.proj", 1152, 1152), ("mlp.fc2", 4608, 1152)]
    {
        let x = Tensor::<2>::from_data(TensorData::new(rng.normals(tokens * d_in), [tokens, d_in]), &device);
        let w = Tensor::<2>::from_data(TensorData::new(rng.normals(d_out * d_in), [d_out, d_in]), &device);
        let spec = HadamardSpec::for_width(d_in, 1).expect("even width");
        let h = Hadamard::new(spec, d_in);
        let (matmul_ms, _) = median_ms(1, runs, || {
            let _ = burn::tensor::module::linear(x.clone(), w.clone().transpose(), None).into_data();
        });
        let (rotate_ms, _) = median_ms(1, runs, || {
            let _ = h.rotate(x.clone()).into_data();
        });
        let (copy_ms, _) = median_ms(1, runs, || {
            let _ = (x.clone() * 1.0).into_data();
        });
        eprintln!("{layer}: matmul {matmul_ms:.3} ms, rotation {rotate_ms:.3} ms, copy {copy_ms:.3} ms");
        rows.push(serde_json::json!({
            "layer": layer, "tokens": tokens, "d_in": d_in, "d_out": d_out, "block": spec.block,
            "matmul_ms": matmul_ms, "rotation_ms": rotate_ms, "copy_of_input_ms": copy_ms,
            "rotation_vs_matmul": rotate_ms / matmul_ms, "rotation_vs_copy": rotate_ms / copy_ms,
        }));
    }
    let out = serde_json::json!({
        "command": format!("cargo bench --profile dev --bench hadamard -- --runs {runs}"),
        "backend": "flex (CPU)",
        "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all cores".into()),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "layers": rows,
    });
    let path = std::env::var("MSFP_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("experiments/bench-hadamard/results.json"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(&out).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
