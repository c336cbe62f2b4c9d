//! Student-vs-teacher noise error per timestep (TALoRA's motivating figure): where along the
//! sampler a quantized student errs, and whether fine-tuning moved that error down or up.
//!
//! Every model predicts the noise on the *teacher's* trajectory (identical inputs at every step,
//! so the curves differ only by the models' own error, not by drift), from held-out noise and
//! conditions cycling through the family's classes or prompts. The error is the mean squared
//! difference of the guided noise the sampler actually uses; `gamma` is the step's denoising
//! factor (how much of that error reaches `x_{t-1}`, DFA's weight).
//!
//! A lower per-step error need not give closer samples: an error of the same sign at every step
//! (its mean, `bias`) adds up along the trajectory, noise-like error does not. So each student
//! also samples on its own from the same noise, and `drift` is how far its `x` has moved from the
//! teacher's after each step: the last value is the sample error that PSNR scores.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::diffusion::Sampler;
use crate::diffusion::sampler::{cond_uncond_eps, guide};
use crate::error::Result;
use crate::models::{Denoiser, Family};
use crate::rng::SeededRng;

pub const JSON_FILE: &str = "error_by_timestep.json";
pub const PNG_FILE: &str = "error_by_timestep.png";
pub const DRIFT_PNG_FILE: &str = "drift_by_timestep.png";

/// The per-step errors of several students on one teacher trajectory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorByTimestep {
    /// The sampler's timesteps, in sampling order (large t first).
    pub t: Vec<usize>,
    /// The denoising factor of each step.
    pub gamma: Vec<f64>,
    /// How many trajectories (images) the means are over.
    pub samples: usize,
    /// For each student (by name), the mean squared guided-noise error at each step.
    pub students: Vec<StudentError>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StudentError {
    pub name: String,
    pub mse: Vec<f64>,
    /// Mean signed guided-noise error (student - teacher) at each step, teacher-forced.
    pub bias: Vec<f64>,
    /// Mean squared distance of the student's own `x` from the teacher's after each step.
    pub drift: Vec<f64>,
    /// `mean_t mse`, and `mean_t gamma_t^2 mse`: the error each step adds to x, summed over
    /// the trajectory's steps and normalised by their count.
    pub mean: f64,
    pub gamma2_weighted_mean: f64,
}

/// Walks the teacher's guided trajectory from `samples` held-out noises (stream `seed`) and
/// measures every student against it at each step.
pub fn measure(
    teacher: &Denoiser,
    students: &[(&str, &Denoiser)],
    family: &Family,
    sampler: &Sampler,
    samples: usize,
    seed: u64,
    device: &Device,
) -> ErrorByTimestep {
    let indices: Vec<usize> = (0..samples).map(|i| i % family.cycle_len()).collect();
    let (cond, null) = (family.cond(&indices), family.null(samples));
    let mut rng = SeededRng::new(seed);
    let [c, h, w] = family.sample_shape;
    let mut x =
        Tensor::<4>::from_data(TensorData::new(rng.normals(samples * c * h * w), [samples, c, h, w]), device);
    let g = sampler.guidance_scale;
    let guide = |(cond, uncond): (Tensor<4>, Tensor<4>)| guide(cond, uncond, g);
    let steps = sampler.steps.len();
    let mut mse = vec![Vec::with_capacity(steps); students.len()];
    let mut bias = vec![Vec::with_capacity(steps); students.len()];
    let mut drift = vec![Vec::with_capacity(steps); students.len()];
    // Each student's own trajectory, from the same noise (same stream) as the teacher's.
    let mut own: Vec<(Tensor<4>, SeededRng)> = students.iter().map(|_| (x.clone(), rng.clone())).collect();
    let scalar = |t: Tensor<4>| t.mean().into_scalar::<f32>() as f64;
    for step in &sampler.steps {
        let target = guide(cond_uncond_eps(teacher, x.clone(), step.t, &cond, &null));
        for (i, (_, student)) in students.iter().enumerate() {
            let error = guide(cond_uncond_eps(student, x.clone(), step.t, &cond, &null)) - target.clone();
            mse[i].push(scalar(error.clone().square()));
            bias[i].push(scalar(error));
        }
        x = sampler.advance(step, x, target, &mut rng);
        for (i, (_, student)) in students.iter().enumerate() {
            let (xs, r) = &mut own[i];
            let eps = guide(cond_uncond_eps(student, xs.clone(), step.t, &cond, &null));
            *xs = sampler.advance(step, xs.clone(), eps, r);
            drift[i].push(scalar((xs.clone() - x.clone()).square()));
        }
    }
    let gamma = sampler.gammas();
    let students = students
        .iter()
        .zip(mse.into_iter().zip(bias).zip(drift))
        .map(|((name, _), ((mse, bias), drift))| {
            let n = mse.len().max(1) as f64;
            StudentError {
                name: name.to_string(),
                bias,
                drift,
                mean: mse.iter().sum::<f64>() / n,
                gamma2_weighted_mean: mse.iter().zip(&gamma).map(|(e, g)| e * g * g).sum::<f64>() / n,
                mse,
            }
        })
        .collect();
    ErrorByTimestep { t: sampler.steps.iter().map(|s| s.t).collect(), gamma, samples, students }
}

