//! `msfp train-classifier`: trains the LeNet-style MNIST classifier whose features define the
//! project's FID, and reports its held-out accuracy.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor, TensorData};
use serde::Serialize;

use crate::base::params;
use crate::data::{Mnist, Split};
use crate::error::{Error, Result};
use crate::models::Classifier;
use crate::pipeline::config::Config;
use crate::rng::SeededRng;
use crate::train::metrics::Progress;
use crate::train::optim::{AdamW, learning_rate};

#[derive(Debug, Serialize)]
pub struct ClassifierSummary {
    pub steps: usize,
    pub heldout_accuracy: f64,
    pub heldout_count: usize,
    pub weights: String,
}

/// Random shifts of up to 2 pixels, so the classifier tolerates imperfectly centred samples.
fn augment(images: &mut [f32], rng: &mut SeededRng) {
    let s = 32;
    for img in images.chunks_mut(s * s) {
        let (dx, dy) = (rng.below(5) as i32 - 2, rng.below(5) as i32 - 2);
        let src = img.to_vec();
        for y in 0..s as i32 {
            for x in 0..s as i32 {
                let (sx, sy) = (x - dx, y - dy);
                img[(y * s as i32 + x) as usize] =
                    if (0..s as i32).contains(&sx) && (0..s as i32).contains(&sy) {
                        src[(sy * s as i32 + sx) as usize]
                    } else {
                        -1.0
                    };
            }
        }
    }
}

pub fn train_classifier(cfg: &Config) -> Result<ClassifierSummary> {
    let out_dir = &cfg.run.out_dir;
    std::fs::create_dir_all(out_dir).map_err(|e| crate::error::io_err(out_dir, e))?;
    let device = crate::device::make_device(&cfg.run.device)?.autodiff();
    let train = Mnist::from_config(&cfg.data, Split::Train)?;
    let held = Mnist::from_config(&cfg.data, Split::Heldout)?;
    let mut model =
        Classifier::new(&mut SeededRng::derived(cfg.run.seed, crate::rng::stream::CLASSIFIER_INIT), &device);
    let mut optim = AdamW::new(cfg.train.weight_decay, cfg.train.grad_clip);
    let mut rng = SeededRng::derived(cfg.run.seed, crate::rng::stream::CLASSIFIER_TRAIN);
    let mut stream = super::pretrain::DataStream::new(cfg.run.seed, train.len(), Default::default());
    let progress = Progress::new("classifier", 0, cfg.train.steps);
    for step in 0..cfg.train.steps {
        let idx = stream.next_batch(cfg.train.batch_size);
        let (x, y) = train.batch(&idx, &device);
        let mut px = params::host_values(x);
        augment(&mut px, &mut rng);
        let x = Tensor::<4>::from_data(TensorData::new(px, [idx.len(), 1, 32, 32]), &device);
        let loss = log_softmax(model.forward(x), 1).gather(1, y.unsqueeze_dim::<2>(1)).mean().neg();
        let value = crate::base::params::host_scalar(loss.clone());
        if !value.is_finite() {
            return Err(Error::runtime(format!(
                "classifier loss became {value} at step {}; lower train.lr",
                step + 1
            )));
        }
        let grads = loss.backward();
        model = optim.step(model, &grads, learning_rate(&cfg.train, step)).0;
        let log = (step + 1) % cfg.train.log_every == 0;
        progress.update(step + 1, &format!("loss {value:.4}"), log);
    }
    progress.finish();
    let model = model.valid();
    let accuracy = accuracy(
        &model,
        &held.images,
        &held.labels.iter().map(|&l| l as usize).collect::<Vec<_>>(),
        &device.inner(),
    );
    let weights = out_dir.join("classifier.safetensors");
    let meta = BTreeMap::from([
        ("msfp.model".to_string(), "\"mnist_classifier\"".to_string()),
        ("msfp.heldout_accuracy".to_string(), format!("{accuracy:.4}")),
    ]);
    params::save_safetensors(&weights, &params::collect(&model), &meta)?;
    let summary = ClassifierSummary {
        steps: cfg.train.steps,
        heldout_accuracy: accuracy,
        heldout_count: held.len(),
        weights: weights.display().to_string(),
    };
    crate::base::fs::atomic_write(
        &out_dir.join("summary.json"),
        &serde_json::to_vec_pretty(&summary).expect("json"),
    )?;
    Ok(summary)
}

pub fn load_classifier(path: &Path, device: &Device) -> Result<Classifier> {
    let (tensors, _) = params::load_safetensors(path)
        .map_err(|e| e.context("eval.classifier (train one with `msfp train-classifier`)"))?;
    params::load_into(Classifier::new(&mut SeededRng::new(0), device), &tensors, path)
}

/// Runs `f` over `images` in batches of 250 and concatenates the `[B, D]` outputs row-major.
fn batched<const D: usize>(images: &[f32], device: &Device, f: impl Fn(Tensor<4>) -> Tensor<D>) -> Vec<f32> {
    let px = 32 * 32;
    let mut out = Vec::new();
    for chunk in images.chunks(250 * px) {
        let x =
            Tensor::<4>::from_data(TensorData::new(chunk.to_vec(), [chunk.len() / px, 1, 32, 32]), device);
        out.extend(params::host_values(f(x)));
    }
    out
}

/// FID features `[n * FEATURE_DIM]` of images in [-1, 1].
pub fn features(model: &Classifier, images: &[f32], device: &Device) -> Vec<f32> {
    batched(images, device, |x| model.features(x))
}

/// Fraction of images classified as their label.
pub fn accuracy(model: &Classifier, images: &[f32], labels: &[usize], device: &Device) -> f64 {
    let logits = batched(images, device, |x| model.forward(x));
    let correct = logits
        .chunks(10)
        .zip(labels)
        .filter(|(row, l)| {
            let arg = row.iter().enumerate().fold(0, |best, (i, v)| if *v > row[best] { i } else { best });
            arg == **l
        })
        .count();
    correct as f64 / labels.len().max(1) as f64
}
