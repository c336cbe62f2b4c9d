//! The job's configuration: one TOML file per experiment, unknown keys rejected,
//! `--set section.key=value` overrides parsed and type-checked the same way as the file. Each
//! section's type and checks live with the module that uses it (re-exported here); this module
//! only assembles them, plus `[run]`, the job's own section. It sits in `pipeline`, the top
//! layer, because the stages' sections (`[finetune]`, `[eval]`) are theirs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use super::eval::EvalConfig;
pub use super::finetune::{DistillTarget, FinetuneConfig, Rollout};
pub use crate::data::mnist::DataConfig;
pub use crate::diffusion::sampler::{SamplerConfig, SamplerKind};
pub use crate::diffusion::schedule::{BetaSchedule, DiffusionConfig};
use crate::error::{Error, Result};
pub use crate::models::dit::DitConfig;
pub use crate::models::sd::config::{EmaSetting, SdConfig, SdPreset};
pub use crate::models::unet::UnetConfig;
pub use crate::models::{ModelConfig, ModelKind};
pub use crate::train::{LrSchedule, TrainConfig};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub run: RunConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub diffusion: DiffusionConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub sampler: SamplerConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    /// Which layers are quantized and at which formats (used by quantization jobs).
    #[serde(default)]
    pub quant: crate::quant::plan::QuantConfig,
    /// Calibration searches (clipping ratios, zero points).
    #[serde(default)]
    pub calib: crate::quant::calib::CalibConfig,
    /// MSFP's mixup-sign rule for activations.
    #[serde(default)]
    pub mixup: crate::quant::mixup::MixupConfig,
    /// TALoRA adapters and router (`msfp train`).
    #[serde(default)]
    pub lora: crate::lora::LoraConfig,
    /// Distillation loss (`msfp train`).
    #[serde(default)]
    pub loss: crate::loss::LossConfig,
    /// Data-free distillation along the teacher's trajectory (`msfp train`).
    #[serde(default)]
    pub finetune: FinetuneConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Name of the run (used in logs and summaries).
    pub name: String,
    /// Directory receiving checkpoints, metrics, summaries and images.
    pub out_dir: PathBuf,
    /// Seed for every random draw of the run.
    pub seed: u64,
    /// `flex`, `wgpu`, `wgpu-cpu`, `cuda` or `cuda:N`.
    pub device: String,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self { name: "run".into(), out_dir: "runs/run".into(), seed: 0, device: "flex".into() }
    }
}

impl Config {
    /// Reads, overrides and validates a config file.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::usage(format!("cannot read config {}: {e}", path.display())))?;
        Self::parse(&text, &path.display().to_string(), overrides)
    }

    /// Parses TOML text (`origin` names it in errors), applies `--set` overrides and validates.
    pub fn parse(text: &str, origin: &str, overrides: &[String]) -> Result<Self> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| Error::usage(format!("{origin}: {}", one_line(&e.to_string()))))?;
        // The file alone first, so that its own errors name it (with a line number), not the
        // first `--set`.
        if let Err(e) = toml::from_str::<Config>(text) {
            return Err(Error::usage(format!("{origin}: {}", one_line(&e.to_string()))));
        }
        for spec in overrides {
            apply_override(&mut table, spec)?;
        }
        let config: Config = Config::deserialize(toml::Value::Table(table.clone()))
            .map_err(|e| Error::usage(format!("{origin}: {}", one_line(&e.to_string()))))?;
        config.validate().map_err(|e| e.context(origin))?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        self.diffusion.validate()?;
        self.sampler.validate(self.diffusion.timesteps)?;
        self.eval.validate()?;
        self.data.validate()?;
        self.model.validate()?;
        crate::device::parse_device_spec(&self.run.device).map_err(|e| e.context("run.device"))?;
        self.quant.validate("quant")?;
        self.calib.validate("calib")?;
        self.mixup.validate("mixup")?;
        self.lora.validate("lora")?;
        self.loss.validate("loss")?;
        self.finetune.validate(self.diffusion.timesteps)?;
        Ok(())
    }

    /// The config fields that change the math of training, flattened to `section.key = value`.
    /// Two runs may share a checkpoint only if these agree (`train::checkpoint::fingerprint_diff`,
    /// with [`Config::default`]'s flattened keys as the values of keys a side lacks).
    pub fn fingerprint(&self) -> BTreeMap<String, String> {
        let mut flat = self.flattened();
        for key in NON_MATH_KEYS {
            flat.remove(*key);
        }
        flat.retain(|k, _| !k.starts_with("eval.") && !k.starts_with("sampler."));
        flat
    }
}

impl Config {
    /// Every key that has a value, flattened to `section.key = value` (TOML syntax).
    pub fn flattened(&self) -> BTreeMap<String, String> {
        let value = toml::Value::try_from(self).expect("config serialises to TOML");
        let mut flat = BTreeMap::new();
        flatten("", &value, &mut flat);
        flat
    }
}

/// Keys that may change between a run and its resumption without changing the math.
const NON_MATH_KEYS: &[&str] = &[
    "run.name",
    "run.out_dir",
    "run.device",
    "model.weights",
    "model.dit.vae",
    "train.steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
];

fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Applies one `section.key=value` override to the raw table. The value is read as a TOML value
/// (`3`, `1e-4`, `true`, `[1, 2]`, `"text"`); anything that is not valid TOML is taken as a string.
fn apply_override(table: &mut toml::Table, spec: &str) -> Result<()> {
    let Some((key, raw)) = spec.split_once('=') else {
        usage!("--set {spec}: expected section.key=value");
    };
    let key = key.trim();
    let raw = raw.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        usage!("--set {spec}: the key must be section.key (e.g. train.steps=100)");
    }
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    {
        let mut node = &mut *table;
        for part in &parts[..parts.len() - 1] {
            let entry =
                node.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            node = match entry {
                toml::Value::Table(t) => t,
                _ => usage!("--set {spec}: {part} is not a section"),
            };
        }
        node.insert(parts[parts.len() - 1].to_string(), value);
    }
    // Validate the override alone so that its error names the override, not the file.
    Config::deserialize(toml::Value::Table(table.clone()))
        .map_err(|e| Error::usage(format!("--set {spec}: {}", one_line(&e.to_string()))))?;
    Ok(())
}

/// toml's messages span several lines with a source excerpt; keep them to one readable line.
fn one_line(msg: &str) -> String {
    msg.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('|')).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::checkpoint::fingerprint_diff;

    fn defaults() -> BTreeMap<String, String> {
        Config::default().flattened()
    }

    #[test]
    fn defaults_validate() {
        Config::parse("", "t.toml", &[]).unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[train]\nstepz = 3\n", "t.toml", &[]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.message.contains("stepz"), "{err}");
        assert!(err.message.contains("t.toml"), "{err}");
        assert!(err.message.contains("line 2"), "{err}");
        // With overrides too, the file's own mistake names the file, not the first override.
        let err = Config::parse("[train]\nstepz = 3\n", "t.toml", &["eval.samples=4".into()]).unwrap_err();
        assert!(err.message.starts_with("t.toml") && err.message.contains("stepz"), "{err}");
        assert!(!err.message.contains("--set"), "{err}");
    }

    #[test]
    fn overrides_are_type_checked() {
        let c = Config::parse("", "t", &["train.steps=7".into(), "sampler.kind=ddpm".into()]).unwrap();
        assert_eq!(c.train.steps, 7);
        assert_eq!(c.sampler.kind, SamplerKind::Ddpm);
        let err = Config::parse("", "t", &["train.steps=abc".into()]).unwrap_err();
        assert!(err.message.contains("--set train.steps=abc"), "{err}");
        let err = Config::parse("", "t", &["train.nope=1".into()]).unwrap_err();
        assert!(err.message.contains("nope"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for (set, key) in
            [("train.steps=0", "train.steps"), ("train.lr=-1", "train.lr"), ("sampler.eta=2", "sampler.eta")]
        {
            let err = Config::parse("", "t", &[set.into()]).unwrap_err();
            assert!(err.message.contains(key), "{err}");
        }
    }

    #[test]
    fn quant_sections_parse_and_validate() {
        let text = "[quant]\nweight = \"fp4\"\nact = \"fp4\"\n[[quant.layers]]\npattern = \"conv_in\"\nweight = \"e4m3\"\n[mixup]\nrule = \"structural\"\n";
        let c = Config::parse(text, "q.toml", &[]).unwrap();
        assert_eq!(c.quant.layers[0].weight.as_deref(), Some("e4m3"));
        let err = Config::parse("[quant]\nact = \"e9m9\"\n", "q.toml", &[]).unwrap_err();
        assert!(err.message.contains("quant.act") && err.message.contains("q.toml"), "{err}");
        let err = Config::parse("[calib]\nclip_min = 0\n", "q.toml", &[]).unwrap_err();
        assert!(err.message.contains("calib.clip_min"), "{err}");
        let err = Config::parse("[mixup]\nrule = \"sometimes\"\n", "q.toml", &[]).unwrap_err();
        assert!(err.message.contains("sometimes"), "{err}");
    }

    #[test]
    fn fingerprint_ignores_steps_but_not_lr() {
        let a = Config::parse("", "t", &[]).unwrap();
        let b = Config::parse("", "t", &["train.steps=5".into()]).unwrap();
        let c = Config::parse("", "t", &["train.lr=0.5".into()]).unwrap();
        assert!(fingerprint_diff(&a.fingerprint(), &b.fingerprint(), &defaults()).is_empty());
        let d = fingerprint_diff(&a.fingerprint(), &c.fingerprint(), &defaults());
        assert_eq!(d.len(), 1);
        assert!(d[0].starts_with("train.lr"), "{d:?}");
    }

    #[test]
    fn fingerprint_keys_added_later_match_at_their_default() {
        let now = Config::parse("", "t", &[]).unwrap().fingerprint();
        let mut old = now.clone();
        old.remove("quant.weight_group_size");
        assert!(fingerprint_diff(&old, &now, &defaults()).is_empty());
        let changed = Config::parse("", "t", &["quant.weight_group_size=16".into()]).unwrap();
        let d = fingerprint_diff(&old, &changed.fingerprint(), &defaults());
        assert_eq!(d, vec!["quant.weight_group_size: (absent) -> 16".to_string()]);
    }
}
