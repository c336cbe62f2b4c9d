//! DDIM and DDPM samplers over a strided subsequence of the training timesteps, with
//! classifier-free guidance. Every step is linear in the predicted noise:
//!
//! ```text
//! x_prev = coef_x * x_t + gamma * eps_hat + sigma * z
//! ```
//!
//! `gamma` is the "denoising factor" MSFP's DFA loss weights by, so each step exposes it.

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::NoiseSchedule;
use crate::base::step::StepCtx;
use crate::error::{Error, Result, in_range, positive};
use crate::models::{Cond, Denoiser};
use crate::rng::SeededRng;

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

impl SamplerConfig {
    /// `[sampler]`'s ranges; `timesteps` is `diffusion.timesteps`.
    pub fn validate(&self, timesteps: usize) -> Result<()> {
        positive("sampler.steps", self.steps)?;
        if self.steps > timesteps {
            return Err(Error::usage(format!(
                "sampler.steps = {} is out of range: it must be at most diffusion.timesteps = {}",
                self.steps, timesteps
            )));
        }
        in_range("sampler.eta", self.eta, 0.0, 1.0)?;
        if self.steps_offset >= timesteps / self.steps {
            usage!(
                "sampler.steps_offset = {} is out of range: it must be below the step stride diffusion.timesteps / sampler.steps = {}",
                self.steps_offset,
                timesteps / self.steps
            );
        }
        in_range("sampler.guidance_scale", self.guidance_scale, 0.0, 100.0)?;
        Ok(())
    }
}

/// One denoising step from timestep `t` to `t_prev` (`None` = the clean image).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerStep {
    pub t: usize,
    pub t_prev: Option<usize>,
    pub coef_x: f64,
    /// Coefficient of the predicted noise.
    pub gamma: f64,
    /// Standard deviation of the fresh noise added.
    pub sigma: f64,
    /// alpha-bar at `t`.
    pub alpha_bar: f64,
}

#[derive(Debug, Clone)]
pub struct Sampler {
    pub steps: Vec<SamplerStep>,
    pub guidance_scale: f64,
    pub clip_x0: bool,
}

impl Sampler {
    /// DDIM with the configured eta, or DDPM (ancestral sampling with the posterior variance,
    /// which on a strided schedule is exactly DDIM with eta = 1).
    pub fn new(schedule: &NoiseSchedule, cfg: &SamplerConfig) -> Self {
        let eta = match cfg.kind {
            SamplerKind::Ddim => cfg.eta,
            SamplerKind::Ddpm => 1.0,
        };
        let n = schedule.timesteps();
        let k = cfg.steps.min(n);
        // "leading" spacing as in diffusers: t_i = i * (n / k) + offset, from the largest down.
        let ratio = n / k;
        let ts: Vec<usize> = (0..k).map(|i| (i * ratio + cfg.steps_offset).min(n - 1)).rev().collect();
        let steps = ts
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let t_prev = ts.get(i + 1).copied();
                let a_t = schedule.alpha_bar(Some(t));
                let a_prev = match t_prev {
                    None if !cfg.set_alpha_to_one => schedule.alpha_bar(Some(0)),
                    _ => schedule.alpha_bar(t_prev),
                };
                let sigma =
                    eta * ((1.0 - a_prev) / (1.0 - a_t)).sqrt() * (1.0 - a_t / a_prev).max(0.0).sqrt();
                let coef_x = (a_prev / a_t).sqrt();
                let gamma =
                    (1.0 - a_prev - sigma * sigma).max(0.0).sqrt() - (a_prev * (1.0 - a_t) / a_t).sqrt();
                SamplerStep { t, t_prev, coef_x, gamma, sigma, alpha_bar: a_t }
            })
            .collect();
        Self { steps, guidance_scale: cfg.guidance_scale, clip_x0: cfg.clip_x0 }
    }

    /// The denoising factors gamma_t of every step, in sampling order.
    /// One step `x_t -> x_prev` given the (guided) noise prediction; draws the step's noise
    /// from `rng` when the step is stochastic.
    pub fn advance(
        &self,
        step: &SamplerStep,
        x: Tensor<4>,
        eps: Tensor<4>,
        rng: &mut SeededRng,
    ) -> Tensor<4> {
        let x = self.step_mean(step, x, eps);
        if step.sigma > 0.0 {
            let shape = x.dims();
            let z = Tensor::<4>::from_data(
                TensorData::new(rng.normals(shape.iter().product()), shape),
                &x.device(),
            );
            x + z * step.sigma
        } else {
            x
        }
    }

    /// The deterministic part of [`Self::advance`], `coef_x x + gamma eps` (eps re-derived from
    /// the clipped x0 prediction with `clip_x0`): what an error in `eps` changes in `x_prev`.
    pub fn step_mean(&self, step: &SamplerStep, x: Tensor<4>, eps: Tensor<4>) -> Tensor<4> {
        let eps = if self.clip_x0 {
            let (sa, sb) = (step.alpha_bar.sqrt(), (1.0 - step.alpha_bar).sqrt());
            let x0 = ((x.clone() - eps * sb) / sa).clamp(-1.0, 1.0);
            (x.clone() - x0 * sa) / sb
        } else {
            eps
        };
        x * step.coef_x + eps * step.gamma
    }

    pub fn gammas(&self) -> Vec<f64> {
        self.steps.iter().map(|s| s.gamma).collect()
    }

    /// Noise prediction with classifier-free guidance: eps_u + g * (eps_c - eps_u).
    pub fn guided_eps(
        &self,
        model: &Denoiser,
        x: Tensor<4>,
        t: usize,
        cond: &Cond,
        null: &Cond,
    ) -> Tensor<4> {
        let device = x.device();
        let [b, _, _, _] = x.dims();
        let tt = Tensor::<1>::full([b], t as f32, &device);
        if (self.guidance_scale - 1.0).abs() < 1e-12 {
            return model.forward(x, tt, cond.clone(), &StepCtx::at(t));
        }
        let (c, u) = cond_uncond_eps(model, x, t, cond, null);
        guide(c, u, self.guidance_scale)
    }
}

