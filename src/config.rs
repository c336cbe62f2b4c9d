//! Typed experiment configuration: one TOML file per experiment, unknown keys rejected,
//! `--set section.key=value` overrides parsed and type-checked the same way as the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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

/// `[finetune]`: EfficientDM's data-free recipe. Each iteration draws `train.batch_size` classes
/// and x_T and walks the teacher's sampling trajectory (`[sampler]` kind, eta and clip_x0, with
/// `trajectory_steps` steps); at every step the student is distilled on the teacher's x_t and
/// the optimizer steps once. `train.steps` counts optimizer steps; `train.lr` is the adapters'.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    pub trajectory_steps: usize,
    /// Classifier-free guidance of the teacher's trajectory.
    pub guidance_scale: f64,
    pub router_lr: f64,
    pub weight_scale_lr: f64,
    pub act_scale_lr: f64,
    /// Images whose teacher trajectories feed the calibration (PTQ initialisation).
    pub calib_samples: usize,
    /// `false`: post-training quantization only (HQ-DiT): calibrate, export and evaluate the PTQ
    /// student; no fine-tuning steps.
    pub enabled: bool,
    /// Samples per forward/backward pass of a fine-tuning step (0: the whole conditional +
    /// unconditional batch in one pass). The passes' gradients are summed, so the update is the
    /// same up to float summation order, with the activation memory of one pass.
    pub micro_batch: usize,
    /// What the student's noise is distilled against.
    pub target: DistillTarget,
    /// Whose prediction moves a fine-tuning trajectory from one step to the next.
    pub rollout: Rollout,
}

/// Whose guided noise advances a fine-tuning trajectory (the teacher's targets are always taken
/// at the trajectory's current `x_t`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Rollout {
    /// The teacher's: the student learns on the teacher's own trajectory (EfficientDM's recipe).
    #[default]
    Teacher,
    /// The student's (before the step's update): it learns on the states its own sampling
    /// reaches, where its accumulated error has moved it off the teacher's trajectory.
    /// Checkpoints inside a trajectory save its state, so a run resumes exactly at any step.
    Student,
}

/// The teacher output a fine-tuning step matches.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DistillTarget {
    /// The conditional and the unconditional noise, each on its own (EfficientDM's recipe).
    #[default]
    CondUncond,
    /// The guided noise `uncond + g (cond - uncond)`, the one value the sampler uses (g =
    /// `finetune.guidance_scale`): the error guidance amplifies is the one trained away.
    Guided,
    /// The sampler's update `x_{t-1}` from the guided noise (clipping of the x0 prediction
    /// included): the error that reaches the sample, as DFA's `gamma_t` weighting means it.
    Step,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            trajectory_steps: 25,
            guidance_scale: 2.0,
            router_lr: 1e-3,
            weight_scale_lr: 1e-4,
            act_scale_lr: 1e-4,
            calib_samples: 32,
            enabled: true,
            micro_batch: 0,
            target: DistillTarget::CondUncond,
            rollout: Rollout::Teacher,
        }
    }
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

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    TinyUnet,
    /// The DiT code: the tiny MNIST DiT or, with `[model.dit]` set so, DiT-XL/2 as published.
    #[serde(alias = "dit")]
    TinyDit,
    /// Stable Diffusion v1.x (`[model.sd]`): text-conditioned latent diffusion.
    Sd,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub kind: ModelKind,
    /// Weights to load for `sample`/`eval` (safetensors written by `pretrain`).
    pub weights: Option<PathBuf>,
    pub unet: UnetConfig,
    pub dit: DitConfig,
    pub sd: SdConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::TinyUnet,
            weights: None,
            unet: UnetConfig::default(),
            dit: DitConfig::default(),
            sd: SdConfig::default(),
        }
    }
}

impl ModelConfig {
    /// The smallest tiny UNet the unit tests build (8 base channels, two levels).
    #[cfg(test)]
    pub fn test_unet() -> Self {
        let mut cfg = Self::default();
        cfg.unet.base_channels = 8;
        cfg.unet.channel_mult = vec![1, 2];
        cfg.unet.attention_heads = 2;
        cfg.unet.groups = 4;
        cfg
    }
}

