//! `msfp pretrain`: full-precision epsilon-prediction training of a tiny diffusion model on
//! MNIST, resumable at any checkpoint, bit-exact on flex.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Serialize;

use crate::base::params::{self, NamedTensors};
use crate::data::{Mnist, Split};
use crate::diffusion::NoiseSchedule;
use crate::error::{Error, Result};
use crate::models::{Denoiser, NUM_CLASSES};
use crate::nn::StepCtx;
use crate::pipeline::config::Config;
use crate::rng::{SeededRng, stream};
use crate::train::checkpoint::{self, Checkpoint, DataCursor, TrainState};
use crate::train::metrics::{MetricsLog, Progress, StepMetrics};
use crate::train::optim::{AdamW, Ema, learning_rate};

/// Where to resume from.
#[derive(Debug, Clone)]
pub enum Resume {
    No,
    /// `latest` of the run's out_dir, or a fresh start if there is none.
    Auto,
    Dir(PathBuf),
}

impl Resume {
    /// The checkpoint directory to resume from, if any (`Auto` with no checkpoint yet: none).
    pub fn dir(&self, out_dir: &Path) -> Result<Option<PathBuf>> {
        Ok(match self {
            Resume::No => None,
            Resume::Auto => checkpoint::latest(out_dir)?,
            Resume::Dir(d) => Some(d.clone()),
        })
    }

    pub fn parse(arg: Option<&str>) -> Self {
        match arg {
            None => Resume::No,
            Some("auto") => Resume::Auto,
            Some(dir) => Resume::Dir(dir.into()),
        }
    }
}

/// Walks the training set in a fresh permutation per epoch; the cursor is all it needs to resume.
pub struct DataStream {
    seed: u64,
    n: usize,
    cursor: DataCursor,
    order: Vec<usize>,
}

impl DataStream {
    pub fn new(seed: u64, n: usize, cursor: DataCursor) -> Self {
        let order = SeededRng::derived(seed, stream::PRETRAIN_EPOCH + cursor.epoch).permutation(n);
        Self { seed, n, cursor, order }
    }

    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }

    pub fn next_batch(&mut self, size: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(size);
        while out.len() < size {
            if self.cursor.position == self.n {
                self.cursor = DataCursor { epoch: self.cursor.epoch + 1, position: 0 };
                self.order = SeededRng::derived(self.seed, stream::PRETRAIN_EPOCH + self.cursor.epoch)
                    .permutation(self.n);
            }
            out.push(self.order[self.cursor.position]);
            self.cursor.position += 1;
        }
        out
    }
}

#[derive(Debug, Serialize)]
pub struct PretrainSummary {
    pub job: String,
    pub steps: usize,
    pub resumed_from: Option<String>,
    pub final_loss: f64,
    pub mean_loss_last_100: f64,
    pub steps_per_second: f64,
    pub parameters: usize,
    pub weights: String,
}

pub fn job_name(cfg: &Config) -> String {
    format!("pretrain:{}", serde_json::to_value(cfg.model.kind).expect("kind").as_str().unwrap_or("?"))
}

/// One denoising-score-matching loss on a batch, `mean ||eps_hat - eps||^2`.
pub fn diffusion_loss(
    model: &Denoiser,
    schedule: &NoiseSchedule,
    data: &Mnist,
    indices: &[usize],
    label_dropout: f64,
    rng: &mut SeededRng,
    device: &Device,
) -> Tensor<1> {
    let b = indices.len();
    let (x0, labels) = data.batch(indices, device);
    let t: Vec<usize> = (0..b).map(|_| rng.below(schedule.timesteps())).collect();
    let noise = Tensor::<4>::from_data(TensorData::new(rng.normals(b * 32 * 32), [b, 1, 32, 32]), device);
    let keep: Vec<i64> = (0..b).map(|_| i64::from(rng.uniform() as f64 >= label_dropout)).collect();
    let keep = Tensor::<1, Int>::from_data(TensorData::new(keep, [b]), device);
    // label if kept, else the null label
    let labels = labels * keep.clone() + (keep.neg() + 1) * NUM_CLASSES as i64;
    let xt = schedule.add_noise(x0, noise.clone(), &t);
    let tt =
        Tensor::<1>::from_data(TensorData::new(t.iter().map(|&v| v as f32).collect::<Vec<_>>(), [b]), device);
    // Timesteps differ per sample here: no shared step context.
    let pred = model.forward(xt, tt, labels, &StepCtx::default());
    (pred - noise).square().mean()
}

