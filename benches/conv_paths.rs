//! A "same" 3x3 convolution's two paths on flex, for the forward, the input gradient and the
//! weight gradient, at the tiny UNet's layers (batch 32) and SD v1.x UNet's (batch 2): through
//! the unfolded input (the baseline) and on the bordered grid (`*_grid`, `weight_grad_shifted`),
//! each pair run alternately, with the path the dispatching function picks. Writes
//! experiments/bench-conv-paths/results.json.
//!
//!     cargo bench --profile dev --bench conv_paths [-- --runs 15]

use std::path::Path;
use std::time::Instant;

use msfp::kernels::conv::*;
use msfp::rng::SeededRng;

#[path = "common/timing.rs"]
mod timing;

/// Medians (ms) of `a` and `b` run alternately `runs` times.
fn pair(runs: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    let mut ms = [Vec::new(), Vec::new()];
    for _ in 0..runs {
        let t = Instant::now();
        a();
        ms[0].push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        b();
        ms[1].push(t.elapsed().as_secs_f64() * 1e3);
    }
    (timing::median(&ms[0]), timing::median(&ms[1]))
}

/// Largest `|a - b| / (1 + |a|)`.
fn diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| (a - b).abs() / (1.0 + a.abs())).fold(0.0, f32::max)
}

fn main() {
    msfp::kernels::keep_freed_memory();
    let runs: usize = timing::arg("--runs").map_or(15, |v| v.parse().expect("--runs: a number"));
    // (model, batch, c_in, c_out, map side)
    let shapes = [
        ("tiny_unet", 32, 1, 16, 32),
        ("tiny_unet", 32, 16, 16, 32),
        ("tiny_unet", 32, 32, 16, 32),
        ("tiny_unet", 32, 16, 32, 16),
        ("tiny_unet", 32, 32, 32, 16),
        ("tiny_unet", 32, 64, 32, 16),
        ("tiny_unet", 32, 32, 32, 8),
        ("tiny_unet", 32, 64, 32, 8),
        ("tiny_unet", 32, 16, 1, 32),
        ("sd_unet", 2, 320, 320, 64),
        ("sd_unet", 2, 320, 320, 32),
        ("sd_unet", 2, 640, 640, 16),
        ("sd_unet", 2, 1280, 1280, 8),
    ];
    let mut rng = SeededRng::new(0);
    let mut rows = Vec::new();
    for (model, b, ci, co, side) in shapes {
        let g = ConvGeometry::new(&[b, ci, side, side], &[co, ci, 3, 3], 1, 1);
        let x = rng.normals(b * ci * side * side);
        let dy = rng.normals(b * co * side * side);
        let w = rng.normals(co * ci * 9);
        let bias = rng.normals(co);
        let f = pair(
            runs,
            || drop(std::hint::black_box(forward_unfolded(&g, &x, &w, Some(&bias)))),
            || drop(std::hint::black_box(forward_grid(&g, &x, &w, Some(&bias)))),
        );
        let d = pair(
            runs,
            || drop(std::hint::black_box(input_grad_unfolded(&g, &dy, &w))),
            || drop(std::hint::black_box(input_grad_grid(&g, &dy, &w))),
        );
        let wg = pair(
            runs,
            || drop(std::hint::black_box(weight_grad_unfolded(&g, &dy, &x))),
            || drop(std::hint::black_box(weight_grad_shifted(&g, &dy, &x))),
        );
        let diffs = [
            diff(&forward_unfolded(&g, &x, &w, Some(&bias)), &forward_grid(&g, &x, &w, Some(&bias))),
            diff(&input_grad_unfolded(&g, &dy, &w), &input_grad_grid(&g, &dy, &w)),
            diff(&weight_grad_unfolded(&g, &dy, &x).0, &weight_grad_shifted(&g, &dy, &x).0),
        ];
        let pick = |grid: bool| if grid { "grid" } else { "unfolded" };
        println!(
            "{model} b{b} {ci}->{co} {side}x{side}: forward {:.2} / {:.2} ms ({:.2}x, {}), input grad {:.2} / {:.2} ms ({:.2}x, {}), weight grad {:.2} / {:.2} ms ({:.2}x, {})",
            f.0,
            f.1,
            f.1 / f.0,
            pick(g.on_grid()),
            d.0,
            d.1,
            d.1 / d.0,
            pick(g.on_grid()),
            wg.0,
            wg.1,
            wg.1 / wg.0,
            pick(g.shifted_weight_grad()),
        );
        let entry = |(u, s): (f64, f64), grid: bool, diff: f32| serde_json::json!({"unfolded_ms": u, "grid_ms": s, "grid_over_unfolded": s / u, "picks": pick(grid), "max_rel_diff": diff});
        rows.push(serde_json::json!({
            "model": model, "batch": b, "c_in": ci, "c_out": co, "side": side,
            "forward": entry(f, g.on_grid(), diffs[0]),
            "input_grad": entry(d, g.on_grid(), diffs[1]),
            "weight_grad": entry(wg, g.shifted_weight_grad(), diffs[2]),
        }));
    }
    let out = serde_json::json!({
        "command": format!("cargo bench --profile dev --bench conv_paths -- --runs {runs}"),
        "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all cores".into()),
        "results": rows,
    });
    let dir = Path::new("experiments/bench-conv-paths");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(&out).unwrap()).unwrap();
}