/// Which published Stable Diffusion architecture `[model.sd]` builds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SdPreset {
    Sd14,
    Sd15,
    /// A test-size SD (the layout of `tests/fixtures/sd/tiny/diffusers`): 3-level UNet of 8/16/16
    /// channels, 2-level VAE, 3-layer CLIP with a 1,000-token vocabulary (token ids are folded
    /// into it).
    Tiny,
}

/// Which UNet weights of a CompVis checkpoint that holds both to use.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EmaSetting {
    /// EMA weights when the file has them.
    Auto,
    Ema,
    NonEma,
}

/// `[model.sd]`: Stable Diffusion v1.x. `model.weights` is the user's download: a diffusers
/// directory or a CompVis single file (`sd-v1-4.ckpt`, `.safetensors`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SdConfig {
    pub preset: SdPreset,
    pub ema: EmaSetting,
    /// Image side in pixels (SD1.x: 512); latents are `resolution / 8` for the SD VAE.
    pub resolution: usize,
    /// Prompts, one per line (`#` comments and blank lines skipped): the distillation
    /// trajectories draw from them, evaluation and calibration cycle through them.
    pub prompts: PathBuf,
    /// The unconditional branch of classifier-free guidance (SD: the empty prompt).
    pub negative_prompt: String,
    /// Builds the architecture with random weights instead of loading `model.weights`: for
    /// tests and benchmarks only (the samples are noise).
    pub random_weights: bool,
}

