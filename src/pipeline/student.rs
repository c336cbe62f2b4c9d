//! The quantized student of `msfp train`: the teacher's own definition with quantizers (from
//! calibration), TALoRA adapters and a router attached to its layers.
//!
//! Formats are not parameters, so what calibration decided is kept as a [`StudentPlan`]
//! (`student_plan.json` in the run directory); [`build`] turns a plan back into the same
//! structure, and checkpoints then fill in its trainable values.

use std::collections::{BTreeMap, BTreeSet};
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

/// Parameter groups of fine-tuning, each with its learning rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Adapter,
    Router,
    WeightScale,
    /// Activation scales and zero points.
    ActScale,
}

/// The trainable parameters of a student by path: each one's group, and which are quantizer
/// scales (kept positive; zero points may take either sign). Found from the module tree's types
/// (each quant site's adapters and quantizers, the router), not by matching path strings; every
/// other parameter (the teacher's weights, deployed weight sets) is frozen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParamGroups {
    groups: BTreeMap<String, Group>,
    scales: BTreeSet<String>,
}

impl ParamGroups {
    pub fn of(model: &mut Denoiser) -> Self {
        use crate::base::params::param_ids;
        let mut by_id = std::collections::HashMap::new();
        let mut scale_ids = Vec::new();
        if let Some(r) = model.router() {
            by_id.extend(param_ids(r).into_iter().map(|id| (id, Group::Router)));
        }
        for site in model.quant_sites() {
            if let Some(lora) = site.layer.lora() {
                by_id.extend(param_ids(lora).into_iter().map(|id| (id, Group::Adapter)));
            }
            let Some(q) = site.layer.quant() else { continue };
            if let Some(w) = &q.weight {
                by_id.extend(param_ids(w).into_iter().map(|id| (id, Group::WeightScale)));
                scale_ids.push(w.scale.id);
            }
            if let Some(a) = &q.act {
                by_id.extend(param_ids(a).into_iter().map(|id| (id, Group::ActScale)));
                scale_ids.push(a.scale.id);
            }
        }
        let paths = crate::base::params::paths_by_id(&*model);
        let path = |id| paths.get(id).cloned().expect("a component's parameter is in its model");
        Self {
            groups: by_id.iter().map(|(id, g)| (path(id), *g)).collect(),
            scales: scale_ids.iter().map(path).collect(),
        }
    }

    /// The group `path` trains in, or `None` for frozen.
    pub fn group(&self, path: &str) -> Option<Group> {
        self.groups.get(path).copied()
    }

    pub fn is_quantizer_scale(&self, path: &str) -> bool {
        self.scales.contains(path)
    }

    /// The trainable parameters' paths.
    pub fn paths(&self) -> impl Iterator<Item = &String> {
        self.groups.keys()
    }
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
