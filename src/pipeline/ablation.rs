//! `msfp ablation`: MSFP's ablation on one teacher, row by row and seed by seed.
//!
//! Every (row, seed) is one `msfp train`-style run of the base config with the row's overrides
//! (`<out>/runs/<row>/seed<k>/`, resumable), evaluated on `eval.samples` samples from the seed's
//! noise; its result is written to `<out>/results/<row>-seed<k>.json` as soon as it is known and
//! skipped when the command runs again, so the table can be built over several sessions.
//! `<out>/results.json` aggregates every finished result (mean and std over seeds), and
//! `<out>/results.md` renders it as the Markdown table the experiment's README quotes.
//!
//! Each result names its teacher by the digest of the weights file; a result of another teacher
//! is stale: it is left out of the table and its (row, seed) runs again from scratch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::eval::{Scorer, psnr, sampler_label, ssim};
use super::finetune::{calibrate_student, fit, trajectory_sampler};
use super::pretrain::Resume;
use crate::diffusion::NoiseSchedule;
use crate::error::{Error, Result};
use crate::pipeline::config::Config;

/// What a row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The full-precision teacher.
    Teacher,
    /// Calibration only.
    Ptq,
    /// Calibration and fine-tuning.
    Finetune,
}

pub struct Row {
    pub id: &'static str,
    pub what: &'static str,
    pub w_bits: u32,
    pub a_bits: u32,
    pub stage: Stage,
    /// `--set` overrides on the base config.
    pub overrides: &'static [&'static str],
}

/// Which paper's ablation: MSFP's (on `configs/quickstart.toml`-like bases) or HQ-DiT's (on
/// `configs/hqdit_tiny_dit.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Table {
    #[default]
    Msfp,
    Hqdit,
}

impl Table {
    pub fn rows(self) -> &'static [Row] {
        match self {
            Table::Msfp => ROWS,
            Table::Hqdit => HQDIT_ROWS,
        }
    }
}

/// The full-precision teacher, first row of every table.
const TEACHER: Row = Row {
    id: "teacher",
    what: "FP32 teacher",
    w_bits: 32,
    a_bits: 32,
    stage: Stage::Teacher,
    overrides: &[],
};

/// MSFP's ablation, in the order of its table.
pub const ROWS: &[Row] = &[
    TEACHER,
    Row {
        id: "int4_ft",
        what: "W4A4 INT4 (int4 weights, uint4 + zero point activations, 8-bit ends), same fine-tuning as msfp_full",
        w_bits: 4,
        a_bits: 4,
        stage: Stage::Finetune,
        overrides: &[
            "quant.weight=\"int4\"",
            "quant.act=\"uint4\"",
            "quant.layers=[{pattern=\"conv_in\",weight=\"int8\",act=\"int8\"},{pattern=\"conv_out\",weight=\"int8\",act=\"uint8\"}]",
        ],
    },
    Row {
        id: "fp4_signed_ptq",
        what: "W4A4 signed FP4 everywhere, PTQ only",
        w_bits: 4,
        a_bits: 4,
        stage: Stage::Ptq,
        overrides: &["mixup.mixup_sign=false"],
    },
    Row {
        id: "msfp_ptq",
        what: "W4A4 mixup-sign FP4, PTQ only",
        w_bits: 4,
        a_bits: 4,
        stage: Stage::Ptq,
        overrides: &[],
    },
    Row {
        id: "msfp_lora",
        what: "+ one LoRA (K = 1), plain MSE",
        w_bits: 4,
        a_bits: 4,
        stage: Stage::Finetune,
        overrides: &["lora.adapters=1", "loss.kind=\"mse\""],
    },
    Row {
        id: "msfp_talora",
        what: "+ TALoRA (K adapters, router), plain MSE",
        w_bits: 4,
        a_bits: 4,
        stage: Stage::Finetune,
        overrides: &["loss.kind=\"mse\""],
    },
    Row {
        id: "msfp_talora_learned",
        what: "+ TALoRA with the learned router, plain MSE",
        w_bits: 4,
        a_bits: 4,
        stage: Stage::Finetune,
        overrides: &["loss.kind=\"mse\"", "lora.router=\"learned\""],
    },
    Row {
        id: "msfp_full",
        what: "+ DFA: full MSFP",
        w_bits: 4,
        a_bits: 4,
        stage: Stage::Finetune,
        overrides: &[],
    },
    Row {
        id: "msfp_talora_noise",
        what: "TALoRA, plain MSE on the noise (EfficientDM's cond/uncond target)",
        w_bits: 4,
        a_bits: 4,
        stage: Stage::Finetune,
        overrides: &["loss.kind=\"mse\"", "finetune.target=\"cond_uncond\""],
    },
    Row {
        id: "msfp_full_noise",
        what: "+ DFA on the noise target: full MSFP as the paper writes its loss",
        w_bits: 4,
        a_bits: 4,
        stage: Stage::Finetune,
        overrides: &["finetune.target=\"cond_uncond\""],
    },
    Row {
        id: "w4a8_msfp_full",
        what: "full MSFP, 8-bit FP activations",
        w_bits: 4,
        a_bits: 8,
        stage: Stage::Finetune,
        overrides: &["quant.act=\"fp8\""],
    },
    Row {
        id: "w8a8_msfp_full",
        what: "full MSFP, 8-bit FP weights and activations",
        w_bits: 8,
        a_bits: 8,
        stage: Stage::Finetune,
        overrides: &["quant.weight=\"fp8\"", "quant.act=\"fp8\""],
    },
];

