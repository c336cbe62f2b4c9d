//! The quantized student of `msfp train`: the teacher's own definition with quantizers (from
//! calibration), TALoRA adapters and a router attached to its layers.
//!
//! Formats are not parameters, so what calibration decided is kept as a [`StudentPlan`]
//! (`student_plan.json` in the run directory); [`build`] turns a plan back into the same
//! structure, and checkpoints then fill in its trainable values.

use std::path::Path;

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lora::{LoraConfig, Talora};
use crate::models::Denoiser;
use crate::nn::Router;
use crate::quant::format::Format;
use crate::quant::layer::{ActQuant, LayerQuant, WeightQuant};
use crate::quant::plan::SiteReport;
use crate::rng::SeededRng;

/// Everything about the student's structure that is not a parameter value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StudentPlan {
    /// One entry per quantization site, in forward order: the formats chosen by calibration.
    pub sites: Vec<SiteReport>,
    pub act_timestep_slots: usize,
    pub timesteps: usize,
    pub lora: LoraConfig,
}

impl StudentPlan {
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::base::fs::atomic_write(path, &serde_json::to_vec_pretty(self).expect("json"))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| crate::error::io_err(path, e))?;
        serde_json::from_str(&text).map_err(|e| {
            Error::runtime(format!(
                "{}: not a student plan ({e}); delete the run directory and start again",
                path.display()
            ))
        })
    }

    /// Sites whose weights are quantized (they carry adapters).
    pub fn quantized_weights(&self) -> usize {
        self.sites.iter().filter(|s| s.weight_format.is_some()).count()
    }
}

/// Parameter groups of fine-tuning, found by module path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Adapter,
    Router,
    WeightScale,
    ActScale,
}

/// The group a parameter trains in, or `None` for frozen (the teacher's weights).
pub fn group_of(path: &str) -> Option<Group> {
    if path.contains(".lora.") {
        Some(Group::Adapter)
    } else if path.starts_with("router.") {
        Some(Group::Router)
    } else if path.ends_with(".quant.weight.scale") {
        Some(Group::WeightScale)
    } else if path.contains(".quant.act.") {
        Some(Group::ActScale)
    } else {
        None
    }
}

/// Whether `path` is a quantizer scale (weight or activation), which must stay positive; zero
/// points, also in the scale groups, may take either sign.
pub fn is_quantizer_scale(path: &str) -> bool {
    matches!(group_of(path), Some(Group::WeightScale | Group::ActScale)) && path.ends_with(".scale")
}

/// Gives `model` the quantizers of `plan` (placeholder scales: a checkpoint or calibration
/// sets them) and the adapters and router of `plan.lora`.
pub fn build(model: &mut Denoiser, plan: &StudentPlan, seed: u64) -> Result<()> {
    let mut reports: std::collections::HashMap<&str, &SiteReport> =
        plan.sites.iter().map(|r| (r.path.as_str(), r)).collect();
    for mut site in model.quant_sites() {
        // Plans written before attention matmul inputs were sites simply leave them unquantized.
        let Some(report) = reports.remove(site.path.as_str()) else {
            if site.layer.has_weight() {
                return Err(Error::runtime(format!(
                    "the student plan has no entry for layer `{}`: was it written for another model config?",
                    site.path
                )));
            }
            continue;
        };
        if let Some(spec) = report.hadamard {
            site.layer
                .set_hadamard(spec)
                .map_err(|e| Error::runtime(format!("the student plan rotates `{}`: {e}", site.path)))?;
        }
        let device = site.layer.device();
        let weight = match &report.weight_format {
            Some(_) if !site.layer.has_weight() => {
                return Err(Error::runtime(format!(
                    "the student plan gives `{}` a weight format, but it is a matmul input without a weight",
                    site.path
                )));
            }
            Some(spec) => {
                let dims = site.layer.weight_dims();
                let format = Format::parse(spec)?;
                match report.weight_group_size {
                    None => Some(WeightQuant::new(format, Tensor::ones([dims[0]], &device))),
                    Some(g) => {
                        let numel: usize = dims.iter().product();
                        if g == 0 || !(numel / dims[0]).is_multiple_of(g) {
                            return Err(Error::runtime(format!(
                                "the student plan groups `{}` by {g}, which does not divide its fan-in",
                                site.path
                            )));
                        }
                        Some(WeightQuant::grouped(format, Tensor::ones([numel / g], &device), g))
                    }
                }
            }
            None => None,
        };
        let act = match &report.act_format {
            Some(spec) => {
                let n = plan.act_timestep_slots;
                let zero = report.act_zero_point.map(|_| Tensor::zeros([n], &device));
                Some(ActQuant::new(Format::parse(spec)?, Tensor::ones([n], &device), zero, plan.timesteps))
            }
            None => None,
        };
        *site.layer.quant_mut() = (weight.is_some() || act.is_some()).then_some(LayerQuant {
            weight,
            act,
            observer: None,
            weight_sets: None,
        });
    }
    if let Some(path) = reports.keys().min() {
        return Err(Error::runtime(format!(
            "the student plan names layer `{path}`, which the model does not have: was it written for another model config?"
        )));
    }
    attach_adapters(model, &plan.lora, plan.timesteps, seed);
    Ok(())
}

/// One TALoRA bank per weight-quantized layer, and the router when there are several adapters.
pub fn attach_adapters(model: &mut Denoiser, lora: &LoraConfig, timesteps: usize, seed: u64) {
    if !lora.enabled() {
        return;
    }
    let mut rng = SeededRng::derived(seed, crate::rng::stream::FINETUNE_ADAPTERS);
    let mut device = None;
    for mut site in model.quant_sites() {
        if site.layer.quant().is_none_or(|q| q.weight.is_none()) {
            continue;
        }
        let dims = site.layer.weight_dims();
        let fan_in = dims[1..].iter().product();
        let dev = site.layer.device();
        site.layer.set_lora(Some(Talora::new(
            lora.adapters,
            lora.rank,
            dims[0],
            fan_in,
            lora.placement,
            lora.alpha,
            &mut rng,
            &dev,
        )));
        device = Some(dev);
    }
    if let (true, Some(device)) = (lora.adapters > 1, device) {
        *model.router_mut() =
            Some(Router::new(lora.router, lora.adapters, lora.router_hidden, timesteps, &mut rng, &device));
    }
}
