//! Resumable checkpoints: `<out_dir>/checkpoints/step-NNNNNN/` with
//! - `trainable.safetensors`: every trainable tensor by module path,
//! - `optimizer.safetensors`: AdamW moments by path (metadata: step),
//! - `ema.safetensors`: the EMA weights, when EMA is on,
//! - `trajectory.safetensors`: a fine-tuning run's current trajectory state (`x`), when the
//!   checkpoint falls inside a trajectory (its random stream in `state.json`),
//! - `state.json`: step, RNG state, data cursor and the config fingerprint.
//!
//! A checkpoint is written into a temporary directory, fsynced and renamed into place; then the
//! one-line file `latest` is replaced atomically. A run killed at any moment therefore leaves
//! `latest` naming a complete checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::base::fs::atomic_write;
use crate::base::params::{NamedTensors, load_safetensors, save_safetensors};
use crate::error::{Error, Result, io_err};
use crate::rng::RngState;

pub const TRAINABLE: &str = "trainable.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const EMA: &str = "ema.safetensors";
pub const TRAJECTORY: &str = "trajectory.safetensors";
pub const STATE: &str = "state.json";
pub const LATEST: &str = "latest";

/// Position in the stream of training examples.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct DataCursor {
    pub epoch: u64,
    pub position: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: usize,
    pub rng: RngState,
    pub cursor: DataCursor,
    /// What the checkpoint was trained as (e.g. `pretrain:tiny_unet`).
    pub job: String,
    pub fingerprint: BTreeMap<String, String>,
    /// The random stream of the trajectory the run is inside (with `Checkpoint::trajectory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trajectory_rng: Option<RngState>,
}

/// Everything a checkpoint holds.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
    pub trainable: NamedTensors,
    pub optimizer: NamedTensors,
    pub optimizer_step: u64,
    pub ema: Option<NamedTensors>,
    /// The state of the trajectory the run is inside (fine-tuning: `x`), so that a resumed run
    /// continues it exactly instead of replaying it.
    pub trajectory: Option<NamedTensors>,
}

pub fn checkpoints_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("checkpoints")
}

