//! DFA, denoising-factor loss alignment (MSFP): the distillation loss at a sampler step is
//! weighted by how much that step's update uses the predicted noise. Every sampler step is
//! `x_prev = coef_x * x_t + gamma_t * eps_hat + sigma_t * z`, so an error `e` in `eps_hat` moves
//! `x_prev` by `gamma_t * e`; the loss at step t is `w_t * ||eps_teacher - eps_student||^2` with
//! `w_t = |gamma_t|^p`, normalised to mean 1 over the steps of the sampler actually used (so
//! learning rates stay comparable with the plain MSE).

/// `|gamma_i|^p / mean_j |gamma_j|^p` for the steps of one trajectory.
pub fn dfa_weights(gammas: &[f64], power: f64) -> Vec<f64> {
    let raw: Vec<f64> = gammas.iter().map(|g| g.abs().powf(power)).collect();
    let mean = raw.iter().sum::<f64>() / raw.len().max(1) as f64;
    if mean > 0.0 { raw.iter().map(|w| w / mean).collect() } else { vec![1.0; raw.len()] }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::sampler::{SamplerConfig, SamplerKind};
    use crate::diffusion::schedule::DiffusionConfig;
    use crate::diffusion::{NoiseSchedule, Sampler};

    #[test]
    fn weights_follow_gamma_and_average_one() {
        let w = dfa_weights(&[-0.5, -1.0, -2.0], 1.0);
        let expect = [0.5 / (3.5 / 3.0), 1.0 / (3.5 / 3.0), 2.0 / (3.5 / 3.0)];
        for (a, b) in w.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12);
        }
        let w2 = dfa_weights(&[-0.5, -1.0, -2.0], 2.0);
        assert!((w2[2] / w2[0] - 16.0).abs() < 1e-9, "p = 2 squares the ratio");
        assert_eq!(dfa_weights(&[0.3, -0.3], 0.0), [1.0, 1.0]);
    }

    #[test]
    fn ddim_weights_come_from_the_samplers_gammas() {
        let schedule = NoiseSchedule::new(&DiffusionConfig::default());
        let cfg = SamplerConfig {
            kind: SamplerKind::Ddim,
            steps: 10,
            eta: 0.0,
            guidance_scale: 1.0,
            clip_x0: false,
            ..Default::default()
        };
        let sampler = Sampler::new(&schedule, &cfg);
        let w = dfa_weights(&sampler.gammas(), 1.0);
        let mean = w.iter().sum::<f64>() / w.len() as f64;
        assert!((mean - 1.0).abs() < 1e-12);
        // DDIM removes more noise per step early (large t) than at the end: weights differ.
        let (lo, hi) = w.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        assert!(hi / lo > 1.5, "{w:?}");
        // Proportional to |gamma|.
        let g = sampler.gammas();
        assert!((w[0] / w[5] - g[0].abs() / g[5].abs()).abs() < 1e-9);
    }
}
