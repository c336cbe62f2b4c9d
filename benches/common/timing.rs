//! Argument and timing helpers shared by the benches that time by hand (no criterion).

#![allow(dead_code)] // each bench uses part of it

use std::time::Instant;

/// The value after `name` on the command line.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// Median wall time (ms) of `f` over `runs` runs after `warmup`, and every run's; on a GPU `f`
/// must wait for the device.
pub fn median_ms(warmup: usize, runs: usize, mut f: impl FnMut()) -> (f64, Vec<f64>) {
    for _ in 0..warmup {
        f();
    }
    let ts: Vec<f64> = (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    (median(&ts), ts)
}

/// The median (upper middle value for an even count) of `v`.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident set of this process so far (VmHWM), MiB.
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
