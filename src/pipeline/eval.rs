//! `msfp eval`: FID in the classifier's feature space against held-out digits, the classifier's
//! accuracy on class-conditional samples, and PSNR between two models' samples from identical noise.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use nalgebra::{DMatrix, DVector, SymmetricEigen};
use serde::{Deserialize, Serialize};

use super::classifier::{accuracy, features, load_classifier};
use super::config::Config;
use crate::data::{Mnist, Split};
use crate::error::{Result, positive};
use crate::models::classifier::FEATURE_DIM;
use crate::models::{Denoiser, Family};

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ModelEval {
    pub fid: f64,
    pub accuracy: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub samples: usize,
    /// FID of `samples` real training digits against the held-out digits: the floor a perfect
    /// generator would reach at this sample size.
    pub fid_real_heldout: f64,
    pub model: ModelEval,
    pub other: Option<ModelEval>,
    /// PSNR (dB, data range [-1, 1]) between the two models' samples from identical noise.
    pub psnr: Option<f64>,
    pub sampler: String,
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

impl EvalConfig {
    /// `[eval]`'s ranges.
    pub fn validate(&self) -> Result<()> {
        positive("eval.samples", self.samples)?;
        positive("eval.batch_size", self.batch_size)
    }
}

/// Fréchet distance between Gaussians fitted to two feature sets (`[n, d]` row-major).
pub fn fid(a: &[f32], b: &[f32], d: usize) -> f64 {
    let (mu_a, cov_a) = moments(a, d);
    let (mu_b, cov_b) = moments(b, d);
    let diff = &mu_a - &mu_b;
    let sqrt_a = psd_sqrt(&cov_a);
    let inner = &sqrt_a * &cov_b * &sqrt_a;
    let inner = (&inner + inner.transpose()) * 0.5;
    let tr_sqrt: f64 = SymmetricEigen::new(inner).eigenvalues.iter().map(|v| v.max(0.0).sqrt()).sum();
    (diff.dot(&diff) + cov_a.trace() + cov_b.trace() - 2.0 * tr_sqrt).max(0.0)
}

fn moments(x: &[f32], d: usize) -> (DVector<f64>, DMatrix<f64>) {
    let n = x.len() / d;
    let m = DMatrix::from_row_iterator(n, d, x.iter().map(|&v| v as f64));
    let mu = DVector::from_iterator(d, (0..d).map(|j| m.column(j).mean()));
    let centered = DMatrix::from_fn(n, d, |i, j| m[(i, j)] - mu[j]);
    let cov = centered.transpose() * &centered / (n.max(2) - 1) as f64;
    (mu, cov)
}

fn psd_sqrt(m: &DMatrix<f64>) -> DMatrix<f64> {
    let e = SymmetricEigen::new(m.clone());
    let s = DMatrix::from_diagonal(&e.eigenvalues.map(|v| v.max(0.0).sqrt()));
    &e.eigenvectors * s * e.eigenvectors.transpose()
}

/// PSNR in dB between two image sets with values in [-1, 1] (peak-to-peak 2).
pub fn psnr(a: &[f32], b: &[f32]) -> f64 {
    let mse = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.len().max(1) as f64;
    10.0 * (4.0 / mse.max(1e-20)).log10()
}

/// Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, over the
/// window positions fully inside the image, as the reference MATLAB code) between two image
/// sets `[n, C, H, W]` with values in [-1, 1] (data range 2), averaged over images and channels.
pub fn ssim(a: &[f32], b: &[f32], shape: [usize; 3]) -> f64 {
    let [c, h, w] = shape;
    let plane = h * w;
    let n = a.len() / (c * plane);
    const RADIUS: usize = 5;
    let k = 2 * RADIUS + 1;
    if h < k || w < k {
        return f64::NAN;
    }
    let g: Vec<f64> =
        (0..k).map(|i| (-((i as f64 - RADIUS as f64).powi(2)) / (2.0 * 1.5 * 1.5)).exp()).collect();
    let total: f64 = g.iter().sum();
    let g: Vec<f64> = g.iter().map(|v| v / total).collect();
    // Separable valid filtering of one plane.
    let filter = |x: &[f64]| -> Vec<f64> {
        let (oh, ow) = (h - k + 1, w - k + 1);
        let mut rows = vec![0.0; h * ow];
        for y in 0..h {
            for xo in 0..ow {
                rows[y * ow + xo] = (0..k).map(|i| g[i] * x[y * w + xo + i]).sum();
            }
        }
        let mut out = vec![0.0; oh * ow];
        for yo in 0..oh {
            for xo in 0..ow {
                out[yo * ow + xo] = (0..k).map(|i| g[i] * rows[(yo + i) * ow + xo]).sum();
            }
        }
        out
    };
    let (c1, c2) = ((0.01f64 * 2.0).powi(2), (0.03f64 * 2.0).powi(2));
    let mut sum = 0.0;
    let mut count = 0usize;
    for p in 0..n * c {
        let x: Vec<f64> = a[p * plane..(p + 1) * plane].iter().map(|&v| v as f64).collect();
        let y: Vec<f64> = b[p * plane..(p + 1) * plane].iter().map(|&v| v as f64).collect();
        let prod = |u: &[f64], v: &[f64]| u.iter().zip(v).map(|(p, q)| p * q).collect::<Vec<_>>();
        let (mx, my) = (filter(&x), filter(&y));
        let (sxx, syy, sxy) = (filter(&prod(&x, &x)), filter(&prod(&y, &y)), filter(&prod(&x, &y)));
        for i in 0..mx.len() {
            let (vx, vy, cxy) = (sxx[i] - mx[i] * mx[i], syy[i] - my[i] * my[i], sxy[i] - mx[i] * my[i]);
            sum += ((2.0 * mx[i] * my[i] + c1) * (2.0 * cxy + c2))
                / ((mx[i] * mx[i] + my[i] * my[i] + c1) * (vx + vy + c2));
            count += 1;
        }
    }
    sum / count.max(1) as f64
}

/// Scores generated samples against the held-out digits in the classifier's feature space.
pub struct Scorer {
    classifier: crate::models::Classifier,
    heldout_features: Vec<f32>,
    /// FID of as many real training digits as samples are scored, against the held-out digits.
    pub fid_real_heldout: f64,
    device: Device,
}

impl Scorer {
    pub fn new(cfg: &Config, device: &Device) -> Result<Self> {
        let classifier = load_classifier(&cfg.eval.classifier, device)?;
        let held = Mnist::from_config(&cfg.data, Split::Heldout)?;
        let train = Mnist::from_config(&cfg.data, Split::Train)?;
        let heldout_features = features(&classifier, &held.images, device);
        let real_n = cfg.eval.samples.min(train.len());
        let train_f = features(&classifier, &train.images[..real_n * 32 * 32], device);
        let fid_real_heldout = fid(&train_f, &heldout_features, FEATURE_DIM);
        Ok(Self { classifier, heldout_features, fid_real_heldout, device: device.clone() })
    }

    /// FID and accuracy of images `[n * 32 * 32]` generated for `labels`.
    pub fn score(&self, images: &[f32], labels: &[usize]) -> ModelEval {
        let f = features(&self.classifier, images, &self.device);
        ModelEval {
            fid: fid(&f, &self.heldout_features, FEATURE_DIM),
            accuracy: accuracy(&self.classifier, images, labels, &self.device),
        }
    }

    /// Generates `eval.samples` images from the eval noise stream and scores them.
    pub fn generate_and_score(
        &self,
        cfg: &Config,
        family: &Family,
        model: &Denoiser,
    ) -> (ModelEval, Vec<f32>) {
        let (images, labels) =
            super::sample::generate(model, family, cfg, cfg.eval.samples, cfg.eval.seed, &self.device);
        (self.score(&images, &labels), images)
    }
}

/// Evaluates `model` (and optionally `other` on identical noise).
pub fn evaluate(
    cfg: &Config,
    model: &Denoiser,
    other: Option<&Denoiser>,
    device: &Device,
) -> Result<EvalReport> {
    let scorer = Scorer::new(cfg, device)?;
    let family = crate::models::Family::tiny(device);
    let (model_eval, images) = scorer.generate_and_score(cfg, &family, model);
    let (other_eval, psnr_db) = match other {
        Some(o) => {
            let (e, other_images) = scorer.generate_and_score(cfg, &family, o);
            (Some(e), Some(psnr(&images, &other_images)))
        }
        None => (None, None),
    };
    Ok(EvalReport {
        samples: cfg.eval.samples,
        fid_real_heldout: scorer.fid_real_heldout,
        model: model_eval,
        other: other_eval,
        psnr: psnr_db,
        sampler: sampler_label(cfg),
    })
}

/// The sampler settings an evaluation ran with, for reports.
pub fn sampler_label(cfg: &Config) -> String {
    format!(
        "{:?} steps={} eta={} guidance={}",
        cfg.sampler.kind, cfg.sampler.steps, cfg.sampler.eta, cfg.sampler.guidance_scale
    )
}

pub fn write_report(path: &Path, report: &EvalReport) -> Result<()> {
    crate::base::fs::atomic_write(path, &serde_json::to_vec_pretty(report).expect("json"))
}

/// Adds (or replaces, by `model`) one row in a JSON list of results, e.g.
/// `experiments/tiny-teachers/results.json`, recording the command that produced it.
pub fn record(path: &Path, label: &str, report: &EvalReport, weights: &Path, command: &str) -> Result<()> {
    let mut rows: Vec<serde_json::Value> = match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            crate::error::Error::runtime(format!(
                "{}: not a JSON list of results ({e}); move it away to start a new one",
                path.display()
            ))
        })?,
        Err(_) => Vec::new(),
    };
    rows.retain(|r| r.get("model").and_then(|m| m.as_str()) != Some(label));
    rows.push(serde_json::json!({
        "model": label,
        "fid": report.model.fid,
        "fid_real_heldout": report.fid_real_heldout,
        "accuracy": report.model.accuracy,
        "samples": report.samples,
        "sampler": report.sampler,
        "weights": weights.display().to_string(),
        "command": command,
    }));
    crate::base::fs::atomic_write(path, &serde_json::to_vec_pretty(&rows).expect("json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fid_of_a_set_with_itself_is_zero_and_grows_with_shift() {
        let mut rng = crate::rng::SeededRng::new(3);
        let d = 4;
        let a: Vec<f32> = rng.normals(2000 * d);
        assert!(fid(&a, &a, d) < 1e-6);
        let shifted: Vec<f32> = a.iter().map(|v| v + 1.0).collect();
        // Mean shift of 1 in each of 4 dims: FID = 4 exactly (covariances equal).
        assert!((fid(&a, &shifted, d) - 4.0).abs() < 1e-6);
        let scaled: Vec<f32> = a.iter().map(|v| v * 2.0).collect();
        // Cov 4I vs I: tr = 4d + d - 2 * 2d = d.
        assert!((fid(&a, &scaled, d) - d as f64).abs() < 0.1);
    }

    #[test]
    fn ssim_is_one_for_equal_images_and_falls_with_noise() {
        let mut rng = crate::rng::SeededRng::new(4);
        let shape = [3, 16, 16];
        let a: Vec<f32> = rng.normals(2 * 3 * 256).iter().map(|v| (v * 0.3).clamp(-1.0, 1.0)).collect();
        assert!((ssim(&a, &a, shape) - 1.0).abs() < 1e-12);
        let noisy = |s: f32, rng: &mut crate::rng::SeededRng| -> Vec<f32> {
            a.iter().zip(rng.normals(a.len())).map(|(x, n)| x + s * n).collect()
        };
        let (small, large) =
            (ssim(&a, &noisy(0.05, &mut rng), shape), ssim(&a, &noisy(0.5, &mut rng), shape));
        assert!(small < 1.0 && large < small && large > -1.0, "{small} {large}");
        // Two flat images: only the luminance term is left, (2 x y + c1) / (x^2 + y^2 + c1) with
        // c1 = (0.01 * 2)^2.
        let (x, y) = (vec![0.5f32; 3 * 256], vec![0.3f32; 3 * 256]);
        let want = (2.0 * 0.5 * 0.3 + 4e-4) / (0.25 + 0.09 + 4e-4);
        assert!((ssim(&x, &y, shape) - want).abs() < 1e-6, "{} vs {want}", ssim(&x, &y, shape));
    }

    #[test]
    fn psnr_of_known_error() {
        let a = vec![0.0f32; 100];
        let b = vec![0.2f32; 100];
        // mse 0.04, peak^2 4: 10 log10(100) = 20 dB.
        assert!((psnr(&a, &b) - 20.0).abs() < 1e-6);
    }
}
