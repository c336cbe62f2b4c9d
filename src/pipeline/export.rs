//! Export of a fine-tuned student as a real low-bit file, and loading it back for sampling.
//!
//! # Layout (`model.packed.safetensors`)
//! A packed-tensor file (layout of [`crate::quant::pack`]) holding:
//! - `<layer>.weight`: for every weight-quantized layer, the weight actually used, packed as
//!   codes of its format with one `f32` scale per output channel. Shape `[sets, out, fan_in]`
//!   (`fan_in = in * kh * kw` for a conv): with the `merged` TALoRA placement one set per
//!   adapter, `Q(W0 + B_k A_k)`; otherwise one set, `Q(W0)`.
//! - plain `f32` tensors (the `dense` list of the `msfp.packed` metadata) named by module path:
//!   biases, norms, embeddings, layers left in full precision, activation scales and zero
//!   points (`<layer>.quant.act.scale` / `.zero_point`, one per timestep slot), the `branch`
//!   placement's low-rank factors (`<layer>.lora.a` / `.b`) and the learned router.
//! - metadata `msfp.model` / `msfp.model_config` (the network) and `msfp.student` (the
//!   [`StudentPlan`]: every layer's weight and activation formats, AAL/NAL class, adapters).
//!
//! Loading rebuilds the student, puts the unpacked weight sets in place of the fake-quantized
//! weights (and merged adapters), and samples with outputs identical to the fake-quant student.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};

use super::student::{self, StudentPlan};
use crate::config::{Config, ModelConfig};
use crate::error::{Error, Result};
use crate::lora::Placement;
use crate::models::Denoiser;
use crate::nn::StepCtx;
use crate::quant::pack::{PackedFile, PackedTensor, load_packed_file, save_packed_file};
use crate::rng::SeededRng;
use crate::train::params;

const STUDENT_KEY: &str = "msfp.student";

/// Weight sets a layer deploys: one per adapter for the merged placement, else one.
fn weight_sets(lora: Option<&crate::lora::Talora>) -> usize {
    match lora {
        Some(l) if l.placement == Placement::Merged => l.adapters(),
        _ => 1,
    }
}

fn one_hot(k: usize, n: usize, device: &Device) -> Tensor<1> {
    let mut v = vec![0.0f32; n];
    v[k] = 1.0;
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// Writes the packed model of a (fine-tuned or calibrated) student.
pub fn export(student: &Denoiser, plan: &StudentPlan, cfg: &Config, path: &Path) -> Result<()> {
    let mut model = student.clone();
    let mut dense = params::collect(&model);
    let mut packed = BTreeMap::new();
    for site in model.quant_sites() {
        let Some(wq) = site.layer.quant().and_then(|q| q.weight.as_ref()) else {
            continue;
        };
        let format = wq.format.clone();
        let scales = params::host_values(wq.scale.val());
        let lora = site.layer.lora();
        let sets = weight_sets(lora);
        let device = site.layer.device();
        let mut values = Vec::new();
        for k in 0..sets {
            let ctx = StepCtx { timestep: None, route: (sets > 1).then(|| one_hot(k, sets, &device)) };
            values.extend(site.layer.effective_weight_host(&ctx).data);
        }
        let dims = site.layer.weight_dims();
        let (rows, fan_in) = (dims[0], dims[1..].iter().product::<usize>());
        let set_scales: Vec<f32> = (0..sets).flat_map(|_| scales.iter().copied()).collect();
        let p = &site.path;
        let t =
            PackedTensor::pack(&values, &[sets, rows, fan_in], &format, &set_scales, &[sets, rows, 1], None)
                .map_err(|e| e.context(format!("exporting `{p}.weight`")))?;
        packed.insert(format!("{p}.weight"), t);
        dense.remove(&format!("{p}.weight"));
        dense.remove(&format!("{p}.quant.weight.scale"));
        if sets > 1 || lora.is_some_and(|l| l.placement == Placement::Merged) {
            dense.remove(&format!("{p}.lora.a"));
            dense.remove(&format!("{p}.lora.b"));
        }
    }
    let meta = BTreeMap::from([
        ("msfp.model".to_string(), serde_json::to_string(&cfg.model.kind).expect("json")),
        ("msfp.model_config".to_string(), serde_json::to_string(&cfg.model).expect("json")),
        (STUDENT_KEY.to_string(), serde_json::to_string(plan).expect("json")),
    ]);
    save_packed_file(path, &PackedFile { packed, dense, meta })
}

/// A packed model file, read and checked.
pub struct PackedModel {
    pub file: PackedFile,
    pub model_config: ModelConfig,
    pub plan: StudentPlan,
}

impl PackedModel {
    pub fn read(path: &Path) -> Result<Self> {
        let file = load_packed_file(path)?;
        let get = |key: &str| {
            file.meta.get(key).ok_or_else(|| {
                Error::usage(format!(
                    "{}: no `{key}` metadata: not a packed model (write one with `msfp export` or `msfp train`)",
                    path.display()
                ))
            })
        };
        let model_config: ModelConfig = serde_json::from_str(get("msfp.model_config")?)
            .map_err(|e| Error::runtime(format!("{}: bad msfp.model_config: {e}", path.display())))?;
        let plan: StudentPlan = serde_json::from_str(get(STUDENT_KEY)?)
            .map_err(|e| Error::runtime(format!("{}: bad {STUDENT_KEY}: {e}", path.display())))?;
        Ok(Self { file, model_config, plan })
    }
}

/// Loads a packed model for inference: weights unpacked to the values the fake quantizer used.
pub fn load_packed_model(path: &Path, device: &Device) -> Result<Denoiser> {
    let PackedModel { file, model_config, plan } = PackedModel::read(path)?;
    let mut model = Denoiser::new(&model_config, &mut SeededRng::new(0), device);
    student::build(&mut model, &plan, 0)?;
    let bad = |why: String| Error::runtime(format!("{}: {why}", path.display()));
    let mut deployed = std::collections::HashSet::new();
    for mut site in model.quant_sites() {
        if site.layer.quant().is_none_or(|q| q.weight.is_none()) {
            continue;
        }
        let name = format!("{}.weight", site.path);
        let t = file.packed.get(&name).ok_or_else(|| bad(format!("packed weight `{name}` is missing")))?;
        let dims = site.layer.weight_dims();
        let (rows, fan_in) = (dims[0], dims[1..].iter().product::<usize>());
        let sets = weight_sets(site.layer.lora());
        if t.shape != [sets, rows, fan_in] {
            return Err(bad(format!(
                "`{name}` has shape {:?}, the layer needs {:?}",
                t.shape,
                [sets, rows, fan_in]
            )));
        }
        let values = Tensor::<3>::from_data(TensorData::new(t.unpack(), [sets, rows, fan_in]), device);
        let merged = site.layer.lora().is_some_and(|l| l.placement == Placement::Merged);
        if merged {
            *site.layer.lora_mut() = None;
        }
        let q = site.layer.quant_mut().as_mut().expect("quantized layer");
        q.weight = None;
        q.weight_sets = Some(Param::from_tensor(values));
        deployed.insert(name);
    }
    // Every other parameter must come from the dense tensors.
    let mut missing = Vec::new();
    params::for_each_param(&model, |p, _, _| {
        let covered = file.dense.contains_key(p) || deployed.contains(p) || p.ends_with(".quant.weight_sets");
        if !covered {
            missing.push(p.to_string());
        }
    });
    if let Some(p) = missing.first() {
        return Err(bad(format!(
            "tensor `{p}` is missing ({} in all); the file is incomplete",
            missing.len()
        )));
    }
    params::load_subset(model, &file.dense, path)
}