/// HQ-DiT's ablation on a post-training base (`configs/hqdit_tiny_dit.toml`): each row adds one
/// of its pieces. "No clipping" is `calib.clip_grid = 1` (the range's maximum).
pub const HQDIT_ROWS: &[Row] = &[
    TEACHER,
    Row {
        id: "int4_ptq",
        what: "W4A4 INT4, no clipping search, no rotation",
        w_bits: 4,
        a_bits: 4,
        stage: Stage::Ptq,
        overrides: &[
            "quant.weight=\"int4\"",
            "quant.act=\"int4\"",
            "quant.layers=[{pattern=\"patch_embed\",weight=\"int8\",act=\"int8\"},{pattern=\"final_linear\",weight=\"int8\",act=\"int8\"}]",
            "quant.hadamard=[]",
            "calib.clip_grid=1",
        ],
    },
    Row {
        id: "e2m1_ptq",
        what: "W4A4 FP4 E2M1 everywhere, no clipping search, no rotation",
        w_bits: 4,
        a_bits: 4,
        stage: Stage::Ptq,
        overrides: &["quant.weight=\"e2m1\"", "quant.act=\"e2m1\"", "quant.hadamard=[]", "calib.clip_grid=1"],
    },
    Row {
        id: "fp4_format_ptq",
        what: "+ per-layer FP4 format (E3M0 / E2M1 / E1M2)",
        w_bits: 4,
        a_bits: 4,
        stage: Stage::Ptq,
        overrides: &["quant.hadamard=[]", "calib.clip_grid=1"],
    },
    Row {
        id: "fp4_format_clip_ptq",
        what: "+ clipping search",
        w_bits: 4,
        a_bits: 4,
        stage: Stage::Ptq,
        overrides: &["quant.hadamard=[]"],
    },
    Row {
        id: "hqdit_ptq",
        what: "+ Hadamard on attention and MLP inputs: HQ-DiT",
        w_bits: 4,
        a_bits: 4,
        stage: Stage::Ptq,
        overrides: &[],
    },
    Row {
        id: "hqdit_msfp_ft",
        what: "HQ-DiT + MSFP fine-tuning (TALoRA 4 x rank 4, DFA, step target, 800 steps)",
        w_bits: 4,
        a_bits: 4,
        stage: Stage::Finetune,
        overrides: &[
            "finetune.enabled=true",
            "finetune.target=\"step\"",
            "lora.rank=4",
            "lora.adapters=4",
            "lora.router=\"range\"",
            "train.steps=800",
            "train.batch_size=4",
            "train.warmup_steps=10",
            "train.checkpoint_every=100",
        ],
    },
    Row {
        id: "w4a8_hqdit",
        what: "HQ-DiT with 8-bit FP activations",
        w_bits: 4,
        a_bits: 8,
        stage: Stage::Ptq,
        overrides: &["quant.act=\"fp8\""],
    },
];

/// One finished (row, seed).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub row: String,
    pub seed: u64,
    pub fid: f64,
    pub accuracy: f64,
    pub psnr_vs_teacher: Option<f64>,
    /// Mean SSIM against the teacher's samples from the same noise (absent in results written
    /// before it was measured).
    #[serde(default)]
    pub ssim_vs_teacher: Option<f64>,
    pub samples: usize,
    pub sampler: String,
    pub seconds: f64,
    pub command: String,
    /// [`teacher_digest`] of the teacher this result was measured on (empty: unknown, stale).
    #[serde(default)]
    pub teacher: String,
}