impl Default for SdConfig {
    fn default() -> Self {
        Self {
            preset: SdPreset::Sd14,
            ema: EmaSetting::Auto,
            resolution: 512,
            prompts: "configs/prompts/sd_prompts.txt".into(),
            negative_prompt: String::new(),
            random_weights: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UnetConfig {
    /// Channels at the full resolution.
    pub base_channels: usize,
    /// Channel multiplier per resolution level (each level after the first halves H and W).
    pub channel_mult: Vec<usize>,
    /// Residual blocks per level on the way down (the way up has one more, as in LDM).
    pub res_blocks: usize,
    /// Self-attention heads at the lowest resolution.
    pub attention_heads: usize,
    /// GroupNorm groups.
    pub groups: usize,
}

impl Default for UnetConfig {
    fn default() -> Self {
        Self { base_channels: 32, channel_mult: vec![1, 2, 2], res_blocks: 1, attention_heads: 4, groups: 8 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DitConfig {
    pub patch_size: usize,
    pub hidden: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_ratio: usize,
    /// Input channels: 1 for MNIST pixels, 4 for SD-VAE latents (DiT-XL/2).
    pub in_channels: usize,
    /// Input side: 32 pixels for MNIST, 32 latents for DiT-XL/2 at 256 px (64 at 512 px).
    pub input_size: usize,
    /// Class labels; the null label of classifier-free guidance is one more.
    pub num_classes: usize,
    /// DiT's learned variance: twice `in_channels` out, of which the first half is eps.
    pub learn_sigma: bool,
    /// The MLP's GELU with the tanh approximation (DiT's) instead of the exact erf form.
    pub gelu_tanh: bool,
    /// Timestep frequencies `exp(-ln(1e4) i / (128 - freq_shift))`: 0 is DiT's own (and the tiny
    /// DiT's), 1 is diffusers' `DiTTransformer2DModel` (its `downscale_freq_shift = 1`).
    pub freq_shift: usize,
    /// The SD AutoencoderKL that decodes a latent DiT's samples (`stabilityai/sd-vae-ft-ema` or
    /// `-mse`, a diffusers folder); required when `in_channels` is 4.
    pub vae: Option<PathBuf>,
}

impl Default for DitConfig {
    fn default() -> Self {
        Self {
            patch_size: 4,
            hidden: 128,
            depth: 6,
            heads: 4,
            mlp_ratio: 4,
            in_channels: 1,
            input_size: 32,
            num_classes: 10,
            learn_sigma: false,
            gelu_tanh: false,
            freq_shift: 0,
            vae: None,
        }
    }
}

impl DitConfig {
    /// Output channels: eps, and with `learn_sigma` the variance half.
    pub fn out_channels(&self) -> usize {
        self.in_channels * if self.learn_sigma { 2 } else { 1 }
    }

    /// facebookresearch/DiT's class-conditional ImageNet models on SD-VAE latents (8x down,
    /// 4 channels): `DiT-XL/2`, `DiT-B/2`, `DiT-S/2` at `image` = 256 or 512 pixels.
    pub fn published(name: &str, image: usize) -> Option<Self> {
        let (hidden, depth, heads) = match name {
            "DiT-XL/2" => (1152, 28, 16),
            "DiT-B/2" => (768, 12, 12),
            "DiT-S/2" => (384, 12, 6),
            _ => return None,
        };
        Some(Self {
            patch_size: 2,
            hidden,
            depth,
            heads,
            mlp_ratio: 4,
            in_channels: 4,
            input_size: image / 8,
            num_classes: 1000,
            learn_sigma: true,
            gelu_tanh: true,
            freq_shift: 0,
            vae: None,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Directory holding the MNIST IDX files.
    pub dir: PathBuf,
    /// Digits used for training (the first `train_count` of the file).
    pub train_count: usize,
    /// Held-out digits (the last `heldout_count` of the file), never trained on.
    pub heldout_count: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self { dir: "data".into(), train_count: 9000, heldout_count: 1000 }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusionConfig {
    pub schedule: BetaSchedule,
    pub timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self { schedule: BetaSchedule::Linear, timesteps: 1000, beta_start: 1e-4, beta_end: 0.02 }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    Cosine,
    Linear,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub lr_schedule: LrSchedule,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (0 disables).
    pub grad_clip: f64,
    /// Decay of the exponential moving average of the weights used for sampling (0 disables).
    pub ema_decay: f64,
    /// Probability of replacing the class label by the null label (classifier-free guidance).
    pub label_dropout: f64,
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    pub log_every: usize,
    /// Start from these weights instead of a random initialisation (warm start; the EMA starts
    /// from them too).
    pub init_weights: Option<PathBuf>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 2000,
            batch_size: 64,
            lr: 1e-3,
            lr_schedule: LrSchedule::Cosine,
            warmup_steps: 100,
            weight_decay: 0.0,
            grad_clip: 1.0,
            ema_decay: 0.999,
            label_dropout: 0.1,
            checkpoint_every: 200,
            keep_checkpoints: 3,
            log_every: 10,
            init_weights: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    Ddim,
    Ddpm,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerConfig {
    pub kind: SamplerKind,
    pub steps: usize,
    /// DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like variance).
    pub eta: f64,
    /// Classifier-free guidance scale (1 = conditional model only, no guidance).
    pub guidance_scale: f64,
    /// Clip the predicted clean image to [-1, 1] at every step (and use the noise consistent
    /// with it), as pixel-space DDPM does; keeps an imperfect model's trajectory in range.
    pub clip_x0: bool,
    /// Added to every sampling timestep (diffusers' `steps_offset`; SD1.x: 1, so DDIM 50 visits
    /// t = 981, 961, ..., 1).
    pub steps_offset: usize,
    /// The last step goes to alpha-bar 1 (a clean image); `false` stops at alpha-bar of t = 0,
    /// as SD1.x's scheduler (`set_alpha_to_one = false`).
    pub set_alpha_to_one: bool,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            kind: SamplerKind::Ddim,
            steps: 50,
            eta: 0.0,
            guidance_scale: 2.0,
            clip_x0: false,
            steps_offset: 0,
            set_alpha_to_one: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Generated samples per evaluation (classes cycle 0..9).
    pub samples: usize,
    pub batch_size: usize,
    /// Weights of the MNIST classifier whose features define FID.
    pub classifier: PathBuf,
    /// Seed of the evaluation noise (fixed so that two models see identical noise).
    pub seed: u64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            samples: 1000,
            batch_size: 100,
            classifier: "checkpoints/mnist_classifier.safetensors".into(),
            seed: 1234,
        }
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
        fn positive(key: &str, v: usize) -> Result<()> {
            if v == 0 {
                return Err(Error::usage(format!("{key} = 0 is out of range: it must be at least 1")));
            }
            Ok(())
        }
        fn in_range(key: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
            if !(v.is_finite() && v >= lo && v <= hi) {
                return Err(Error::usage(format!("{key} = {v} is out of range: it must be in [{lo}, {hi}]")));
            }
            Ok(())
        }
        let t = &self.train;
        positive("train.steps", t.steps)?;
        positive("train.batch_size", t.batch_size)?;
        positive("train.checkpoint_every", t.checkpoint_every)?;
        positive("train.keep_checkpoints", t.keep_checkpoints)?;
        positive("train.log_every", t.log_every)?;
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(Error::usage(format!(
                "train.lr = {} is out of range: it must be a positive number",
                t.lr
            )));
        }
        in_range("train.weight_decay", t.weight_decay, 0.0, 1.0)?;
        in_range("train.grad_clip", t.grad_clip, 0.0, f64::MAX)?;
        in_range("train.ema_decay", t.ema_decay, 0.0, 0.99999)?;
        in_range("train.label_dropout", t.label_dropout, 0.0, 1.0)?;
        let d = &self.diffusion;
        positive("diffusion.timesteps", d.timesteps)?;
        in_range("diffusion.beta_start", d.beta_start, 1e-8, 0.5)?;
        in_range("diffusion.beta_end", d.beta_end, d.beta_start, 0.999)?;
        let s = &self.sampler;
        positive("sampler.steps", s.steps)?;
        if s.steps > d.timesteps {
            return Err(Error::usage(format!(
                "sampler.steps = {} is out of range: it must be at most diffusion.timesteps = {}",
                s.steps, d.timesteps
            )));
        }
        in_range("sampler.eta", s.eta, 0.0, 1.0)?;
        if s.steps_offset >= d.timesteps / s.steps {
            usage!(
                "sampler.steps_offset = {} is out of range: it must be below the step stride diffusion.timesteps / sampler.steps = {}",
                s.steps_offset,
                d.timesteps / s.steps
            );
        }
        in_range("sampler.guidance_scale", s.guidance_scale, 0.0, 100.0)?;
        positive("eval.samples", self.eval.samples)?;
        positive("eval.batch_size", self.eval.batch_size)?;
        positive("data.train_count", self.data.train_count)?;
        positive("data.heldout_count", self.data.heldout_count)?;
        let dt = &self.model.dit;
        if self.model.kind == ModelKind::TinyDit && dt.in_channels == 4 {
            if self.model.weights.is_none() {
                usage!(
                    "model.weights is not set: download facebookresearch's DiT-XL-2-256x256.pt \
                     (https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt; CC-BY-NC) or the diffusers \
                     directory facebook/DiT-XL-2-256 on huggingface.co, and set model.weights to its path"
                );
            }
            if dt.vae.is_none() {
                usage!(
                    "model.dit.vae is not set: a latent DiT's samples are decoded by the SD VAE; download \
                     stabilityai/sd-vae-ft-ema (or -mse) from huggingface.co and set model.dit.vae to its folder"
                );
            }
        }
        if self.model.kind == ModelKind::Sd {
            let sd = &self.model.sd;
            if self.model.weights.is_none() && !sd.random_weights {
                usage!(
                    "model.weights is not set: download Stable Diffusion v1.4 (the diffusers directory \
                     CompVis/stable-diffusion-v1-4, or sd-v1-4.ckpt from CompVis/stable-diffusion-v-1-4-original, \
                     both on huggingface.co; v1.5 works too) and set model.weights to its path \
                     (model.sd.random_weights = true builds random weights, for tests only)"
                );
            }
            if self.model.weights.is_some() && sd.random_weights {
                usage!("model.sd.random_weights = true and model.weights are both set: choose one");
            }
            let multiple = crate::models::sd::latent_multiple(sd.preset);
            if sd.resolution == 0 || sd.resolution % multiple != 0 {
                usage!(
                    "model.sd.resolution = {} is out of range: it must be a positive multiple of {multiple} for this preset",
                    sd.resolution
                );
            }
        }
        let u = &self.model.unet;
        positive("model.unet.base_channels", u.base_channels)?;
        positive("model.unet.res_blocks", u.res_blocks)?;
        positive("model.unet.attention_heads", u.attention_heads)?;
        positive("model.unet.groups", u.groups)?;
        if u.channel_mult.is_empty() || u.channel_mult.len() > 4 || u.channel_mult.contains(&0) {
            usage!(
                "model.unet.channel_mult = {:?} is out of range: give 1 to 4 positive multipliers",
                u.channel_mult
            );
        }
        for m in &u.channel_mult {
            if (u.base_channels * m) % u.groups != 0 {
                usage!(
                    "model.unet.groups = {} must divide every level's channels (base_channels * channel_mult = {})",
                    u.groups,
                    u.base_channels * m
                );
            }
        }
        let lowest = u.base_channels * u.channel_mult.last().copied().unwrap_or(1);
        if lowest % u.attention_heads != 0 {
            usage!(
                "model.unet.attention_heads = {} must divide the lowest level's {lowest} channels",
                u.attention_heads
            );
        }
        let dt = &self.model.dit;
        positive("model.dit.depth", dt.depth)?;
        positive("model.dit.heads", dt.heads)?;
        positive("model.dit.mlp_ratio", dt.mlp_ratio)?;
        positive("model.dit.in_channels", dt.in_channels)?;
        positive("model.dit.num_classes", dt.num_classes)?;
        if dt.freq_shift > 1 {
            usage!(
                "model.dit.freq_shift = {} is out of range: 0 (DiT's own) or 1 (diffusers')",
                dt.freq_shift
            );
        }
        if dt.patch_size == 0 || dt.input_size == 0 || dt.input_size % dt.patch_size != 0 {
            usage!(
                "model.dit.patch_size = {} is out of range: it must divide model.dit.input_size ({})",
                dt.patch_size,
                dt.input_size
            );
        }
        if dt.hidden == 0 || dt.hidden % dt.heads != 0 || (dt.hidden / dt.heads) % 2 != 0 {
            usage!(
                "model.dit.hidden = {} must be a positive multiple of 2 * model.dit.heads ({})",
                dt.hidden,
                dt.heads
            );
        }
        crate::device::parse_device_spec(&self.run.device).map_err(|e| e.context("run.device"))?;
        self.quant.validate("quant")?;
        self.calib.validate("calib")?;
        self.mixup.validate("mixup")?;
        self.lora.validate("lora")?;
        self.loss.validate("loss")?;
        let ft = &self.finetune;
        positive("finetune.trajectory_steps", ft.trajectory_steps)?;
        positive("finetune.calib_samples", ft.calib_samples)?;
        if ft.trajectory_steps > self.diffusion.timesteps {
            usage!(
                "finetune.trajectory_steps = {} is out of range: at most diffusion.timesteps ({})",
                ft.trajectory_steps,
                self.diffusion.timesteps
            );
        }
        in_range("finetune.guidance_scale", ft.guidance_scale, 0.0, 100.0)?;
        for (key, v) in [
            ("finetune.router_lr", ft.router_lr),
            ("finetune.weight_scale_lr", ft.weight_scale_lr),
            ("finetune.act_scale_lr", ft.act_scale_lr),
        ] {
            in_range(key, v, 0.0, 10.0)?;
        }
        Ok(())
    }

    /// The config fields that change the math of training, flattened to `section.key = value`.
    /// Two runs may share a checkpoint only if these agree (see [`fingerprint_diff`]).
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

/// Keys whose values differ between two fingerprints, formatted `key: old -> new`.
///
/// A key that one side lacks counts as its default value there, so a checkpoint written before
/// a config key existed still resumes when the key keeps its default.
pub fn fingerprint_diff(saved: &BTreeMap<String, String>, now: &BTreeMap<String, String>) -> Vec<String> {
    let defaults = Config::default().flattened();
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
        assert!(fingerprint_diff(&a.fingerprint(), &b.fingerprint()).is_empty());
        let d = fingerprint_diff(&a.fingerprint(), &c.fingerprint());
        assert_eq!(d.len(), 1);
        assert!(d[0].starts_with("train.lr"), "{d:?}");
    }

    #[test]
    fn fingerprint_keys_added_later_match_at_their_default() {
        let now = Config::parse("", "t", &[]).unwrap().fingerprint();
        let mut old = now.clone();
        old.remove("quant.weight_group_size");
        assert!(fingerprint_diff(&old, &now).is_empty());
        let changed = Config::parse("", "t", &["quant.weight_group_size=16".into()]).unwrap();
        let d = fingerprint_diff(&old, &changed.fingerprint());
        assert_eq!(d, vec!["quant.weight_group_size: (absent) -> 16".to_string()]);
    }
}