pub fn pretrain(cfg: &Config, resume: Resume) -> Result<PretrainSummary> {
    if cfg.model.kind == crate::pipeline::config::ModelKind::Sd {
        usage!(
            "msfp pretrain trains the tiny MNIST models; Stable Diffusion comes pretrained (model.weights)"
        );
    }
    let out_dir = cfg.run.out_dir.clone();
    std::fs::create_dir_all(&out_dir).map_err(|e| crate::error::io_err(&out_dir, e))?;
    let device = crate::device::make_device(&cfg.run.device)?.autodiff();
    let schedule = NoiseSchedule::new(&cfg.diffusion);
    let data = Mnist::from_config(&cfg.data, Split::Train)?;
    let job = job_name(cfg);
    let fingerprint = cfg.fingerprint();

    let mut model =
        Denoiser::new(&cfg.model, &mut SeededRng::derived(cfg.run.seed, stream::PRETRAIN_INIT), &device);
    if let Some(path) = &cfg.train.init_weights {
        model = crate::models::registry::load_weights_into(model, path, cfg.model.kind)?;
        tracing::info!("warm start from {}", path.display());
    }
    let mut optim = AdamW::new(cfg.train.weight_decay, cfg.train.grad_clip);
    let mut ema = (cfg.train.ema_decay > 0.0).then(|| Ema::new(&model, cfg.train.ema_decay));
    let mut rng = SeededRng::derived(cfg.run.seed, stream::PRETRAIN_TRAIN);
    let mut cursor = DataCursor::default();
    let mut start = 0;

    let resume_dir = resume.dir(&out_dir)?;
    if let Some(dir) = &resume_dir {
        let ckpt = checkpoint::load(dir)?;
        checkpoint::check_compatible(&ckpt, &job, &fingerprint, &Config::default().flattened())?;
        model = params::load_into(model, &ckpt.trainable, &dir.join(checkpoint::TRAINABLE))?;
        optim.load_state(&ckpt.optimizer, ckpt.optimizer_step, &device.clone().inner());
        if let (Some(e), Some(saved)) = (ema.as_mut(), &ckpt.ema) {
            e.load(saved, &device.clone().inner());
        }
        rng = SeededRng::from_state(&ckpt.state.rng)
            .ok_or_else(|| Error::runtime(format!("{}: corrupt RNG state", dir.display())))?;
        cursor = ckpt.state.cursor;
        start = ckpt.state.step;
        tracing::info!("resumed from {} at step {start}", dir.display());
        if start >= cfg.train.steps {
            tracing::warn!(
                "checkpoint is at step {start}, train.steps = {}: nothing to train",
                cfg.train.steps
            );
        }
    }

    let mut stream = DataStream::new(cfg.run.seed, data.len(), cursor);
    let metrics = MetricsLog::open(&out_dir, start)?;
    let progress = Progress::new(&job, start, cfg.train.steps);
    let mut losses = Vec::new();
    let mut last_rate = 0.0;
    for step in start..cfg.train.steps {
        let indices = stream.next_batch(cfg.train.batch_size);
        let loss =
            diffusion_loss(&model, &schedule, &data, &indices, cfg.train.label_dropout, &mut rng, &device);
        let loss_value = crate::base::params::host_scalar(loss.clone()) as f64;
        if !loss_value.is_finite() {
            return Err(Error::runtime(format!(
                "loss became {loss_value} at step {}; lower train.lr (now {}) or raise train.warmup_steps",
                step + 1,
                cfg.train.lr
            )));
        }
        let grads = loss.backward();
        let lr = learning_rate(&cfg.train, step);
        let (updated, grad_norm) = optim.step(model, &grads, lr);
        model = updated;
        let done = step + 1;
        if let Some(e) = ema.as_mut() {
            e.update(&model, done);
        }
        losses.push(loss_value);
        let log = done % cfg.train.log_every == 0 || done == cfg.train.steps;
        last_rate = progress.rate(done);
        if log {
            metrics.append(&StepMetrics {
                step: done,
                loss: loss_value,
                lr,
                grad_norm,
                it_per_s: last_rate,
            })?;
        }
        progress.update(done, &format!("loss {loss_value:.4}"), log);
        if done % cfg.train.checkpoint_every == 0 || done == cfg.train.steps {
            let ckpt = Checkpoint {
                dir: PathBuf::new(),
                state: TrainState {
                    step: done,
                    rng: rng.state(),
                    cursor: stream.cursor(),
                    job: job.clone(),
                    fingerprint: fingerprint.clone(),
                    trajectory_rng: None,
                },
                trainable: params::collect(&model),
                optimizer: optim.state_tensors(),
                optimizer_step: optim.step,
                ema: ema.as_ref().map(Ema::tensors),
                trajectory: None,
            };
            checkpoint::save(&out_dir, &ckpt, cfg.train.keep_checkpoints)?;
        }
    }
    progress.finish();

    let weights = ema.as_ref().map(Ema::tensors).unwrap_or_else(|| params::collect(&model));
    let weights_path = out_dir.join("model.safetensors");
    save_weights(&weights_path, &weights, cfg)?;
    let all = MetricsLog::read_all(&out_dir);
    let tail: Vec<f64> = losses.iter().rev().take(100).copied().collect();
    let summary = PretrainSummary {
        job,
        steps: cfg.train.steps,
        resumed_from: resume_dir.map(|d| d.display().to_string()),
        final_loss: all.last().map_or(f64::NAN, |m| m.loss),
        mean_loss_last_100: if tail.is_empty() {
            f64::NAN
        } else {
            tail.iter().sum::<f64>() / tail.len() as f64
        },
        steps_per_second: last_rate,
        parameters: model.num_params(),
        weights: weights_path.display().to_string(),
    };
    crate::base::fs::atomic_write(
        &out_dir.join("summary.json"),
        &serde_json::to_vec_pretty(&summary).expect("json"),
    )?;
    crate::report::plot::loss_curve(&out_dir.join("loss.png"), &all)?;
    let sampling_model = params::load_into(model.valid(), &weights, &weights_path)?;
    let family = crate::models::Family::tiny(&sampling_model.devices()[0]);
    crate::pipeline::sample::write_grid(&sampling_model, &family, cfg, &out_dir.join("samples.png"), 100)?;
    Ok(summary)
}

/// Writes model weights with metadata naming the model kind and its config.
pub fn save_weights(path: &Path, weights: &NamedTensors, cfg: &Config) -> Result<()> {
    let meta = BTreeMap::from([
        ("msfp.model".to_string(), serde_json::to_string(&cfg.model.kind).expect("json")),
        ("msfp.model_config".to_string(), serde_json::to_string(&cfg.model).expect("json")),
    ]);
    params::save_safetensors(path, weights, &meta)
}