/// One row of the table, over its finished seeds.
#[derive(Debug, Clone, Serialize)]
pub struct TableRow {
    pub row: String,
    pub what: String,
    pub w_bits: u32,
    pub a_bits: u32,
    pub fid_mean: f64,
    pub fid_std: f64,
    pub accuracy: f64,
    pub psnr_vs_teacher: Option<f64>,
    /// Standard deviation of the PSNR over seeds.
    pub psnr_std: Option<f64>,
    /// `None` unless every seed measured it.
    pub ssim_vs_teacher: Option<f64>,
    /// `fid_mean` relative to the teacher's FID over the same seeds (`0.1` = 10% higher);
    /// `None` for the teacher, or while the teacher lacks one of this row's seeds.
    pub fid_vs_teacher: Option<f64>,
    pub seeds: Vec<u64>,
    pub samples: usize,
    pub fid_real_heldout: f64,
    /// The command that produces (and, finished seeds skipped, completes) this row.
    pub command: String,
    /// [`teacher_digest`] of the teacher every seed of this row was measured on.
    pub teacher: String,
}

/// First 16 hex digits of the SHA-256 of the teacher's weights file.
pub fn teacher_digest(cfg: &Config) -> Result<String> {
    let path = cfg.model.weights.as_deref().ok_or_else(|| {
        Error::usage("the ablation's config has no model.weights: set the teacher's weights file")
    })?;
    let bytes = std::fs::read(path).map_err(|e| crate::error::io_err(path, e))?;
    let digest = Sha256::digest(&bytes);
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// A finished result of the current teacher, if `path` holds one.
fn read_result(path: &Path, teacher: &str) -> Result<Option<RunResult>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| crate::error::io_err(path, e))?;
    let r: RunResult = serde_json::from_str(&text).map_err(|e| {
        Error::runtime(format!("{}: {e}; delete it to rerun that (row, seed)", path.display()))
    })?;
    if r.teacher != teacher {
        tracing::warn!(
            "{}: measured on teacher `{}`, not the current `{teacher}`; stale, left out",
            path.display(),
            r.teacher
        );
        return Ok(None);
    }
    Ok(Some(r))
}

fn result_path(out: &Path, row: &str, seed: u64) -> PathBuf {
    out.join("results").join(format!("{row}-seed{seed}.json"))
}

/// The run directory of one (row, seed).
fn run_dir(out: &Path, row: &str, seed: u64) -> PathBuf {
    out.join("runs").join(row).join(format!("seed{seed}"))
}

