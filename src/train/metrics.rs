//! `metrics.jsonl` (one JSON object per logged step) and the progress display: an indicatif bar
//! on a terminal, plain periodic log lines otherwise.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::error::{Result, io_err};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub it_per_s: f64,
}

pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// Opens `metrics.jsonl`, dropping lines past `resume_step` (a resumed run rewrites them).
    pub fn open(out_dir: &Path, resume_step: usize) -> Result<Self> {
        let path = out_dir.join("metrics.jsonl");
        let kept: Vec<String> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|l| serde_json::from_str::<StepMetrics>(l).is_ok_and(|m| m.step <= resume_step))
            .map(str::to_string)
            .collect();
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        crate::base::fs::atomic_write(&path, text.as_bytes())?;
        Ok(Self { path })
    }

    pub fn append(&self, m: &StepMetrics) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .map_err(|e| io_err(&self.path, e))?;
        writeln!(f, "{}", serde_json::to_string(m).expect("metrics serialise"))
            .map_err(|e| io_err(&self.path, e))
    }

    pub fn read_all(out_dir: &Path) -> Vec<StepMetrics> {
        std::fs::read_to_string(out_dir.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// Progress of a loop of `total` steps starting at `start`.
pub struct Progress {
    bar: Option<ProgressBar>,
    start: usize,
    total: usize,
    t0: Instant,
    what: String,
}

impl Progress {
    pub fn new(what: &str, start: usize, total: usize) -> Self {
        let bar = std::io::stdout().is_terminal().then(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({per_sec}, ETA {eta})")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b.set_prefix(what.to_string());
            b.set_position(start as u64);
            b
        });
        Self { bar, start, total, t0: Instant::now(), what: what.to_string() }
    }

    /// Steps per second since this process started the loop.
    pub fn rate(&self, done: usize) -> f64 {
        (done - self.start) as f64 / self.t0.elapsed().as_secs_f64().max(1e-9)
    }

    /// Reports step `done` (1-based); `log` also prints a line when there is no terminal.
    pub fn update(&self, done: usize, msg: &str, log: bool) {
        match &self.bar {
            Some(b) => {
                b.set_position(done as u64);
                b.set_message(msg.to_string());
            }
            None if log => {
                let rate = self.rate(done);
                let eta = (self.total - done) as f64 / rate.max(1e-9);
                println!("{} step {done}/{} {msg} {rate:.2} it/s ETA {eta:.0}s", self.what, self.total);
            }
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
