//! Fake-quant forward + backward (gradients for x and for a per-output-channel scale) of e2m1 on
//! a [4096, 4096] tensor on flex with autodiff, beside two baselines measured in the same run:
//! a plain copy of the tensor on the same device (the memory floor) and the same quantizer in
//! PyTorch on the CPU (tools/bench/quantizer_torch.py, run as a subprocess with the same thread
//! count). Writes experiments/bench-quantizer/results.json with the ratios.
//!
//!     cargo bench --profile dev --bench quantizer
//!
//! Environment: `MSFP_BENCH_ELEMENTS` (default 4096 * 4096; the shape is [r, n / r] with
//! r = isqrt(n)), `RAYON_NUM_THREADS` (the thread count handed to torch too; default: all
//! cores), `MSFP_BENCH_PYTHON` (default `python3`). The plain tensor-op version of the quantizer
//! (`fake_quantize_ops`, what the GPU backends run) is timed beside the fused flex operation.
//! With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (every allocation, the copy's too, on huge
//! pages) the results go to results-hugepages.json instead.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use burn::tensor::{Device, Tensor, TensorData};
use criterion::{Criterion, SamplingMode};
use msfp::quant::{Format, fake_quantize, fake_quantize_ops};

const DEFAULT_ELEMENTS: usize = 4096 * 4096;
const GROUP: &str = "quantizer";
const OUT_DIR: &str = "experiments/bench-quantizer";

