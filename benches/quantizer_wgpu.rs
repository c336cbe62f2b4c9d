//! The fake quantizer on a wgpu device: the fused CubeCL kernels (`quant/fused_cube.rs`) against
//! the tensor-op version they replace and a plain copy, all in the same run on the same device.
//! Forward + backward of e2m1 with per-row scales. Writes
//! experiments/bench-quantizer/results-wgpu.json.
//!
//!     cargo bench --profile dev --features wgpu --bench quantizer_wgpu
//!
//! `MSFP_BENCH_DEVICE` (default `wgpu-cpu`: Mesa lavapipe, so a CPU emulating a GPU: the ratios
//! say how much work the kernels save, not what a real GPU would gain; `wgpu` for a GPU),
//! `MSFP_BENCH_ELEMENTS` (default 1M; shape `[1024, n / 1024]`), `MSFP_BENCH_REPEATS` (default 7).

use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use msfp::quant::{Format, fake_quantize, fake_quantize_ops};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Median seconds of `repeats` runs of `f`, each ended by a device sync (after one warm-up run
/// that also compiles the kernels).
fn median_s(device: &Device, repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    device.sync().expect("device sync");
    let mut times: Vec<f64> = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f();
            device.sync().expect("device sync");
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The command line that reproduces this run, with the knobs that were set.
fn command() -> String {
    let knobs: Vec<String> = ["MSFP_BENCH_DEVICE", "MSFP_BENCH_ELEMENTS", "MSFP_BENCH_REPEATS"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v} ")))
        .collect();
    format!("{}cargo bench --profile dev --features wgpu --bench quantizer_wgpu", knobs.concat())
}

fn main() {
    let spec = std::env::var("MSFP_BENCH_DEVICE").unwrap_or_else(|_| "wgpu-cpu".into());
    let device = msfp::device::make_device(&spec).expect("a wgpu device").autodiff();
    let n = env_usize("MSFP_BENCH_ELEMENTS", 1 << 20);
    let repeats = env_usize("MSFP_BENCH_REPEATS", 7);
    let (rows, cols) = (1024, n / 1024);
    let format = Format::parse("e2m1").unwrap();
    let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 2_654_435_761) % 4096) as f32 / 256.0 - 8.0).collect();
    let s: Vec<f32> = (0..rows).map(|r| 0.25 + 0.125 * (r % 8) as f32).collect();
    let x0 = Tensor::<2>::from_data(TensorData::new(x, [rows, cols]), &device);
    let s0 = Tensor::<2>::from_data(TensorData::new(s, [rows, 1]), &device);

    let run = |fused: bool| {
        let x = x0.clone().require_grad();
        let sc = s0.clone().require_grad();
        let q = if fused {
            fake_quantize(x.clone(), &format, sc.clone(), None)
        } else {
            fake_quantize_ops(x.clone(), &format, sc.clone(), None)
        };
        let grads = q.sum().backward();
        (x.grad(&grads).expect("dx"), sc.grad(&grads).expect("ds"))
    };
    let fused = median_s(&device, repeats, || drop(run(true)));
    let ops = median_s(&device, repeats, || drop(run(false)));
    let copy = median_s(&device, repeats, || drop(x0.clone() * 1.0));
    let result = serde_json::json!({
        "what": "e2m1 fake quantization forward + backward (gradients for x and the per-row scale) \
                 with autodiff on a wgpu device: the fused CubeCL kernels vs the tensor-op version, \
                 beside a copy (x * 1.0) on the same device",
        "device": format!("{spec}: {device:?}"),
        "elements": rows * cols,
        "shape": [rows, cols],
        "repeats": repeats,
        "fused_fwd_bwd_median_s": fused,
        "tensor_ops_fwd_bwd_median_s": ops,
        "copy_median_s": copy,
        "fused_speedup_vs_tensor_ops": ops / fused,
        "ratio_vs_copy": fused / copy,
        "tensor_ops_ratio_vs_copy": ops / copy,
        "command": command(),
    });
    let out = std::path::Path::new("experiments/bench-quantizer/results-wgpu.json");
    let text = serde_json::to_string_pretty(&result).expect("json");
    let tmp = out.with_extension("json.tmp");
    std::fs::write(&tmp, &text).and_then(|_| std::fs::rename(&tmp, out)).expect("write results");
    println!("{text}");
}