/// The config of one (row, seed): the base, the row's overrides, the seed (fine-tuning and
/// evaluation noise), and a run directory of its own.
pub fn row_config(
    base: &Path,
    base_overrides: &[String],
    row: &Row,
    seed: u64,
    out: &Path,
) -> Result<Config> {
    let mut overrides: Vec<String> = base_overrides.to_vec();
    overrides.extend(row.overrides.iter().map(|s| s.to_string()));
    let dir = run_dir(out, row.id, seed);
    overrides.push(format!("run.out_dir={}", toml_string(&dir.display().to_string())));
    overrides.push(format!("run.seed={seed}"));
    let mut cfg = Config::load(base, &overrides)?;
    cfg.eval.seed = cfg.eval.seed.wrapping_add(seed);
    Ok(cfg)
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Runs every (row, seed) that has no result yet, then rewrites `<out>/results.json`.
pub fn run(
    table: Table,
    base: &Path,
    base_overrides: &[String],
    rows: &[String],
    seeds: &[u64],
    out: &Path,
    command: &str,
) -> Result<Vec<TableRow>> {
    let all = table.rows();
    let selected: Vec<&Row> = if rows.is_empty() {
        all.iter().collect()
    } else {
        rows.iter()
            .map(|r| {
                all.iter().find(|row| row.id == r).ok_or_else(|| {
                    let ids: Vec<&str> = all.iter().map(|r| r.id).collect();
                    Error::usage(format!("--rows: unknown row `{r}`; the rows are {}", ids.join(", ")))
                })
            })
            .collect::<Result<_>>()?
    };
    std::fs::create_dir_all(out.join("results")).map_err(|e| crate::error::io_err(out, e))?;
    // Validate every config before spending time on any run.
    let teacher_id = teacher_digest(&Config::load(base, base_overrides)?)?;
    for row in &selected {
        for &seed in seeds {
            row_config(base, base_overrides, row, seed, out)
                .map_err(|e| e.context(format!("row {}", row.id)))?;
        }
    }
    for &seed in seeds {
        let mut teacher_images: Option<Vec<f32>> = None;
        for row in &selected {
            let path = result_path(out, row.id, seed);
            if read_result(&path, &teacher_id)?.is_some() {
                tracing::info!("{} seed {seed}: done ({}), skipped", row.id, path.display());
                continue;
            }
            if path.exists() {
                // A fine-tuning run of another teacher must not be resumed.
                let dir = run_dir(out, row.id, seed);
                if dir.exists() {
                    std::fs::remove_dir_all(&dir).map_err(|e| crate::error::io_err(&dir, e))?;
                }
            }
            let started = std::time::Instant::now();
            let cfg = row_config(base, base_overrides, row, seed, out)?;
            let device = crate::device::make_device(&cfg.run.device)?;
            tracing::info!("{} seed {seed}: {}", row.id, row.what);
            let teacher = crate::models::registry::load_denoiser(&cfg.model, None, &device)?;
            let scorer = Scorer::new(&cfg, &device)?;
            let family = super::sample::load_family(&cfg, &device)?;
            let model = match row.stage {
                Stage::Teacher => teacher.clone(),
                Stage::Ptq => {
                    let sampler = trajectory_sampler(&cfg, &NoiseSchedule::new(&cfg.diffusion));
                    let mut ptq_cfg = cfg.clone();
                    ptq_cfg.lora.rank = 0;
                    let (student, _) = calibrate_student(
                        teacher.clone(),
                        &ptq_cfg,
                        &family,
                        &sampler,
                        &device.clone().autodiff(),
                    )?;
                    super::export::deploy(&student.valid())
                }
                Stage::Finetune => super::export::deploy(&fit(&cfg, Resume::Auto)?.student),
            };
            tracing::info!("{} seed {seed}: evaluating on {} samples", row.id, cfg.eval.samples);
            let (eval, images) = scorer.generate_and_score(&cfg, &family, &model);
            let cache = teacher_cache(out, seed, cfg.eval.samples, &teacher_id);
            let (psnr_vs_teacher, ssim_vs_teacher) = if row.stage == Stage::Teacher {
                write_images(&cache, &images)?;
                teacher_images = Some(images);
                (None, None)
            } else {
                let t = match teacher_images.take().or_else(|| read_images(&cache, images.len())) {
                    Some(t) => t,
                    None => {
                        tracing::info!("{} seed {seed}: sampling the teacher for PSNR", row.id);
                        let t = scorer.generate_and_score(&cfg, &family, &teacher).1;
                        write_images(&cache, &t)?;
                        t
                    }
                };
                let versus = (Some(psnr(&images, &t)), Some(ssim(&images, &t, family.image_shape())));
                teacher_images = Some(t);
                versus
            };
            let result = RunResult {
                row: row.id.to_string(),
                seed,
                fid: eval.fid,
                accuracy: eval.accuracy,
                psnr_vs_teacher,
                ssim_vs_teacher,
                samples: cfg.eval.samples,
                sampler: sampler_label(&cfg),
                seconds: started.elapsed().as_secs_f64(),
                command: command.to_string(),
                teacher: teacher_id.clone(),
            };
            tracing::info!("{} seed {seed}: FID {:.2}, accuracy {:.3}", row.id, result.fid, result.accuracy);
            crate::base::fs::atomic_write(&path, &serde_json::to_vec_pretty(&result).expect("json"))?;
        }
    }
    let done = finished(table, out, &teacher_id)?;
    let rows = aggregate(table, base, base_overrides, out, &teacher_id, &done)?;
    crate::base::fs::atomic_write(
        &out.join("results.json"),
        &serde_json::to_vec_pretty(&rows).expect("json"),
    )?;
    crate::base::fs::atomic_write(&out.join("results.md"), markdown(&rows).as_bytes())?;
    let judged = claims(table, &done);
    crate::base::fs::atomic_write(&out.join("claims.md"), claims_markdown(&judged).as_bytes())?;
    Ok(rows)
}

/// The table as Markdown: FID relative to the teacher's where the teacher row is there.
pub fn markdown(table: &[TableRow]) -> String {
    let mut out = String::from(
        "| row | W/A bits | FID (mean ± std) | vs teacher | accuracy | PSNR vs teacher | SSIM vs teacher | seeds | samples |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in table {
        let relative = r.fid_vs_teacher.map_or("-".into(), |v| format!("{:+.1}%", 100.0 * v));
        let seeds: Vec<String> = r.seeds.iter().map(u64::to_string).collect();
        let psnr = match (r.psnr_vs_teacher, r.psnr_std) {
            (Some(p), Some(s)) => format!("{p:.2} ± {s:.2} dB"),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "| `{}` | {}/{} | {:.1} ± {:.1} | {relative} | {:.3} | {psnr} | {} | {} | {} |\n",
            r.row,
            r.w_bits,
            r.a_bits,
            r.fid_mean,
            r.fid_std,
            r.accuracy,
            r.ssim_vs_teacher.map_or("-".into(), |v| format!("{v:.3}")),
            seeds.join(", "),
            r.samples
        ));
    }
    if let Some(r) = table.first() {
        out.push_str(&format!(
            "\nFID of {} real training digits against the held-out digits (the floor): {:.1}. Teacher `{}`. \
             Std: sample standard deviation over seeds.\n",
            r.samples, r.fid_real_heldout, r.teacher
        ));
    }
    out
}

