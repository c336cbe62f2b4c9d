//! `msfp train`: the full MSFP job. Load the full-precision teacher, build the W4A4 student
//! (calibration over the teacher's trajectories: PTQ initialisation with mixup-sign formats),
//! fine-tune it by data-free distillation along the teacher's sampling trajectory (EfficientDM's
//! recipe) with TALoRA adapters and the DFA loss, evaluate teacher / PTQ / fine-tuned student on
//! identical noise, and export the packed 4-bit model.
//!
//! Resumable at every optimizer step, bit-exact on flex: a checkpoint holds the trainable tensors
//! (adapters, router, quantizer scales), the optimizer state and the step; the trajectory being
//! walked is recomputed from its seed (the teacher is deterministic), so nothing else is needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::config::{Config, SamplerConfig};
use super::eval::{ModelEval, Scorer, psnr, sampler_label, ssim};
use super::pretrain::Resume;
use super::student::{self, Group, ParamGroups, StudentPlan};
use super::timestep_error;
use crate::base::params::{self, HostTensor};
use crate::diffusion::sampler::{cond_uncond_eps, guide};
use crate::diffusion::{NoiseSchedule, Sampler, sample};
use crate::error::{Error, Result, in_range, positive};
use crate::models::{Cond, Denoiser, Family};
use crate::nn::StepCtx;
use crate::rng::{SeededRng, stream};
use crate::train::checkpoint::{self, Checkpoint, DataCursor, TrainState};
use crate::train::metrics::{MetricsLog, Progress, StepMetrics};
use crate::train::optim::{AdamW, learning_rate};

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

impl FinetuneConfig {
    /// `[finetune]`'s ranges; `timesteps` is `diffusion.timesteps`.
    pub fn validate(&self, timesteps: usize) -> Result<()> {
        positive("finetune.trajectory_steps", self.trajectory_steps)?;
        positive("finetune.calib_samples", self.calib_samples)?;
        if self.trajectory_steps > timesteps {
            usage!(
                "finetune.trajectory_steps = {} is out of range: at most diffusion.timesteps ({})",
                self.trajectory_steps,
                timesteps
            );
        }
        in_range("finetune.guidance_scale", self.guidance_scale, 0.0, 100.0)?;
        for (key, v) in [
            ("finetune.router_lr", self.router_lr),
            ("finetune.weight_scale_lr", self.weight_scale_lr),
            ("finetune.act_scale_lr", self.act_scale_lr),
        ] {
            in_range(key, v, 0.0, 10.0)?;
        }
        Ok(())
    }
}

pub const PLAN_FILE: &str = "student_plan.json";
pub const PTQ_FILE: &str = "ptq.safetensors";
pub const STUDENT_FILE: &str = "student.safetensors";
pub const PACKED_FILE: &str = "model.packed.safetensors";

pub fn job_name(cfg: &Config) -> String {
    format!("train:{}", serde_json::to_value(cfg.model.kind).expect("kind").as_str().unwrap_or("?"))
}

/// The config fingerprint of the job: the math keys, plus the sampler keys that shape the
/// teacher trajectory.
pub fn fingerprint(cfg: &Config) -> BTreeMap<String, String> {
    let flat = cfg.flattened();
    let mut f = cfg.fingerprint();
    for key in ["sampler.kind", "sampler.eta", "sampler.clip_x0"] {
        if let Some(v) = flat.get(key) {
            f.insert(key.to_string(), v.clone());
        }
    }
    f
}

/// The sampler whose trajectory the student is distilled on.
pub fn trajectory_sampler(cfg: &Config, schedule: &NoiseSchedule) -> Sampler {
    let sc = SamplerConfig {
        steps: cfg.finetune.trajectory_steps,
        guidance_scale: cfg.finetune.guidance_scale,
        ..cfg.sampler.clone()
    };
    Sampler::new(schedule, &sc)
}

/// One teacher trajectory: its conditions (drawn classes or prompts) and current x_t, advanced
/// step by step.
struct Trajectory {
    iteration: usize,
    position: usize,
    cond: Cond,
    null: Cond,
    x: Tensor<4>,
    rng: SeededRng,
}

impl Trajectory {
    fn start(family: &Family, seed: u64, iteration: usize, batch: usize, device: &Device) -> Self {
        let mut rng = SeededRng::derived(seed, stream::FINETUNE_TRAJECTORY + iteration as u64);
        let cond = family.draw(&mut rng, batch);
        let [c, h, w] = family.sample_shape;
        let x = rng.normals(batch * c * h * w);
        Self {
            iteration,
            position: 0,
            cond,
            null: family.null(batch),
            x: Tensor::from_data(TensorData::new(x, [batch, c, h, w]), device),
            rng,
        }
    }

    /// The teacher's conditional and unconditional noise at the current step, then moves x on
    /// with the guided prediction of `driver` (the teacher itself, or the student being trained).
    fn teacher_step(
        &mut self,
        teacher: &Denoiser,
        driver: Option<&Denoiser>,
        sampler: &Sampler,
    ) -> (Tensor<4>, Tensor<4>) {
        let (cond, uncond) = self.eps(teacher, sampler);
        let guided = match driver {
            None => guide(cond.clone(), uncond.clone(), sampler.guidance_scale),
            Some(student) => {
                let (c, u) = self.eps(student, sampler);
                guide(c, u, sampler.guidance_scale)
            }
        };
        self.advance(guided, sampler);
        (cond, uncond)
    }

