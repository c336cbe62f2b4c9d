//! Discrete-time noise schedules (DDPM): beta_t, alpha-bar_t, and the forward process q(x_t|x_0).

use burn::tensor::{Tensor, TensorData};

use crate::config::{BetaSchedule, DiffusionConfig};

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