/// Mean FID of `(seed, fid)` pairs relative to the teacher's mean FID on the same seeds; `None`
/// while the teacher lacks one of them. (Seeds change the evaluation noise, and a teacher mean
/// over other seeds moved a row's relative FID by several percent.)
fn relative_to_teacher(fids: &[(u64, f64)], teacher: &[(u64, f64)]) -> Option<f64> {
    if fids.is_empty() {
        return None;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let same: Vec<f64> = fids
        .iter()
        .map(|(seed, _)| teacher.iter().find(|(s, _)| s == seed).map(|&(_, f)| f))
        .collect::<Option<_>>()?;
    let own: Vec<f64> = fids.iter().map(|&(_, f)| f).collect();
    let t = mean(&same);
    (t > 0.0).then(|| mean(&own) / t - 1.0)
}

/// `msfp ablation` restricted to one row and its finished seeds, with the base overrides.
fn row_command(
    base: &Path,
    base_overrides: &[String],
    out: &Path,
    row: &str,
    results: &[RunResult],
) -> String {
    let seeds: Vec<String> = results.iter().map(|r| r.seed.to_string()).collect();
    let mut cmd = format!("msfp ablation --config {} --out {}", base.display(), out.display());
    for o in base_overrides {
        cmd.push_str(&format!(" --set '{o}'"));
    }
    cmd.push_str(&format!(" --rows {row} --seeds {}", seeds.join(",")));
    cmd
}

/// The teacher's samples of a seed (raw little-endian `f32`), shared by the rows' PSNR.
fn teacher_cache(out: &Path, seed: u64, samples: usize, teacher: &str) -> PathBuf {
    out.join("runs").join("teacher").join(format!("{teacher}-seed{seed}-n{samples}.f32"))
}

fn write_images(path: &Path, images: &[f32]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| crate::error::io_err(dir, e))?;
    }
    let bytes: Vec<u8> = images.iter().flat_map(|v| v.to_le_bytes()).collect();
    crate::base::fs::atomic_write(path, &bytes)
}