#[path = "common/alloc.rs"]
mod counting_alloc;
use counting_alloc::{BIG, BIG_BYTES, BIG_COUNT, Counting, LIVE, PEAK};

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` once and reports its allocations of at least one byte per element (bool masks and
/// f32 tensors of the full size), in units of the f32 tensor size, and its peak extra heap.
fn allocations<T>(elements: usize, f: impl FnOnce() -> T) -> serde_json::Value {
    BIG.store(elements, Ordering::Relaxed);
    BIG_COUNT.store(0, Ordering::Relaxed);
    BIG_BYTES.store(0, Ordering::Relaxed);
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    drop(f());
    BIG.store(usize::MAX, Ordering::Relaxed);
    let tensor = (4 * elements) as f64;
    serde_json::json!({
        "tensor_sized_allocations": BIG_COUNT.load(Ordering::Relaxed),
        "allocated_bytes_in_f32_tensors": BIG_BYTES.load(Ordering::Relaxed) as f64 / tensor,
        "peak_extra_heap_in_f32_tensors": (PEAK.load(Ordering::Relaxed) - base) as f64 / tensor,
    })
}

/// The deterministic input tools/bench/quantizer_torch.py also builds, bit for bit:
/// `x[i] = (h(i) / 2^32 - 0.5) * 16 * s[row]` with `h(i) = i * 2654435761 mod 2^32`, in f64 and
/// rounded once to f32, and `s[row] = 0.25 + 0.125 * (row % 8)`. About a quarter is clipped.
/// Elements with `x / s == +-6` exactly (in f32) are halved: at the clip level torch's clamp
/// passes no gradient (strict, as in the LSQ paper) while burn's clamp passes it.
fn inputs(rows: usize, cols: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
    let s64: Vec<f64> = (0..rows).map(|r| 0.25 + 0.125 * (r % 8) as f64).collect();
    let s: Vec<f32> = s64.iter().map(|&v| v as f32).collect();
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let h = (i as u64 * 2_654_435_761) % (1 << 32);
            let x = ((h as f64 / (1u64 << 32) as f64 - 0.5) * 16.0 * s64[i / cols]) as f32;
            if (x / s[i / cols]).abs() == 6.0 { x * 0.5 } else { x }
        })
        .collect();
    (
        Tensor::from_data(TensorData::new(x, [rows, cols]), device),
        Tensor::from_data(TensorData::new(s, [rows, 1]), device),
    )
}

/// One fake-quant forward + backward; returns the gradients for x and s.
fn fwd_bwd(x0: &Tensor<2>, s0: &Tensor<2>, format: &Format) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
    let x = Tensor::from_inner(x0.clone()).require_grad();
    let s = Tensor::from_inner(s0.clone()).require_grad();
    let q = fake_quantize(x.clone(), format, s.clone(), None);
    let grads = q.clone().sum().backward();
    let dx = x.grad(&grads).expect("gradient for x");
    let ds = s.grad(&grads).expect("gradient for s");
    (q.inner(), dx, ds)
}

/// The same forward + backward through the plain tensor-op quantizer (the version every
/// backend runs; on flex autodiff `fake_quantize` uses the fused operation instead).
fn fwd_bwd_ops(x0: &Tensor<2>, s0: &Tensor<2>, format: &Format) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
    let x = Tensor::from_inner(x0.clone()).require_grad();
    let s = Tensor::from_inner(s0.clone()).require_grad();
    let q = fake_quantize_ops(x.clone(), format, s.clone(), None);
    let grads = q.clone().sum().backward();
    let dx = x.grad(&grads).expect("gradient for x");
    let ds = s.grad(&grads).expect("gradient for s");
    (q.inner(), dx, ds)
}

fn values(t: Tensor<2>) -> Vec<f64> {
    let v = t.into_data().try_into_vec::<f32>().expect("f32 data");
    v.into_iter().map(f64::from).collect()
}

/// The checksums tools/bench/quantizer_torch.py prints: f64 sums; those of q and dx are exact
/// (few-bit values), so they must match bit for bit; ds holds per-channel f32 reductions, whose
/// summation order differs between the frameworks.
fn checksums_of(q: Tensor<2>, dx: Tensor<2>, ds: Tensor<2>) -> serde_json::Value {
    let (q, dx, ds) = (values(q), values(dx), values(ds));
    let weighted: f64 = q.iter().enumerate().map(|(i, v)| v * (i % 13 + 1) as f64).sum();
    serde_json::json!({
        "q": q.iter().sum::<f64>(),
        "q_weighted": weighted,
        "q_abs": q.iter().map(|v| v.abs()).sum::<f64>(),
        "dx": dx.iter().sum::<f64>(),
        "ds": ds.iter().sum::<f64>(),
        "ds_abs": ds.iter().map(|v| v.abs()).sum::<f64>(),
    })
}

/// Criterion's median for `name`, if it was measured by this run (a benchmark left out by a
/// filter keeps an older estimates.json, which must not be reported).
fn median_ns(name: &str, since: SystemTime) -> Option<f64> {
    let p = Path::new("target/criterion").join(GROUP).join(name).join("new/estimates.json");
    if std::fs::metadata(&p).and_then(|m| m.modified()).ok()? < since {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    v["median"]["point_estimate"].as_f64()
}

/// Runs the PyTorch side; `Err` carries the reason it gave no result.
fn run_torch(elements: usize, rows: usize, cols: usize, threads: usize) -> Result<serde_json::Value, String> {
    let python = std::env::var("MSFP_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args(["tools/bench/quantizer_torch.py", "--elements"])
        .arg(elements.to_string())
        .arg("--threads")
        .arg(threads.to_string())
        .arg("--rows")
        .arg(rows.to_string())
        .arg("--cols")
        .arg(cols.to_string())
        .output()
        .map_err(|e| format!("could not run {python}: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "{python} tools/bench/quantizer_torch.py failed ({}): {}",
            out.status,
            tail.join(" | ")
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("torch script printed no JSON: {e}"))
}

fn main() {
    let elements: usize = std::env::var("MSFP_BENCH_ELEMENTS")
        .ok()
        .map(|v| v.parse().expect("MSFP_BENCH_ELEMENTS is a number"))
        .unwrap_or(DEFAULT_ELEMENTS);
    let rows = elements.isqrt();
    let cols = elements / rows;
    assert_eq!(rows * cols, elements, "MSFP_BENCH_ELEMENTS={elements} is not isqrt(n) x (n / isqrt(n))");
    let threads_env = std::env::var("RAYON_NUM_THREADS").ok();
    let threads = threads_env
        .as_deref()
        .and_then(|v| v.parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let loadavg_at_start = std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_string());
    // Fresh 64 MB buffers cost mostly page faults unless the allocator asks for huge pages
    // (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` where THP is `madvise`): the regime decides
    // whether the ratios count allocations or memory passes, so it is recorded.
    let memory_regime = serde_json::json!({
        "GLIBC_TUNABLES": std::env::var("GLIBC_TUNABLES").ok(),
        "transparent_hugepage": std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .ok()
            .map(|s| s.trim().to_string()),
    });

    let format: Format = "e2m1".parse().expect("e2m1");
    let flex = Device::flex();
    let (x0, s0) = inputs(rows, cols, &flex);

    // Cross-check against torch on the same input (outside the timing).
    let (q, dx, ds) = fwd_bwd(&x0, &s0, &format);
    let checksums = checksums_of(q, dx, ds);
    let ops_checksums = {
        let (q, dx, ds) = fwd_bwd_ops(&x0, &s0, &format);
        checksums_of(q, dx, ds)
    };

    let alloc_stats = serde_json::json!({
        "fake_quant_fwd_bwd": allocations(elements, || fwd_bwd(&x0, &s0, &format)),
        "copy": allocations(elements, || x0.clone() * 1.0),
        "tensor_ops_fwd_bwd": allocations(elements, || fwd_bwd_ops(&x0, &s0, &format)),
    });

    let started = SystemTime::now();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8))
        .configure_from_args();
    let mut g = c.benchmark_group(GROUP);
    g.sampling_mode(SamplingMode::Flat);
    g.bench_function("fake_quant_fwd_bwd", |b| b.iter(|| fwd_bwd(&x0, &s0, &format)));
    g.bench_function("fake_quant_fwd", |b| {
        b.iter(|| {
            let x = Tensor::from_inner(x0.clone()).require_grad();
            let s = Tensor::from_inner(s0.clone()).require_grad();
            fake_quantize(x, &format, s, None)
        })
    });
    // Inference (no autodiff): the fused operation's forward on flex.
    g.bench_function("fake_quant_inference", |b| {
        b.iter(|| fake_quantize(x0.clone(), &format, s0.clone(), None))
    });
    // x0 stays alive, so its storage is shared and `* 1.0` cannot run in place: flex (eager)
    // allocates a new tensor and writes every element, one read and one write of the tensor.
    g.bench_function("copy", |b| b.iter(|| x0.clone() * 1.0));
    g.bench_function("tensor_ops_fwd_bwd", |b| b.iter(|| fwd_bwd_ops(&x0, &s0, &format)));
    g.finish();
    c.final_summary();

    let ours = median_ns("fake_quant_fwd_bwd", started).map(|v| v / 1e9);
    let fwd = median_ns("fake_quant_fwd", started).map(|v| v / 1e9);
    let copy = median_ns("copy", started).map(|v| v / 1e9);
    let inference = median_ns("fake_quant_inference", started).map(|v| v / 1e9);

    let (torch, torch_reason) = match run_torch(elements, rows, cols, threads) {
        Ok(v) => (Some(v), None),
        Err(why) => {
            eprintln!("torch baseline unavailable: {why}");
            (None, Some(why))
        }
    };
    let torch_median = torch.as_ref().and_then(|t| t["median_s"].as_f64());
    let cross_check = torch.as_ref().map(|t| {
        let get = |c: &serde_json::Value, k: &str| c[k].as_f64().unwrap_or(f64::NAN);
        let (ours, theirs) = (&checksums, &t["checksums"]);
        let exact = ["q", "q_weighted", "q_abs", "dx"].iter().all(|k| get(ours, k) == get(theirs, k));
        // Per-channel f32 sums in different orders: allow 1e-5 of the total magnitude.
        let ds_diff = (get(ours, "ds") - get(theirs, "ds")).abs();
        let ds_close = ds_diff <= 1e-5 * get(ours, "ds_abs").max(get(theirs, "ds_abs"));
        serde_json::json!({
            "rust": ours,
            "torch": theirs,
            "q_and_dx_identical": exact,
            "ds_abs_difference": ds_diff,
            "agree": exact && ds_close,
        })
    });

    let tensor_ops = {
        let t = median_ns("tensor_ops_fwd_bwd", started).map(|v| v / 1e9);
        let get = |c: &serde_json::Value, k: &str| c[k].as_f64().unwrap_or(f64::NAN);
        let identical =
            ["q", "q_weighted", "q_abs", "dx"].iter().all(|k| get(&ops_checksums, k) == get(&checksums, k));
        serde_json::json!({
            "what": "the same quantizer as plain tensor ops under autodiff (quantizer::fake_quantize_ops, \
                     what wgpu/cuda run); fake_quantize on flex autodiff is the fused op (quant/fused.rs)",
            "fwd_bwd_median_s": t,
            "ratio_vs_copy": t.zip(copy).map(|(a, b)| a / b),
            "ratio_vs_torch": t.zip(torch_median).map(|(a, b)| a / b),
            "fused_speedup": t.zip(ours).map(|(a, b)| a / b),
            "q_and_dx_identical_to_fused": identical,
            "checksums": ops_checksums,
        })
    };

    let mut command = String::new();
    if elements != DEFAULT_ELEMENTS {
        command.push_str(&format!("MSFP_BENCH_ELEMENTS={elements} "));
    }
    if let Some(t) = &threads_env {
        command.push_str(&format!("RAYON_NUM_THREADS={t} "));
    }
    if let Ok(t) = std::env::var("GLIBC_TUNABLES") {
        command.push_str(&format!("GLIBC_TUNABLES={t} "));
    }
    command.push_str("cargo bench --profile dev --bench quantizer");

    let out = serde_json::json!({
        "command": command,
        "what": "e2m1 fake quantization, per-output-channel scale, forward + backward \
                 (gradients for x and the scale), flex CPU backend with autodiff: the fused \
                 operation (one host pass each way) that fake_quantize uses there",
        "elements": elements,
        "shape": [rows, cols],
        "format": "e2m1",
        "threads": threads,
        "backend": "flex (CPU), autodiff",
        "profile": if cfg!(debug_assertions) {
            "dev (opt-level 3; our crate keeps debug assertions)"
        } else {
            "bench (release)"
        },
        "fake_quant_fwd_bwd_median_s": ours,
        "fake_quant_fwd_median_s": fwd,
        "copy_median_s": copy,
        "torch_fwd_bwd_median_s": torch_median,
        "ratio_vs_copy": ours.zip(copy).map(|(a, b)| a / b),
        "ratio_vs_torch": ours.zip(torch_median).map(|(a, b)| a / b),
        "ratio_vs_torch_reason": torch_reason,
        "fake_quant_inference_median_s": inference,
        "ratio_inference_vs_copy": inference.zip(copy).map(|(a, b)| a / b),
        "torch": torch,
        "allocations_per_call": alloc_stats,
        "cross_check": cross_check,
        "tensor_ops": tensor_ops,
        "loadavg_at_start": loadavg_at_start,
        "memory_regime": memory_regime,
    });
    std::fs::create_dir_all(OUT_DIR).unwrap();
    // The default allocator's run is the headline; one with huge pages asked for is kept beside it.
    let huge_pages = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("hugetlb"));
    let name = if huge_pages { "results-hugepages.json" } else { "results.json" };
    let path = Path::new(OUT_DIR).join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(&out).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    println!("wrote {}", path.display());
}