/// Colours of the students' curves, in order (PTQ red, fine-tuned blue, then others).
const COLOURS: [[u8; 3]; 4] = [[200, 60, 40], [40, 90, 200], [40, 150, 60], [150, 60, 170]];

/// Writes `error_by_timestep.json`, `error_by_timestep.png` (teacher-forced noise error against
/// t) and `drift_by_timestep.png` (free-running distance from the teacher's x) into `dir`.
pub fn write(report: &ErrorByTimestep, dir: &Path) -> Result<()> {
    crate::base::fs::atomic_write(&dir.join(JSON_FILE), &serde_json::to_vec_pretty(report).expect("json"))?;
    let plot = |file: &str, y_name: &str, values: fn(&StudentError) -> &Vec<f64>| {
        let series: Vec<(Vec<(f64, f64)>, [u8; 3])> = report
            .students
            .iter()
            .zip(COLOURS.iter().cycle())
            .map(|(s, &colour)| {
                (report.t.iter().zip(values(s)).map(|(&t, &e)| (t as f64, e)).collect(), colour)
            })
            .collect();
        let mut img = crate::report::plot::line_plot(&series, true, "timestep", y_name);
        let names: Vec<(&str, [u8; 3])> =
            report.students.iter().zip(COLOURS.iter().cycle()).map(|(s, &c)| (s.name.as_str(), c)).collect();
        crate::report::plot::legend(&mut img, &names);
        crate::report::grid::save_png(&dir.join(file), &image::DynamicImage::ImageRgb8(img))
    };
    plot(PNG_FILE, "eps mse vs teacher", |s| &s.mse)?;
    plot(DRIFT_PNG_FILE, "x mse vs teacher", |s| &s.drift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::params;
    use crate::diffusion::NoiseSchedule;
    use crate::pipeline::config::{DiffusionConfig, ModelConfig, SamplerConfig};

    #[test]
    fn errors_are_zero_for_the_teacher_and_grow_with_a_perturbation() {
        let device = Device::flex();
        let teacher = Denoiser::new(&ModelConfig::test_unet(), &mut SeededRng::new(1), &device);
        let perturb = |amount: f32| {
            let mut rng = SeededRng::new(7);
            params::map_params(teacher.clone(), |_, t| {
                let n = t.dims()[0];
                t + Tensor::from_data(TensorData::new(rng.normals(n), [n]), &device) * amount
            })
        };
        let (small, large) = (perturb(0.01), perturb(0.05));
        let family = Family::tiny(&device);
        let sc = SamplerConfig { steps: 4, guidance_scale: 2.0, ..Default::default() };
        let sampler = Sampler::new(&NoiseSchedule::new(&DiffusionConfig::default()), &sc);
        let students = [("same", &teacher), ("small", &small), ("large", &large)];
        let report = measure(&teacher, &students, &family, &sampler, 3, 11, &device);
        assert_eq!(report.t, sampler.steps.iter().map(|s| s.t).collect::<Vec<_>>());
        assert_eq!(report.gamma, sampler.gammas());
        let [same, small, large] = [0, 1, 2].map(|i| &report.students[i]);
        assert!(same.mse.iter().chain(&same.bias).chain(&same.drift).all(|&e| e == 0.0), "{same:?}");
        assert!(large.drift.iter().all(|&d| d > 0.0) && large.bias.iter().any(|&b| b != 0.0), "{large:?}");
        assert!(large.drift[3] > small.drift[3], "{:?} vs {:?}", large.drift, small.drift);
        for (s, l) in small.mse.iter().zip(&large.mse) {
            assert!(*s > 0.0 && l > s, "small {s} vs large {l}");
        }
        let expect = small.mse.iter().sum::<f64>() / 4.0;
        assert!((small.mean - expect).abs() < 1e-12);
        // Same seed, same numbers; the files round-trip.
        let again = measure(&teacher, &students[1..2], &family, &sampler, 3, 11, &device);
        assert_eq!(again.students[0], *small);
        let dir = std::env::temp_dir().join(format!("msfp-timestep-error-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write(&report, &dir).unwrap();
        let back: ErrorByTimestep =
            serde_json::from_slice(&std::fs::read(dir.join(JSON_FILE)).unwrap()).unwrap();
        assert_eq!(back, report);
        for png in [PNG_FILE, DRIFT_PNG_FILE] {
            assert!(image::open(dir.join(png)).unwrap().width() > 0);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