    /// `model`'s conditional and unconditional noise at the current step.
    fn eps(&self, model: &Denoiser, sampler: &Sampler) -> (Tensor<4>, Tensor<4>) {
        let t = sampler.steps[self.position].t;
        cond_uncond_eps(model, self.x.clone(), t, &self.cond, &self.null)
    }

    /// Moves x one sampler step on with the guided noise `guided`.
    fn advance(&mut self, guided: Tensor<4>, sampler: &Sampler) {
        let step = sampler.steps[self.position];
        self.x = sampler.advance(&step, self.x.clone(), guided, &mut self.rng);
        self.position += 1;
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StageEval {
    /// FID and accuracy in the classifier's feature space (class-conditional families).
    #[serde(flatten)]
    pub eval: Option<ModelEval>,
    /// PSNR (dB) of this model's samples against the teacher's from identical noise.
    pub psnr_vs_teacher: Option<f64>,
    /// Mean SSIM of this model's samples against the teacher's from identical noise.
    pub ssim_vs_teacher: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileSizes {
    pub fp32_bytes: u64,
    pub fp16_bytes: u64,
    pub packed_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub job: String,
    pub steps: usize,
    pub resumed_from: Option<String>,
    pub samples: usize,
    pub sampler: String,
    pub fid_real_heldout: Option<f64>,
    pub teacher: StageEval,
    pub ptq: StageEval,
    /// `None` with `finetune.enabled = false`.
    pub finetuned: Option<StageEval>,
    pub final_loss: f64,
    /// Each student's guided-noise MSE against the teacher on the teacher's trajectory, mean
    /// over the sampler's steps (per step: `error_by_timestep.json`).
    pub eps_mse_vs_teacher: BTreeMap<String, f64>,
    /// For each adapter, how many of the sampler's steps the final router sends to it.
    pub router_usage: Vec<usize>,
    pub weight_formats: BTreeMap<String, usize>,
    pub act_formats: BTreeMap<String, usize>,
    pub sizes: FileSizes,
    pub seconds: f64,
}

/// What the trainer produced, for callers that continue with it (tests, the ablation).
pub struct TrainOutput {
    pub summary: TrainSummary,
    pub student: Denoiser,
}

/// The fine-tuned student (on the inference backend) and its plan, with everything [`fit`]
/// wrote into the run directory.
pub struct Fitted {
    pub student: Denoiser,
    pub teacher: Denoiser,
    pub plan: StudentPlan,
    pub resumed_from: Option<PathBuf>,
    pub final_loss: f64,
    pub packed: PathBuf,
}

/// Runs the whole job; returns the summary (also written to `<out_dir>/summary.json`).
pub fn train(cfg: &Config, resume: Resume) -> Result<TrainOutput> {
    let started = std::time::Instant::now();
    let device = crate::device::make_device(&cfg.run.device)?;
    let Fitted { student, teacher, plan, resumed_from, final_loss, packed } = fit(cfg, resume)?;
    let out_dir = cfg.run.out_dir.clone();
    let schedule = NoiseSchedule::new(&cfg.diffusion);
    let ptq = load_student(cfg, &plan, &out_dir.join(PTQ_FILE), &device)?;

    let finetuned = cfg.finetune.enabled;
    tracing::info!(
        "evaluating teacher, PTQ student{} on {} samples",
        if finetuned { " and fine-tuned student" } else { "" },
        cfg.eval.samples
    );
    let family = super::sample::load_family(cfg, &device)?;
    // FID and accuracy where the family has the classifier's feature space (the MNIST models);
    // PSNR and SSIM against the teacher's samples from identical noise for every family.
    let scorer = if family.is_mnist() { Some(Scorer::new(cfg, &device)?) } else { None };
    let run = |m: &Denoiser| match &scorer {
        Some(s) => {
            let (e, images) = s.generate_and_score(cfg, &family, m);
            (Some(e), images)
        }
        None => (None, super::sample::generate(m, &family, cfg, cfg.eval.samples, cfg.eval.seed, &device).0),
    };
    // The students deployed (weights quantized once): the same outputs without re-quantizing
    // every weight on every call.
    let ptq = super::export::deploy(&ptq);
    let deployed = finetuned.then(|| super::export::deploy(&student));
    let (teacher_eval, teacher_images) = run(&teacher);
    let (ptq_eval, ptq_images) = run(&ptq);
    let ft = deployed.as_ref().map(run);
    let shape = family.image_shape();
    let mut rows = vec![&teacher_images, &ptq_images];
    rows.extend(ft.as_ref().map(|(_, images)| images));
    write_comparison(&out_dir.join("samples.png"), shape, &rows)?;
    let versus = |images: &[f32]| StageEval {
        eval: None,
        psnr_vs_teacher: Some(psnr(images, &teacher_images)),
        ssim_vs_teacher: Some(ssim(images, &teacher_images, shape)),
    };
    let all = MetricsLog::read_all(&out_dir);
    if finetuned {
        crate::report::plot::loss_curve(&out_dir.join("loss.png"), &all)?;
    }
    let eval_sampler = Sampler::new(&schedule, &cfg.sampler);
    // Where along the sampler each student errs: the first evaluation batch's trajectories.
    let mut students = vec![("ptq", &ptq)];
    students.extend(deployed.as_ref().map(|s| ("finetuned", s)));
    let errors = timestep_error::measure(
        &teacher,
        &students,
        &family,
        &eval_sampler,
        cfg.eval.batch_size.min(cfg.eval.samples),
        cfg.eval.seed,
        &device,
    );
    timestep_error::write(&errors, &out_dir)?;
    let router_usage = match student.router() {
        Some(r) => {
            router_plot(&out_dir.join("router.png"), r, &eval_sampler, &device)?;
            usage(r, &eval_sampler, &device)
        }
        None => vec![eval_sampler.steps.len()],
    };
    let count = |f: fn(&crate::quant::plan::SiteReport) -> &Option<String>| {
        let mut m = BTreeMap::new();
        for s in &plan.sites {
            *m.entry(f(s).clone().unwrap_or_else(|| "none".into())).or_insert(0) += 1;
        }
        m
    };
    let summary = TrainSummary {
        job: job_name(cfg),
        steps: if finetuned { cfg.train.steps } else { 0 },
        resumed_from: resumed_from.map(|d| d.display().to_string()),
        samples: cfg.eval.samples,
        sampler: sampler_label(cfg),
        fid_real_heldout: scorer.as_ref().map(|s| s.fid_real_heldout),
        teacher: StageEval { eval: teacher_eval, psnr_vs_teacher: None, ssim_vs_teacher: None },
        ptq: StageEval { eval: ptq_eval, ..versus(&ptq_images) },
        finetuned: ft.map(|(eval, images)| StageEval { eval, ..versus(&images) }),
        final_loss,
        eps_mse_vs_teacher: errors.students.iter().map(|s| (s.name.clone(), s.mean)).collect(),
        router_usage,
        weight_formats: count(|s| &s.weight_format),
        act_formats: count(|s| &s.act_format),
        sizes: file_sizes(&teacher, &packed)?,
        seconds: started.elapsed().as_secs_f64(),
    };
    crate::base::fs::atomic_write(
        &out_dir.join("summary.json"),
        &serde_json::to_vec_pretty(&summary).expect("json"),
    )?;
    Ok(TrainOutput { summary, student })
}

/// Calibrates (or resumes) and fine-tunes the student, saves `student.safetensors` and exports
/// the packed model; no evaluation.
pub fn fit(cfg: &Config, resume: Resume) -> Result<Fitted> {
    let out_dir = cfg.run.out_dir.clone();
    std::fs::create_dir_all(&out_dir).map_err(|e| crate::error::io_err(&out_dir, e))?;
    let device = crate::device::make_device(&cfg.run.device)?;
    let ad = device.clone().autodiff();
    let schedule = NoiseSchedule::new(&cfg.diffusion);
    let sampler = trajectory_sampler(cfg, &schedule);
    let job = job_name(cfg);
    let fingerprint = fingerprint(cfg);
    let teacher = crate::models::registry::load_denoiser(&cfg.model, None, &device)?;
    let family = super::sample::load_family(cfg, &device)?;

    let resume_dir = resume.dir(&out_dir)?;
    let mut optim = AdamW::new(cfg.train.weight_decay, cfg.train.grad_clip);
    let mut start = 0;
    let mut saved_trajectory = None;
    let (mut model, plan) = match &resume_dir {
        Some(dir) => {
            let ckpt = checkpoint::load(dir)?;
            checkpoint::check_compatible(&ckpt, &job, &fingerprint, &Config::default().flattened())?;
            saved_trajectory = saved_trajectory_of(&ckpt, dir)?;
            let plan = StudentPlan::load(&out_dir.join(PLAN_FILE))?;
            // On the teacher's own weights (one copy in memory), as calibrate_student builds it.
            let mut model = teacher.clone().train();
            student::build(&mut model, &plan, cfg.run.seed)?;
            let groups = ParamGroups::of(&mut model);
            let model = params::set_trainable(model, |p| groups.group(p).is_some());
            let model = params::load_subset(model, &ckpt.trainable, &dir.join(checkpoint::TRAINABLE))?;
            optim.load_state(&ckpt.optimizer, ckpt.optimizer_step, &device);
            start = ckpt.state.step;
            tracing::info!("resumed from {} at step {start}", dir.display());
            (model, plan)
        }
        None => {
            let (model, plan) = calibrate_student(teacher.clone(), cfg, &family, &sampler, &ad)?;
            plan.save(&out_dir.join(PLAN_FILE))?;
            let ptq = params::collect_trainable(&model);
            params::save_safetensors(&out_dir.join(PTQ_FILE), &ptq, &BTreeMap::new())?;
            (model, plan)
        }
    };

    let groups = ParamGroups::of(&mut model);
    let steps_per_trajectory = sampler.steps.len();
    let weights = cfg.loss.step_weights(&sampler.gammas());
    let metrics = MetricsLog::open(&out_dir, start)?;
    // Post-training only: the calibrated student is the result.
    let steps = if cfg.finetune.enabled { cfg.train.steps } else { 0 };
    let progress = Progress::new(&job, start, steps);
    let mut trajectory: Option<Trajectory> = None;
    let mut last_loss = f64::NAN;
    for step in start..steps {
        let (iteration, position) = (step / steps_per_trajectory, step % steps_per_trajectory);
        let mut traj = match trajectory.take() {
            Some(t) if t.iteration == iteration => t,
            _ => {
                // A new trajectory, or the one a resumed run was in the middle of: restored
                // from the checkpoint, or (a checkpoint written before trajectories were saved)
                // replayed by the teacher up to the current position.
                let mut t =
                    Trajectory::start(&family, cfg.run.seed, iteration, cfg.train.batch_size, &device);
                match saved_trajectory.take() {
                    Some((x, rng)) if position > 0 => {
                        t.x = Tensor::from_data(x, &device);
                        t.rng = rng;
                        t.position = position;
                    }
                    _ if position > 0 && cfg.finetune.rollout == Rollout::Student => {
                        return Err(Error::usage(format!(
                            "this run resumes at step {step}, inside a trajectory, from a checkpoint without \
                             its trajectory state, and finetune.rollout = \"student\" cannot replay one: \
                             resume from a checkpoint at a multiple of finetune.trajectory_steps \
                             ({steps_per_trajectory})"
                        )));
                    }
                    _ => {}
                }
                while t.position < position {
                    t.teacher_step(&teacher, None, &sampler);
                }
                t
            }
        };
        let sampler_step = sampler.steps[position];
        let x_t = traj.x.clone();
        let c_in = Cond::cat(vec![traj.cond.clone(), traj.null.clone()]).from_inner();
        let (cond, uncond) = traj.eps(&teacher, &sampler);
        let teacher_guided = guide(cond.clone(), uncond.clone(), sampler.guidance_scale);

        let target = Tensor::<4>::from_inner(Tensor::cat(vec![cond, uncond], 0));
        let x_in = Tensor::<4>::from_inner(Tensor::cat(vec![x_t.clone(), x_t], 0));
        let batch = Batch { x: x_in, t: sampler_step.t, cond: c_in, target };
        let target = match cfg.finetune.target {
            DistillTarget::CondUncond => Target::CondUncond,
            DistillTarget::Guided => Target::Guided(sampler.guidance_scale),
            DistillTarget::Step => Target::Step(&sampler, sampler_step),
        };
        let (losses, grads, pred) =
            distill_grads_unread(&model, &batch, weights[position], target, cfg.finetune.micro_batch, &ad);
        // The trajectory moves on before the update: with the teacher's guided noise, or with the
        // student's (the distillation forward's own prediction on the same inputs where it ran in
        // one pass: the bits of a separate forward, without its cost).
        let guided = match (cfg.finetune.rollout, pred) {
            (Rollout::Teacher, _) => teacher_guided,
            (Rollout::Student, Some(eps)) => {
                let b = eps.dims()[0] / 2;
                guide(eps.clone().narrow(0, 0, b), eps.narrow(0, b, b), sampler.guidance_scale)
            }
            (Rollout::Student, None) => {
                let (c, u) = traj.eps(&model.valid(), &sampler);
                guide(c, u, sampler.guidance_scale)
            }
        };
        traj.advance(guided, &sampler);
        trajectory = Some(traj);
        let factor = learning_rate(&cfg.train, step) / cfg.train.lr;
        let ft = &cfg.finetune;
        let lr_of = |path: &str| {
            factor
                * match groups.group(path) {
                    Some(Group::Adapter) => cfg.train.lr,
                    Some(Group::Router) => ft.router_lr,
                    Some(Group::WeightScale) => ft.weight_scale_lr,
                    Some(Group::ActScale) => ft.act_scale_lr,
                    None => 0.0,
                }
        };
        let (updated, squared_norm) =
            optim.step_deferred(model, grads, lr_of, |p| groups.is_quantizer_scale(p));
        // The step's one read from the device: its passes' losses and the gradient norm.
        let (loss_value, grad_norm) = read_step(losses, squared_norm);
        if !loss_value.is_finite() {
            return Err(Error::runtime(format!(
                "loss became {loss_value} at step {} (t = {}); lower train.lr (now {}) or the finetune.*_lr rates",
                step + 1,
                sampler_step.t,
                cfg.train.lr
            )));
        }
        model = updated;
        last_loss = loss_value;
        let done = step + 1;
        let log = done % cfg.train.log_every == 0 || done == steps;
        if log {
            metrics.append(&StepMetrics {
                step: done,
                loss: loss_value,
                lr: factor * cfg.train.lr,
                grad_norm,
                it_per_s: progress.rate(done),
            })?;
            if let Some(r) = model.router() {
                tracing::info!(
                    "step {done}: router usage over the trajectory {:?}",
                    usage(r, &sampler, &device)
                );
            }
        }
        progress.update(done, &format!("loss {loss_value:.5}"), log);
        if done % cfg.train.checkpoint_every == 0 || done == steps {
            // Inside a trajectory: its state, so that a resumed run continues it exactly.
            let traj = trajectory.as_ref().expect("the step's trajectory");
            let inside = position + 1 < steps_per_trajectory;
            let ckpt = Checkpoint {
                dir: PathBuf::new(),
                state: TrainState {
                    step: done,
                    rng: SeededRng::derived(cfg.run.seed, stream::FINETUNE_TRAJECTORY).state(),
                    cursor: DataCursor { epoch: iteration as u64, position: position + 1 },
                    job: job.clone(),
                    fingerprint: fingerprint.clone(),
                    trajectory_rng: inside.then(|| traj.rng.state()),
                },
                trainable: params::collect_trainable(&model),
                optimizer: optim.state_tensors(),
                optimizer_step: optim.step,
                ema: None,
                trajectory: inside
                    .then(|| BTreeMap::from([("x".to_string(), HostTensor::from_tensor(&traj.x))])),
            };
            checkpoint::save(&out_dir, &ckpt, cfg.train.keep_checkpoints)?;
        }
    }
    progress.finish();
    let final_tensors = params::collect_trainable(&model);
    params::save_safetensors(&out_dir.join(STUDENT_FILE), &final_tensors, &BTreeMap::new())?;

    let student = model.valid();
    let packed = out_dir.join(PACKED_FILE);
    super::export::export(&student, &plan, cfg, &packed)?;
    Ok(Fitted { student, teacher, plan, resumed_from: resume_dir, final_loss: last_loss, packed })
}

/// The trajectory state a checkpoint saved inside a trajectory (`x` and its random stream).
fn saved_trajectory_of(ckpt: &Checkpoint, dir: &Path) -> Result<Option<(TensorData, SeededRng)>> {
    let (Some(tensors), Some(rng)) = (&ckpt.trajectory, &ckpt.state.trajectory_rng) else {
        return Ok(None);
    };
    let corrupt = |what: &str| {
        Error::runtime(format!(
            "{}: {what}; the checkpoint is corrupt (resume from another one)",
            dir.join(checkpoint::TRAJECTORY).display()
        ))
    };
    let x = tensors.get("x").ok_or_else(|| corrupt("no tensor `x`"))?;
    if x.shape.len() != 4 || x.data.len() != x.shape.iter().product::<usize>() {
        return Err(corrupt(&format!("`x` has shape {:?}, not a batch of samples", x.shape)));
    }
    let rng = SeededRng::from_state(rng).ok_or_else(|| corrupt("an unreadable random stream"))?;
    Ok(Some((x.to_data(), rng)))
}

/// The calibrated (PTQ) student with fresh adapters, ready to train, built on `base`'s weights
/// (the teacher: autodiff is enabled on the same tensors, so the frozen base weights are one
/// copy in memory, 3.4 GB saved for SD1.4).
pub fn calibrate_student(
    base: Denoiser,
    cfg: &Config,
    family: &Family,
    sampler: &Sampler,
    ad: &Device,
) -> Result<(Denoiser, StudentPlan)> {
    let mut model = params::set_trainable(base.train(), |_| false);
    let n = cfg.finetune.calib_samples;
    let conditions: Vec<usize> = (0..n).map(|i| i % family.cycle_len()).collect();
    tracing::info!("calibrating on {n} teacher trajectories of {} steps", sampler.steps.len());
    let sites = super::calibrate::calibrate(
        &mut model,
        &cfg.quant,
        &cfg.calib,
        &cfg.mixup,
        cfg.diffusion.timesteps,
        cfg.run.seed,
        |m| {
            let mut rng = SeededRng::derived(cfg.run.seed, stream::FINETUNE_CALIB);
            for chunk in conditions.chunks(cfg.train.batch_size) {
                let (cond, null) = (family.cond(chunk).from_inner(), family.null(chunk.len()).from_inner());
                sample(m, sampler, &cond, &null, family.sample_shape, &mut rng, ad);
            }
            Ok(())
        },
    )?;
    let plan = StudentPlan {
        sites,
        act_timestep_slots: cfg.quant.act_timestep_slots,
        timesteps: cfg.diffusion.timesteps,
        lora: cfg.lora.clone(),
    };
    student::attach_adapters(&mut model, &plan.lora, plan.timesteps, cfg.run.seed);
    let groups = ParamGroups::of(&mut model);
    Ok((params::set_trainable(model, |p| groups.group(p).is_some()), plan))
}

/// One distillation batch: the student's inputs (conditional then unconditional halves) and
/// the teacher's noise predictions as targets.
struct Batch {
    x: Tensor<4>,
    t: usize,
    cond: Cond,
    target: Tensor<4>,
}

/// What a distillation step compares (`finetune.target`).
#[derive(Clone, Copy)]
enum Target<'a> {
    CondUncond,
    /// The guided noise at this guidance scale.
    Guided(f64),
    /// The sampler's `x_{t-1}` from the guided noise, at this step.
    Step(&'a Sampler, crate::diffusion::sampler::SamplerStep),
}

/// The summed loss of a step's passes and the global gradient norm, in one read.
fn read_step(losses: Vec<Tensor<1>>, squared_norm: Tensor<1>) -> (f64, f64) {
    let mut values = params::host_values(Tensor::cat([losses, vec![squared_norm]].concat(), 0));
    let squared = values.pop().expect("the norm") as f64;
    (values.iter().map(|&v| v as f64).sum(), squared.sqrt())
}

/// The weighted MSE of the student against the teacher on `batch`, and its gradients by
/// parameter path: on both halves, or (guided and step targets) on the guided noise of each
/// conditional / unconditional pair or the sampler update it gives. With `micro_batch` > 0 the
/// batch runs in passes of that many samples (whole pairs for a pair target, at least one) whose
/// gradients are summed (each pass's loss is its share of the whole batch's mean), so only one
/// pass's activations are alive at a time; 0 runs it in one pass.
///
/// Returns each pass's loss (`[1]`, on the device, unread: the step reads them with the gradient
/// norm, [`read_step`]), the gradients, and where the batch ran in one pass the student's
/// prediction on it (detached, on the inner backend).
fn distill_grads_unread(
    model: &Denoiser,
    batch: &Batch,
    weight: f64,
    target: Target,
    micro_batch: usize,
    ad: &Device,
) -> (Vec<Tensor<1>>, BTreeMap<String, Tensor<1>>, Option<Tensor<4>>) {
    // Guided and step targets compare conditional/unconditional pairs.
    let paired = !matches!(target, Target::CondUncond);
    let n = batch.x.dims()[0];
    let pairs = n / 2;
    let elements = batch.target.shape().num_elements() as f64;
    // Rows `start..start + len` of the conditional half and the same of the unconditional half.
    let pair_rows = |t: &Tensor<4>, start: usize, len: usize| {
        Tensor::cat(vec![t.clone().narrow(0, start, len), t.clone().narrow(0, pairs + start, len)], 0)
    };
    // The guided noise of a pass's pairs (conditional half first).
    let guided = |t: Tensor<4>, g: f64| {
        let len = t.dims()[0] / 2;
        guide(t.clone().narrow(0, 0, len), t.narrow(0, len, len), g)
    };
    let run = |start: usize, len: usize| {
        let whole = len == n || (paired && len == pairs);
        let (x, teacher, cond) = match (whole, paired) {
            (true, _) => (batch.x.clone(), batch.target.clone(), batch.cond.clone()),
            (false, false) => (
                batch.x.clone().narrow(0, start, len),
                batch.target.clone().narrow(0, start, len),
                batch.cond.narrow(start, len),
            ),
            (false, true) => (
                pair_rows(&batch.x, start, len),
                pair_rows(&batch.target, start, len),
                Cond::cat(vec![batch.cond.narrow(start, len), batch.cond.narrow(pairs + start, len)]),
            ),
        };
        let rows = x.dims()[0];
        let t = Tensor::<1>::full([rows], batch.t as f32, ad);
        let pred = model.forward(x.clone(), t, cond, &StepCtx::at(batch.t));
        let eps = whole.then(|| pred.clone().inner());
        let (pred, teacher, share) = match target {
            Target::CondUncond => (pred, teacher, elements),
            Target::Guided(g) => (guided(pred, g), guided(teacher, g), elements / 2.0),
            Target::Step(sampler, step) => {
                // x_t is the conditional half's input (both halves see the same x_t).
                let x_t = x.narrow(0, 0, rows / 2);
                let g = sampler.guidance_scale;
                (
                    sampler.step_mean(&step, x_t.clone(), guided(pred, g)),
                    sampler.step_mean(&step, x_t, guided(teacher, g)),
                    elements / 2.0,
                )
            }
        };
        // One pass keeps the mean as it always was (bit for bit); a micro-batch takes its share.
        let loss = if whole {
            (pred - teacher).square().mean() * weight
        } else {
            (pred - teacher).square().sum() * (weight / share)
        };
        let value = loss.clone().inner().reshape([1]);
        (value, params::collect_grads(model, &loss.backward()), eps)
    };
    // Passes over samples, or over conditional/unconditional pairs.
    let (units, chunk) = match paired {
        false => (n, if micro_batch == 0 { n } else { micro_batch.min(n) }),
        true => (pairs, if micro_batch == 0 { pairs } else { (micro_batch / 2).clamp(1, pairs) }),
    };
    let mut total = (Vec::new(), BTreeMap::new(), None);
    for start in (0..units).step_by(chunk) {
        let (value, grads, eps) = run(start, chunk.min(units - start));
        total.0.push(value);
        total.2 = eps;
        for (path, g) in grads {
            let sum = match total.1.remove(&path) {
                Some(acc) => acc + g,
                None => g,
            };
            total.1.insert(path, sum);
        }
    }
    total
}

/// A student of `plan` with the trainable tensors of `path` (e.g. `ptq.safetensors`), for
/// inference on `device`.
pub fn load_student(cfg: &Config, plan: &StudentPlan, path: &Path, device: &Device) -> Result<Denoiser> {
    let mut model = crate::models::registry::load_denoiser(&cfg.model, None, device)?;
    student::build(&mut model, plan, cfg.run.seed)?;
    let (tensors, _) = params::load_safetensors(path)?;
    params::load_subset(model, &tensors, path)
}

/// Exports the student of a `train` run: its final `student.safetensors`, or the trainable
/// tensors of `checkpoint`. Returns the file size.
pub fn export_run(cfg: &Config, checkpoint: Option<&Path>, out: &Path, device: &Device) -> Result<u64> {
    let dir = &cfg.run.out_dir;
    let plan = StudentPlan::load(&dir.join(PLAN_FILE))?;
    let source = match checkpoint {
        Some(c) => c.join(checkpoint::TRAINABLE),
        None => dir.join(STUDENT_FILE),
    };
    if !source.exists() {
        return Err(Error::usage(format!(
            "{}: not found; finish the run with `msfp train --config ... --resume auto` or pass --checkpoint DIR",
            source.display()
        )));
    }
    let student = load_student(cfg, &plan, &source, device)?;
    super::export::export(&student, &plan, cfg, out)?;
    std::fs::metadata(out).map(|m| m.len()).map_err(|e| crate::error::io_err(out, e))
}

/// How many of `sampler`'s steps the router sends to each adapter.
pub fn usage(router: &crate::nn::Router, sampler: &Sampler, device: &Device) -> Vec<usize> {
    let mut counts = vec![0; router.adapters];
    for s in &sampler.steps {
        counts[router.choice(s.t, device)] += 1;
    }
    counts
}

/// The adapter the router picks at each timestep of the schedule, as a plot.
fn router_plot(path: &Path, router: &crate::nn::Router, sampler: &Sampler, device: &Device) -> Result<()> {
    let points: Vec<(f64, f64)> =
        sampler.steps.iter().rev().map(|s| (s.t as f64, router.choice(s.t, device) as f64)).collect();
    let img = crate::report::plot::line_plot(&[(points, [200, 60, 40])], false, "timestep", "adapter");
    crate::report::grid::save_png(path, &image::DynamicImage::ImageRgb8(img))
}

/// Teacher | PTQ | fine-tuned grids of the first 50 samples (8 for large images), side by side.
fn write_comparison(path: &Path, shape: [usize; 3], sets: &[&Vec<f32>]) -> Result<()> {
    let [c, h, w] = shape;
    let size = c * h * w;
    let (most, cols) = if h * w <= 64 * 64 { (50, 10) } else { (8, 2) };
    let grids: Vec<_> = sets
        .iter()
        .map(|images| {
            let n = (images.len() / size).min(most);
            super::sample::image_grid(&images[..n * size], shape, cols.min(n.max(1)))
        })
        .collect();
    crate::report::grid::save_png(
        path,
        &image::DynamicImage::ImageRgb8(crate::report::grid::side_by_side(&grids)),
    )
}

/// Sizes of the teacher as fp32 and fp16 safetensors (computed from its parameter count and the
/// file header) against the packed file.
fn file_sizes(teacher: &Denoiser, packed: &Path) -> Result<FileSizes> {
    let params = teacher.num_params() as u64;
    let packed_bytes = std::fs::metadata(packed).map_err(|e| crate::error::io_err(packed, e))?.len();
    Ok(FileSizes { fp32_bytes: params * 4, fp16_bytes: params * 2, packed_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Int;

    /// The summed loss of [`distill_grads_unread`]'s passes as the step reads it, and its gradients.
    fn read_loss(
        (losses, grads, _): (Vec<Tensor<1>>, BTreeMap<String, Tensor<1>>, Option<Tensor<4>>),
    ) -> (f64, BTreeMap<String, Tensor<1>>) {
        let no_norm = Tensor::zeros([1], &losses[0].device());
        (read_step(losses, no_norm).0, grads)
    }

    /// A trajectory moves on with the teacher's guided noise, or with the driver's (the student's
    /// rollout) when one is given; the returned targets are the teacher's either way, and both
    /// use the same noise draw.
    #[test]
    fn a_trajectory_advances_with_its_drivers_guided_noise() {
        let device = Device::flex();
        let cfg = Config::default();
        let teacher = Denoiser::new(
            &crate::pipeline::config::ModelConfig::test_unet(),
            &mut SeededRng::new(1),
            &device,
        );
        let student = Denoiser::new(
            &crate::pipeline::config::ModelConfig::test_unet(),
            &mut SeededRng::new(2),
            &device,
        );
        let schedule = NoiseSchedule::new(&cfg.diffusion);
        let sampler = trajectory_sampler(&cfg, &schedule);
        let family = Family::tiny(&device);
        let run = |driver: Option<&Denoiser>| {
            let mut t = Trajectory::start(&family, 5, 0, 2, &device);
            let x0 = t.x.clone();
            let targets = t.teacher_step(&teacher, driver, &sampler);
            (x0, t.x.clone(), targets)
        };
        let (x0, by_teacher, (c_t, u_t)) = run(None);
        let (_, by_student, (c_s, u_s)) = run(Some(&student));
        assert_eq!(c_t.into_data(), c_s.into_data(), "the targets are the teacher's");
        assert_eq!(u_t.into_data(), u_s.into_data());
        let t = Trajectory::start(&family, 5, 0, 2, &device);
        let (c, u) = cond_uncond_eps(&student, x0, sampler.steps[0].t, &t.cond, &t.null);
        let mut rng = t.rng.clone();
        let expected =
            sampler.advance(&sampler.steps[0], t.x.clone(), guide(c, u, sampler.guidance_scale), &mut rng);
        assert_eq!(by_student.clone().into_data(), expected.into_data(), "moved by the student's noise");
        assert_ne!(by_student.into_data(), by_teacher.into_data());
    }

    /// The guided loss is the MSE of `u + g (c - u)` against the teacher's, and passes of one
    /// conditional/unconditional pair each sum to the same gradients as the whole batch.
    #[test]
    fn guided_target_matches_its_definition_in_one_pass_and_in_pairs() {
        let device = Device::flex();
        let ad = device.clone().autodiff();
        let model =
            Denoiser::new(&crate::pipeline::config::ModelConfig::test_unet(), &mut SeededRng::new(1), &ad);
        let mut rng = SeededRng::new(3);
        let mut normal =
            |n: usize| Tensor::<4>::from_data(TensorData::new(rng.normals(n * 32 * 32), [n, 1, 32, 32]), &ad);
        let labels = Tensor::<1, Int>::from_ints([3, 7, 10, 10], &ad);
        let batch = Batch { x: normal(4), t: 420, cond: Cond::Labels(labels), target: normal(4) };
        let (g, w) = (2.0, 0.7);
        let (whole, grads) = read_loss(distill_grads_unread(&model, &batch, w, Target::Guided(g), 0, &ad));
        let (paired, paired_grads) =
            read_loss(distill_grads_unread(&model, &batch, w, Target::Guided(g), 2, &ad));

        let pred = model.forward(
            batch.x.clone(),
            Tensor::<1>::full([4], 420.0, &ad),
            batch.cond.clone(),
            &StepCtx::at(420),
        );
        let guide =
            |t: Tensor<4>| t.clone().narrow(0, 2, 2) + (t.clone().narrow(0, 0, 2) - t.narrow(0, 2, 2)) * g;
        let expect =
            (guide(pred) - guide(batch.target.clone())).square().mean().into_scalar::<f32>() as f64 * w;
        assert!((whole - expect).abs() <= 1e-6 * expect, "{whole} vs {expect}");
        assert!((paired - whole).abs() <= 1e-5 * whole, "{paired} vs {whole}");
        let (plain, _) = read_loss(distill_grads_unread(&model, &batch, w, Target::CondUncond, 0, &ad));
        assert!((plain - whole).abs() > 1e-3 * whole, "the guided loss is another loss");
        assert_eq!(grads.keys().collect::<Vec<_>>(), paired_grads.keys().collect::<Vec<_>>());
        let (mut size, mut off) = (0.0f32, 0.0f32);
        for (k, a) in &grads {
            let (a, b) = (params::host_values(a.clone()), params::host_values(paired_grads[k].clone()));
            for (x, y) in a.iter().zip(&b) {
                size = size.max(x.abs());
                off = off.max((x - y).abs());
            }
        }
        assert!(size > 0.0 && off <= 1e-4 * size, "pairs stray {off} (gradients up to {size})");

        // The step target: the sampler's x_{t-1} (x0 clipped) from the guided noises.
        let sc = crate::pipeline::config::SamplerConfig {
            steps: 10,
            guidance_scale: g,
            clip_x0: true,
            ..Default::default()
        };
        let sampler =
            Sampler::new(&NoiseSchedule::new(&crate::pipeline::config::DiffusionConfig::default()), &sc);
        let step = *sampler.steps.iter().find(|s| s.t <= 420).unwrap();
        let batch = Batch { t: step.t, ..batch };
        let (value, _) =
            read_loss(distill_grads_unread(&model, &batch, w, Target::Step(&sampler, step), 0, &ad));
        let (paired, _) =
            read_loss(distill_grads_unread(&model, &batch, w, Target::Step(&sampler, step), 2, &ad));
        let pred = model.forward(
            batch.x.clone(),
            Tensor::<1>::full([4], step.t as f32, &ad),
            batch.cond.clone(),
            &StepCtx::at(step.t),
        );
        let x_t = batch.x.clone().narrow(0, 0, 2);
        let x_prev = |eps: Tensor<4>| sampler.step_mean(&step, x_t.clone(), guide(eps));
        let expect =
            (x_prev(pred) - x_prev(batch.target.clone())).square().mean().into_scalar::<f32>() as f64 * w;
        assert!((value - expect).abs() <= 1e-6 * expect && expect > 0.0, "{value} vs {expect}");
        assert!((paired - value).abs() <= 1e-5 * value, "{paired} vs {value}");
    }
}