/// Writes a checkpoint and points `latest` at it; prunes all but the newest `keep`.
pub fn save(out_dir: &Path, ckpt: &Checkpoint, keep: usize) -> Result<PathBuf> {
    let root = checkpoints_dir(out_dir);
    std::fs::create_dir_all(&root).map_err(|e| io_err(&root, e))?;
    let name = format!("step-{:06}", ckpt.state.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    save_safetensors(&tmp.join(TRAINABLE), &ckpt.trainable, &BTreeMap::new())?;
    let meta = BTreeMap::from([("step".to_string(), ckpt.optimizer_step.to_string())]);
    save_safetensors(&tmp.join(OPTIMIZER), &ckpt.optimizer, &meta)?;
    if let Some(ema) = &ckpt.ema {
        save_safetensors(&tmp.join(EMA), ema, &BTreeMap::new())?;
    }
    if let Some(trajectory) = &ckpt.trajectory {
        save_safetensors(&tmp.join(TRAJECTORY), trajectory, &BTreeMap::new())?;
    }
    let state = serde_json::to_vec_pretty(&ckpt.state).expect("state serialises");
    atomic_write(&tmp.join(STATE), &state)?;
    let final_dir = root.join(&name);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| io_err(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| io_err(&final_dir, e))?;
    sync_dir(&root);
    atomic_write(&root.join(LATEST), format!("{name}\n").as_bytes())?;
    prune(&root, keep)?;
    Ok(final_dir)
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Completed checkpoint directories, oldest first.
pub fn list(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
        .collect();
    dirs.sort();
    dirs
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let dirs = list(root);
    let latest = std::fs::read_to_string(root.join(LATEST)).unwrap_or_default();
    for d in dirs.iter().take(dirs.len().saturating_sub(keep)) {
        if d.file_name().is_some_and(|n| n.to_string_lossy() == latest.trim()) {
            continue;
        }
        std::fs::remove_dir_all(d).map_err(|e| io_err(d, e))?;
    }
    // Leftovers of runs killed mid-write.
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let p = e.path();
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with(".tmp-") && !n.ends_with(&format!("-{}", std::process::id())) {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
    Ok(())
}

/// The directory `latest` points at, if any.
pub fn latest(out_dir: &Path) -> Result<Option<PathBuf>> {
    let root = checkpoints_dir(out_dir);
    let file = root.join(LATEST);
    match std::fs::read_to_string(&file) {
        Ok(name) => Ok(Some(root.join(name.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&file, e)),
    }
}

/// Loads a checkpoint directory, checking it is complete.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    if !dir.is_dir() {
        return Err(Error::usage(format!(
            "checkpoint {} does not exist (give a step-NNNNNN directory or `auto`)",
            dir.display()
        )));
    }
    let state_path = dir.join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| {
        Error::runtime(format!("{}: {e}; the checkpoint is incomplete or corrupt", state_path.display()))
    })?;
    let state: TrainState = serde_json::from_str(&text)
        .map_err(|e| Error::runtime(format!("{}: corrupt checkpoint state ({e})", state_path.display())))?;
    let (trainable, _) = load_safetensors(&dir.join(TRAINABLE)).map_err(|e| Error::runtime(e.message))?;
    let (optimizer, meta) = load_safetensors(&dir.join(OPTIMIZER)).map_err(|e| Error::runtime(e.message))?;
    let optimizer_step = meta.get("step").and_then(|s| s.parse().ok()).ok_or_else(|| {
        Error::runtime(format!("{}: missing optimizer step", dir.join(OPTIMIZER).display()))
    })?;
    let ema_path = dir.join(EMA);
    let ema = if ema_path.exists() { Some(load_safetensors(&ema_path)?.0) } else { None };
    let trajectory_path = dir.join(TRAJECTORY);
    let trajectory =
        if trajectory_path.exists() { Some(load_safetensors(&trajectory_path)?.0) } else { None };
    Ok(Checkpoint { dir: dir.to_path_buf(), state, trainable, optimizer, optimizer_step, ema, trajectory })
}

/// Refuses a checkpoint trained for another job or with a config that changes the math
/// (`defaults`: the default config's fingerprint, for keys the checkpoint predates).
pub fn check_compatible(
    ckpt: &Checkpoint,
    job: &str,
    fingerprint: &BTreeMap<String, String>,
    defaults: &BTreeMap<String, String>,
) -> Result<()> {
    if ckpt.state.job != job {
        return Err(Error::usage(format!(
            "{}: checkpoint was written by `{}`, this run is `{job}`; resume it with its own config",
            ckpt.dir.display(),
            ckpt.state.job
        )));
    }
    let diff = fingerprint_diff(&ckpt.state.fingerprint, fingerprint, defaults);
    if !diff.is_empty() {
        return Err(Error::usage(format!(
            "{}: the config differs from the checkpoint's in keys that change the math: {}; restore them or start a new out_dir",
            ckpt.dir.display(),
            diff.join(", ")
        )));
    }
    Ok(())
}

/// Keys whose values differ between two fingerprints, formatted `key: old -> new`.
///
/// A key that one side lacks counts as its value in `defaults` there, so a checkpoint written
/// before a config key existed still resumes when the key keeps its default.
pub fn fingerprint_diff(
    saved: &BTreeMap<String, String>,
    now: &BTreeMap<String, String>,
    defaults: &BTreeMap<String, String>,
) -> Vec<String> {
    let value = |map: &BTreeMap<String, String>, k: &String| map.get(k).or_else(|| defaults.get(k)).cloned();
    let mut keys: Vec<&String> = saved.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| value(saved, k) != value(now, k))
        .map(|k| {
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(absent)".into());
            format!("{k}: {} -> {}", show(saved.get(k)), show(now.get(k)))
        })
        .collect()
}