/// Classifier-free guidance: `uncond + scale * (cond - uncond)`.
pub fn guide(cond: Tensor<4>, uncond: Tensor<4>, scale: f64) -> Tensor<4> {
    uncond.clone() + (cond - uncond) * scale
}

/// The conditional and unconditional noise predictions at timestep `t`, from one forward pass
/// over the doubled batch (conditions, then null conditions).
pub fn cond_uncond_eps(
    model: &Denoiser,
    x: Tensor<4>,
    t: usize,
    cond: &Cond,
    null: &Cond,
) -> (Tensor<4>, Tensor<4>) {
    let device = x.device();
    let [b, _, _, _] = x.dims();
    let tt = Tensor::<1>::full([2 * b], t as f32, &device);
    let eps = model.forward(
        Tensor::cat(vec![x.clone(), x], 0),
        tt,
        Cond::cat(vec![cond.clone(), null.clone()]),
        &StepCtx::at(t),
    );
    (eps.clone().slice([0..b]), eps.slice([b..2 * b]))
}

/// Runs the sampler from x_T to x_0 for a batch of conditions, on samples of `shape`
/// (`[C, H, W]`); returns x_0 as the sampler left it (the family turns it into images). All
/// noise (x_T and the per-step z) comes from `rng`, so the same rng state gives identical noise
/// to any model.
pub fn sample(
    model: &Denoiser,
    sampler: &Sampler,
    cond: &Cond,
    null: &Cond,
    shape: [usize; 3],
    rng: &mut SeededRng,
    device: &Device,
) -> Tensor<4> {
    let b = cond.batch();
    let [c, h, w] = shape;
    let mut x = Tensor::<4>::from_data(TensorData::new(rng.normals(b * c * h * w), [b, c, h, w]), device);
    for step in &sampler.steps {
        let eps = sampler.guided_eps(model, x.clone(), step.t, cond, null);
        x = sampler.advance(step, x, eps, rng);
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedule::{BetaSchedule, DiffusionConfig};

    fn schedule() -> NoiseSchedule {
        NoiseSchedule::new(&DiffusionConfig::default())
    }

    #[test]
    fn sd_timesteps_follow_diffusers_steps_offset_and_final_alpha() {
        let cfg = DiffusionConfig {
            schedule: BetaSchedule::ScaledLinear,
            beta_start: 0.00085,
            beta_end: 0.012,
            ..Default::default()
        };
        let s = NoiseSchedule::new(&cfg);
        let sampler = Sampler::new(
            &s,
            &SamplerConfig { steps: 50, steps_offset: 1, set_alpha_to_one: false, ..Default::default() },
        );
        let ts: Vec<usize> = sampler.steps.iter().map(|st| st.t).collect();
        // diffusers' DDIMScheduler (steps_offset 1, "leading"): 981, 961, ..., 21, 1.
        assert_eq!(ts, (0..50).rev().map(|i| i * 20 + 1).collect::<Vec<_>>());
        // The last step stops at alpha-bar(0), not 1: x_prev keeps that much noise coefficient.
        let last = sampler.steps.last().unwrap();
        let (a, a0) = (s.alphas_cumprod[1], s.alphas_cumprod[0]);
        assert!((last.coef_x - (a0 / a).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn ddim_gamma_matches_the_closed_form() {
        let s = schedule();
        let sampler = Sampler::new(
            &s,
            &SamplerConfig {
                kind: SamplerKind::Ddim,
                steps: 10,
                eta: 0.0,
                guidance_scale: 1.0,
                clip_x0: false,
                ..Default::default()
            },
        );
        assert_eq!(sampler.steps.len(), 10);
        assert_eq!(sampler.steps[0].t, 900);
        assert_eq!(sampler.steps[9].t_prev, None);
        let st = sampler.steps[3];
        let (a, ap) = (s.alphas_cumprod[st.t], s.alphas_cumprod[st.t_prev.unwrap()]);
        let expect = (1.0 - ap).sqrt() - (ap * (1.0 - a) / a).sqrt();
        assert!((st.gamma - expect).abs() < 1e-12);
        assert!(st.gamma < 0.0, "the predicted noise is removed");
    }

    #[test]
    fn ddpm_step_is_the_posterior_mean_and_variance() {
        let s = schedule();
        let sampler = Sampler::new(
            &s,
            &SamplerConfig {
                kind: SamplerKind::Ddpm,
                steps: 20,
                eta: 0.0,
                guidance_scale: 1.0,
                clip_x0: false,
                ..Default::default()
            },
        );
        for st in &sampler.steps[..19] {
            let (a, ap) = (s.alphas_cumprod[st.t], s.alphas_cumprod[st.t_prev.unwrap()]);
            let beta = 1.0 - a / ap;
            // Posterior q(x_prev | x_t, x0) written in x_t and eps.
            let c_x0 = ap.sqrt() * beta / (1.0 - a);
            let c_xt = (1.0 - beta).sqrt() * (1.0 - ap) / (1.0 - a);
            let coef_x = c_x0 / a.sqrt() + c_xt;
            let gamma = -c_x0 * (1.0 - a).sqrt() / a.sqrt();
            let var = beta * (1.0 - ap) / (1.0 - a);
            assert!((st.coef_x - coef_x).abs() < 1e-9, "t={} {} {}", st.t, st.coef_x, coef_x);
            assert!((st.gamma - gamma).abs() < 1e-9, "t={} {} {}", st.t, st.gamma, gamma);
            assert!((st.sigma * st.sigma - var).abs() < 1e-9);
        }
    }

    #[test]
    fn exact_noise_prediction_recovers_the_image() {
        // With a perfect eps, deterministic DDIM maps x_t back to x0 exactly (up to rounding).
        let s = schedule();
        let sampler = Sampler::new(
            &s,
            &SamplerConfig {
                kind: SamplerKind::Ddim,
                steps: 25,
                eta: 0.0,
                guidance_scale: 1.0,
                clip_x0: false,
                ..Default::default()
            },
        );
        let (x0, eps) = (0.3f64, -1.2f64);
        let t0 = sampler.steps[0].t;
        let mut x = s.alphas_cumprod[t0].sqrt() * x0 + (1.0 - s.alphas_cumprod[t0]).sqrt() * eps;
        for st in &sampler.steps {
            x = st.coef_x * x + st.gamma * eps;
        }
        assert!((x - x0).abs() < 1e-9, "{x}");
    }
}