fn read_images(path: &Path, n: usize) -> Option<Vec<f32>> {
    let bytes = std::fs::read(path).ok()?;
    (bytes.len() == n * 4)
        .then(|| bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// The finished results ([`finished`]) as table rows in the paper's order.
pub fn aggregate(
    which: Table,
    base: &Path,
    base_overrides: &[String],
    out: &Path,
    teacher: &str,
    done: &Finished,
) -> Result<Vec<TableRow>> {
    let mut table = Vec::new();
    let cfg = Config::load(base, base_overrides)?;
    let fid_real_heldout = {
        let device = crate::device::make_device(&cfg.run.device)?;
        Scorer::new(&cfg, &device)?.fid_real_heldout
    };
    // The teacher's FID per seed: each row is compared with the teacher on its own seeds.
    let mut teacher_fid: Vec<(u64, f64)> = Vec::new();
    for row in which.rows() {
        let Some(results) = done.get(row.id) else { continue };
        let fid = mean_std(&results.iter().map(|r| r.fid).collect::<Vec<_>>());
        let measured =
            |f: &dyn Fn(&RunResult) -> Option<f64>| -> Option<Vec<f64>> { results.iter().map(f).collect() };
        let psnr = measured(&|r| r.psnr_vs_teacher).map(|v| mean_std(&v));
        let ssim = measured(&|r| r.ssim_vs_teacher).map(|v| mean_std(&v).0);
        let fids: Vec<(u64, f64)> = results.iter().map(|r| (r.seed, r.fid)).collect();
        let fid_vs_teacher = if row.stage == Stage::Teacher {
            teacher_fid = fids;
            None
        } else {
            relative_to_teacher(&fids, &teacher_fid)
        };
        table.push(TableRow {
            row: row.id.to_string(),
            what: row.what.to_string(),
            w_bits: row.w_bits,
            a_bits: row.a_bits,
            fid_mean: fid.0,
            fid_std: fid.1,
            accuracy: mean_std(&results.iter().map(|r| r.accuracy).collect::<Vec<_>>()).0,
            psnr_vs_teacher: psnr.map(|p| p.0),
            psnr_std: psnr.map(|p| p.1),
            ssim_vs_teacher: ssim,
            fid_vs_teacher,
            seeds: results.iter().map(|r| r.seed).collect(),
            samples: results[0].samples,
            fid_real_heldout,
            command: row_command(base, base_overrides, out, row.id, results),
            teacher: teacher.to_string(),
        });
    }
    Ok(table)
}

/// One of a paper's claims: row `with` is row `without` plus the piece claimed to help.
pub struct Claim {
    pub what: &'static str,
    pub with: &'static str,
    pub without: &'static str,
}

impl Table {
    /// The claims this table tests, each a paired comparison of two of its rows.
    pub fn claims(self) -> &'static [Claim] {
        match self {
            Table::Msfp => MSFP_CLAIMS,
            Table::Hqdit => HQDIT_CLAIMS,
        }
    }
}

const MSFP_CLAIMS: &[Claim] = &[
    Claim { what: "Mixup-sign FP4 beats signed FP4 (PTQ)", with: "msfp_ptq", without: "fp4_signed_ptq" },
    Claim {
        what: "FP4 beats INT4 at W4A4 (both with full MSFP fine-tuning)",
        with: "msfp_full",
        without: "int4_ft",
    },
    Claim { what: "LoRA fine-tuning beats PTQ", with: "msfp_lora", without: "msfp_ptq" },
    Claim { what: "TALoRA (range router) beats one LoRA", with: "msfp_talora", without: "msfp_lora" },
    Claim {
        what: "TALoRA (learned router) beats one LoRA",
        with: "msfp_talora_learned",
        without: "msfp_lora",
    },
    Claim { what: "DFA beats plain MSE (TALoRA, range router)", with: "msfp_full", without: "msfp_talora" },
    Claim {
        what: "DFA beats plain MSE on the noise target",
        with: "msfp_full_noise",
        without: "msfp_talora_noise",
    },
];

const HQDIT_CLAIMS: &[Claim] = &[
    Claim { what: "FP4 beats INT4 at W4A4 (E2M1 vs INT4)", with: "e2m1_ptq", without: "int4_ptq" },
    Claim { what: "Per-layer format choice beats fixed E2M1", with: "fp4_format_ptq", without: "e2m1_ptq" },
    Claim {
        what: "Clipping-range search helps (no rotation)",
        with: "fp4_format_clip_ptq",
        without: "fp4_format_ptq",
    },
    Claim {
        what: "The Hadamard transform helps (= HQ-DiT)",
        with: "hqdit_ptq",
        without: "fp4_format_clip_ptq",
    },
    Claim { what: "MSFP fine-tuning on top of HQ-DiT helps", with: "hqdit_msfp_ft", without: "hqdit_ptq" },
    Claim {
        what: "W4A8 is closer to the teacher than W4A4 (HQ-DiT)",
        with: "w4a8_hqdit",
        without: "hqdit_ptq",
    },
];

/// A claim measured on one metric over the seeds both rows finished.
#[derive(Debug, Clone, Serialize)]
pub struct ClaimResult {
    pub claim: String,
    pub metric: &'static str,
    pub with_mean: f64,
    pub without_mean: f64,
    /// `with_mean - without_mean`.
    pub margin: f64,
    pub with_std: f64,
    pub without_std: f64,
    /// Seeds on which `with` is better, out of `seeds`.
    pub better_on: usize,
    pub seeds: usize,
    pub verdict: &'static str,
}

/// The claim's verdict on paired seeds: it holds when `with` is better on every seed *and* by
/// more than either row's seed std; reversed when worse on every seed by more than that.
pub fn judge(
    claim: &Claim,
    metric: &'static str,
    higher_is_better: bool,
    with: &[(u64, f64)],
    without: &[(u64, f64)],
) -> Option<ClaimResult> {
    let pairs: Vec<(f64, f64)> = with
        .iter()
        .filter_map(|&(seed, a)| without.iter().find(|(s, _)| *s == seed).map(|&(_, b)| (a, b)))
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let (a, sa) = mean_std(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
    let (b, sb) = mean_std(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
    let better = |x: f64, y: f64| if higher_is_better { x > y } else { x < y };
    let better_on = pairs.iter().filter(|&&(x, y)| better(x, y)).count();
    let beyond_spread = (a - b).abs() > sa.max(sb);
    let verdict = match (better_on, beyond_spread) {
        (n, true) if n == pairs.len() => "holds",
        (0, true) => "reversed",
        _ => "not resolved",
    };
    Some(ClaimResult {
        claim: claim.what.to_string(),
        metric,
        with_mean: a,
        without_mean: b,
        margin: a - b,
        with_std: sa,
        without_std: sb,
        better_on,
        seeds: pairs.len(),
        verdict,
    })
}

/// Every claim of `table` on PSNR, SSIM (vs the teacher) and FID, from the finished results.
pub fn claims(table: Table, done: &Finished) -> Vec<ClaimResult> {
    let mut judged = Vec::new();
    let none = Vec::new();
    for claim in table.claims() {
        let (with, without) =
            (done.get(claim.with).unwrap_or(&none), done.get(claim.without).unwrap_or(&none));
        let metrics: [(&'static str, bool, fn(&RunResult) -> Option<f64>); 3] = [
            ("PSNR", true, |r| r.psnr_vs_teacher),
            ("SSIM", true, |r| r.ssim_vs_teacher),
            ("FID", false, |r| Some(r.fid)),
        ];
        for (metric, higher, value) in metrics {
            let per_seed = |rs: &[RunResult]| -> Vec<(u64, f64)> {
                rs.iter().filter_map(|r| value(r).map(|v| (r.seed, v))).collect()
            };
            judged.extend(judge(claim, metric, higher, &per_seed(with), &per_seed(without)));
        }
    }
    judged
}

/// The claims as the Markdown table an experiment's README quotes.
pub fn claims_markdown(claims: &[ClaimResult]) -> String {
    let mut out = String::from(
        "| claim | metric | with | without | margin | seed std (with / without) | better on | verdict |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let mut last = "";
    for c in claims {
        let digits = if c.metric == "SSIM" { 3 } else { 2 };
        let claim = if c.claim == last { "" } else { c.claim.as_str() };
        last = &c.claim;
        out.push_str(&format!(
            "| {claim} | {} | {:.digits$} | {:.digits$} | {:+.digits$} | {:.digits$} / {:.digits$} | {} of {} | {} |\n",
            c.metric, c.with_mean, c.without_mean, c.margin, c.with_std, c.without_std, c.better_on, c.seeds, c.verdict
        ));
    }
    out.push_str(
        "\nPaired by seed (same calibration data and evaluation noise). Holds: better on every seed by more \
         than either row's seed std (sample std); reversed: worse on every seed by more than that.\n",
    );
    out
}

/// Finished results by row id, each row's in seed order.
pub type Finished = BTreeMap<String, Vec<RunResult>>;

/// Every finished result of `table`'s rows on `teacher` under `<out>/results/` (stale ones left
/// out), read once for both the table and the claims.
fn finished(table: Table, out: &Path, teacher: &str) -> Result<Finished> {
    let mut done = Finished::new();
    let Ok(entries) = std::fs::read_dir(out.join("results")) else { return Ok(done) };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let Some(row) = table.rows().iter().find(|r| name.starts_with(&format!("{}-seed", r.id))) else {
            continue;
        };
        if let Some(r) = read_result(&p, teacher)? {
            done.entry(row.id.to_string()).or_default().push(r);
        }
    }
    for results in done.values_mut() {
        results.sort_by_key(|r| r.seed);
    }
    Ok(done)
}

/// Mean and sample standard deviation (n - 1; 0 for one value).
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::RouterKind;
    use crate::pipeline::config::DistillTarget;

    #[test]
    fn rows_are_compared_with_the_teacher_on_their_own_seeds() {
        let teacher = [(0, 50.0), (1, 60.0)];
        // Seed 0 only: against the teacher's seed 0 (50), not its two-seed mean (55).
        assert!((relative_to_teacher(&[(0, 55.0)], &teacher).unwrap() - 0.1).abs() < 1e-12);
        assert!((relative_to_teacher(&[(0, 44.0), (1, 66.0)], &teacher).unwrap()).abs() < 1e-12);
        assert_eq!(relative_to_teacher(&[(2, 50.0)], &teacher), None, "the teacher lacks seed 2");
        assert_eq!(relative_to_teacher(&[], &teacher), None);
    }

    #[test]
    fn a_claim_holds_only_when_every_seed_agrees_beyond_the_spread() {
        let claim = &MSFP_CLAIMS[2];
        let judged = |with: &[(u64, f64)], without: &[(u64, f64)], higher| {
            judge(claim, "PSNR", higher, with, without).map(|c| c.verdict)
        };
        let base = [(0, 20.0), (1, 21.0), (2, 20.5)];
        assert_eq!(judged(&[(0, 22.0), (1, 23.0), (2, 22.5)], &base, true), Some("holds"));
        // Better on every seed but by less than the spread.
        assert_eq!(judged(&[(0, 20.1), (1, 21.1), (2, 20.6)], &base, true), Some("not resolved"));
        assert_eq!(judged(&[(0, 18.0), (1, 19.0), (2, 18.5)], &base, true), Some("reversed"));
        assert_eq!(judged(&[(0, 22.0), (1, 19.0), (2, 22.5)], &base, true), Some("not resolved"));
        // Lower is better for FID; only paired seeds count.
        let c =
            judge(claim, "FID", false, &[(0, 40.0), (1, 41.0), (5, 1.0)], &[(0, 60.0), (1, 62.0)]).unwrap();
        assert_eq!((c.verdict, c.seeds, c.better_on), ("holds", 2, 2));
        assert!((c.margin + 20.5).abs() < 1e-12);
        assert!(judge(claim, "FID", false, &[(3, 1.0)], &base).is_none());
    }

    /// Every claim compares two rows of its own table.
    #[test]
    fn claims_name_rows_of_their_table() {
        for table in [Table::Msfp, Table::Hqdit] {
            for c in table.claims() {
                for id in [c.with, c.without] {
                    assert!(table.rows().iter().any(|r| r.id == id), "{}: no row {id}", c.what);
                }
            }
        }
    }

    #[test]
    fn markdown_shows_the_relative_fid_of_each_row() {
        let row = |id: &str, fid: f64, rel: Option<f64>| TableRow {
            row: id.into(),
            what: String::new(),
            w_bits: 4,
            a_bits: 4,
            fid_mean: fid,
            fid_std: 0.0,
            accuracy: 0.99,
            psnr_vs_teacher: rel.map(|_| 21.5),
            psnr_std: rel.map(|_| 0.25),
            ssim_vs_teacher: rel.map(|_| 0.875),
            fid_vs_teacher: rel,
            seeds: vec![0],
            samples: 2000,
            fid_real_heldout: 6.9,
            command: String::new(),
            teacher: "abc".into(),
        };
        let md = markdown(&[row("teacher", 50.0, None), row("msfp_full", 55.0, Some(0.1))]);
        assert!(md.contains("| `teacher` | 4/4 | 50.0 ± 0.0 | - |"), "{md}");
        assert!(
            md.contains("| `msfp_full` | 4/4 | 55.0 ± 0.0 | +10.0% | 0.990 | 21.50 ± 0.25 dB | 0.875 |"),
            "{md}"
        );
    }

    /// Every HQ-DiT row is a valid config on `configs/hqdit_tiny_dit.toml` and adds what it says.
    #[test]
    fn hqdit_rows_build_valid_configs_one_piece_at_a_time() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/hqdit_tiny_dit.toml");
        let dir = tempfile::tempdir().unwrap();
        let cfg = |id: &str| {
            let row = Table::Hqdit.rows().iter().find(|r| r.id == id).unwrap();
            row_config(&base, &[], row, 1, dir.path()).unwrap()
        };
        for row in Table::Hqdit.rows() {
            row_config(&base, &[], row, 0, dir.path()).unwrap_or_else(|e| panic!("{}: {e}", row.id));
        }
        let ids: std::collections::BTreeSet<&str> = Table::Hqdit.rows().iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), Table::Hqdit.rows().len(), "unique row ids");
        let (e2m1, format, clip, hq, ft) = (
            cfg("e2m1_ptq"),
            cfg("fp4_format_ptq"),
            cfg("fp4_format_clip_ptq"),
            cfg("hqdit_ptq"),
            cfg("hqdit_msfp_ft"),
        );
        assert_eq!((e2m1.quant.weight.as_str(), e2m1.calib.clip_grid), ("e2m1", 1));
        assert_eq!((format.quant.weight.as_str(), format.calib.clip_grid), ("fp4", 1));
        assert!(
            format.quant.hadamard.is_empty() && clip.quant.hadamard.is_empty() && clip.calib.clip_grid > 1
        );
        assert_eq!(hq.quant.hadamard.len(), 4);
        assert!(
            !hq.finetune.enabled && ft.finetune.enabled && ft.lora.rank == 4 && ft.quant.hadamard.len() == 4
        );
        assert_eq!((ft.finetune.target, ft.train.steps), (DistillTarget::Step, 800));
        assert_eq!(cfg("w4a8_hqdit").quant.act, "fp8");
    }

    /// Every MSFP row is a valid config on the committed ablation base; the TALoRA rows differ
    /// from each other in the router only, and from `msfp_lora` in the adapter count.
    #[test]
    fn msfp_rows_build_valid_configs_on_the_committed_base() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/ablation-tiny-unet/config.toml");
        let dir = tempfile::tempdir().unwrap();
        let cfg = |id: &str| {
            let row = Table::Msfp.rows().iter().find(|r| r.id == id).unwrap();
            row_config(&base, &[], row, 0, dir.path()).unwrap_or_else(|e| panic!("{id}: {e}"))
        };
        for row in Table::Msfp.rows() {
            cfg(row.id);
        }
        let (lora, range, learned) = (cfg("msfp_lora"), cfg("msfp_talora"), cfg("msfp_talora_learned"));
        assert_eq!((lora.lora.adapters, range.lora.adapters, learned.lora.adapters), (1, 4, 4));
        assert_eq!((range.lora.router, learned.lora.router), (RouterKind::Range, RouterKind::Learned));
        assert_eq!(range.loss.kind, learned.loss.kind);
        assert_eq!(cfg("msfp_full").finetune.target, DistillTarget::Step);
        let (mse, dfa) = (cfg("msfp_talora_noise"), cfg("msfp_full_noise"));
        assert_eq!(
            (mse.finetune.target, dfa.finetune.target),
            (DistillTarget::CondUncond, DistillTarget::CondUncond)
        );
        assert_ne!(mse.loss.kind, dfa.loss.kind);
    }
}
