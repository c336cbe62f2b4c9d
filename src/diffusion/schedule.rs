//! Discrete-time noise schedules (DDPM): beta_t, alpha-bar_t, and the forward process q(x_t|x_0).

use burn::tensor::{Tensor, TensorData};

use serde::{Deserialize, Serialize};

use std::path::Path;

use crate::error::{Error, Result, in_range, positive};

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

impl DiffusionConfig {
    /// `[diffusion]`'s ranges.
    pub fn validate(&self) -> Result<()> {
        positive("diffusion.timesteps", self.timesteps)?;
        in_range("diffusion.beta_start", self.beta_start, 1e-8, 0.5)?;
        in_range("diffusion.beta_end", self.beta_end, self.beta_start, 0.999)?;
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub betas: Vec<f64>,
    /// alpha-bar_t = prod_{s<=t} (1 - beta_s).
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    pub fn new(cfg: &DiffusionConfig) -> Self {
        let n = cfg.timesteps;
        let lin = |a: f64, b: f64, i: usize| {
            if n == 1 { a } else { a + (b - a) * i as f64 / (n - 1) as f64 }
        };
        let betas: Vec<f64> = (0..n)
            .map(|i| match cfg.schedule {
                BetaSchedule::Linear => lin(cfg.beta_start, cfg.beta_end, i),
                // Stable Diffusion's schedule: linear in sqrt(beta).
                BetaSchedule::ScaledLinear => lin(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), i).powi(2),
            })
            .collect();
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Self { betas, alphas_cumprod }
    }

    pub fn timesteps(&self) -> usize {
        self.betas.len()
    }

    /// alpha-bar at `t`, with alpha-bar(-1) = 1 (the clean image).
    pub fn alpha_bar(&self, t: Option<usize>) -> f64 {
        t.map_or(1.0, |t| self.alphas_cumprod[t])
    }

    /// x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, per sample timestep.
    pub fn add_noise(&self, x0: Tensor<4>, noise: Tensor<4>, t: &[usize]) -> Tensor<4> {
        let device = x0.device();
        let b = t.len();
        let coef = |f: &dyn Fn(f64) -> f64| {
            let v: Vec<f32> = t.iter().map(|&ti| f(self.alphas_cumprod[ti]) as f32).collect();
            Tensor::<1>::from_data(TensorData::new(v, [b]), &device).reshape([b, 1, 1, 1])
        };
        x0 * coef(&|a| a.sqrt()) + noise * coef(&|a| (1.0 - a).sqrt())
    }
}

/// A diffusers directory's `scheduler/scheduler_config.json` is the model's own noise schedule:
/// the job's `[diffusion]` and the sampler's offset must agree with it (an epsilon-predicting
/// model with the betas it was trained with), else one usage error names both.
pub fn check_diffusers_scheduler(
    weights: Option<&Path>,
    d: &DiffusionConfig,
    s: &crate::diffusion::sampler::SamplerConfig,
) -> Result<()> {
    let Some(dir) = weights.filter(|w| w.is_dir()) else {
        return Ok(());
    };
    let path = dir.join("scheduler").join("scheduler_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::usage(format!("{}: not JSON ({e})", path.display())))?;
    let schedule = serde_json::to_value(d.schedule).expect("json");
    let checks: [(&str, &str, Option<serde_json::Value>, serde_json::Value); 6] = [
        ("beta_schedule", "diffusion.schedule", json.get("beta_schedule").cloned(), schedule),
        ("beta_start", "diffusion.beta_start", json.get("beta_start").cloned(), d.beta_start.into()),
        ("beta_end", "diffusion.beta_end", json.get("beta_end").cloned(), d.beta_end.into()),
        (
            "num_train_timesteps",
            "diffusion.timesteps",
            json.get("num_train_timesteps").cloned(),
            d.timesteps.into(),
        ),
        ("steps_offset", "sampler.steps_offset", json.get("steps_offset").cloned(), s.steps_offset.into()),
        (
            "prediction_type",
            "(msfp predicts epsilon)",
            json.get("prediction_type").cloned(),
            "epsilon".into(),
        ),
    ];
    for (key, ours, theirs, value) in checks {
        let agree = match (&theirs, &value) {
            (None, _) => true,
            (Some(a), b) if a.is_number() && b.is_number() => {
                (a.as_f64().unwrap_or(f64::NAN) - b.as_f64().unwrap_or(f64::NAN)).abs() < 1e-12
            }
            (Some(a), b) => a == b,
        };
        if !agree {
            usage!(
                "{}: the model's {key} is {} but {ours} is {value}; set it to the model's value",
                path.display(),
                theirs.unwrap_or_default()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_schedule_matches_ddpm() {
        let s = NoiseSchedule::new(&DiffusionConfig::default());
        assert_eq!(s.timesteps(), 1000);
        assert!((s.betas[0] - 1e-4).abs() < 1e-12);
        assert!((s.betas[999] - 0.02).abs() < 1e-12);
        // Known value of DDPM's linear schedule: alpha-bar_999 ~ 4.04e-5.
        assert!((s.alphas_cumprod[999] - 4.0358e-5).abs() < 1e-6, "{}", s.alphas_cumprod[999]);
    }

    #[test]
    fn scaled_linear_is_linear_in_sqrt_beta() {
        let cfg = DiffusionConfig {
            schedule: BetaSchedule::ScaledLinear,
            beta_start: 0.00085,
            beta_end: 0.012,
            ..Default::default()
        };
        let s = NoiseSchedule::new(&cfg);
        let mid = ((0.00085f64.sqrt() + 0.012f64.sqrt()) / 2.0).powi(2);
        let m = (s.betas[499] + s.betas[500]) / 2.0;
        assert!((m - mid).abs() < 1e-6);
        assert!((s.betas[999] - 0.012).abs() < 1e-12);
    }
}
