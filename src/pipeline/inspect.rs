//! `msfp inspect`: what a packed model holds, layer by layer.

use std::path::Path;

use serde::Serialize;

use super::export::PackedModel;
use crate::error::Result;
use crate::quant::format::Format;

#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    pub path: String,
    /// e.g. `e2m1 (signed)`; `none` for a full-precision weight.
    pub weight: String,
    pub act: String,
    /// MSFP's input class: `AAL` (anomalous, unsigned FP with zero point) or `NAL`.
    pub class: Option<String>,
    /// Min / mean / max of the per-channel weight scales.
    pub weight_scale: Option<[f32; 3]>,
    /// One per timestep slot.
    pub act_scale: Vec<f32>,
    pub act_zero_point: Vec<f32>,
    /// e.g. `K=4 r=4 merged (4 weight sets)`.
    pub adapters: Option<String>,
}

fn describe(spec: &Option<String>) -> String {
    match spec.as_deref().map(Format::parse) {
        Some(Ok(f)) => format!("{} ({})", f.spec(), if f.signed() { "signed" } else { "unsigned" }),
        Some(Err(_)) => spec.clone().unwrap_or_default(),
        None => "none".into(),
    }
}

pub fn inspect(path: &Path) -> Result<Vec<LayerInfo>> {
    let m = PackedModel::read(path)?;
    let lora = &m.plan.lora;
    Ok(m.plan
        .sites
        .iter()
        .map(|s| {
            let p = &s.path;
            let packed = m.file.packed.get(&format!("{p}.weight"));
            let weight_scale = packed.map(|t| {
                let (lo, hi) = t.scales.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                [lo, t.scales.iter().sum::<f32>() / t.scales.len() as f32, hi]
            });
            let dense = |k: &str| m.file.dense.get(&format!("{p}.quant.act.{k}")).map(|t| t.data.clone());
            LayerInfo {
                path: p.clone(),
                weight: match s.weight_group_size {
                    Some(g) => format!("{} g{g}", describe(&s.weight_format)),
                    None => describe(&s.weight_format),
                },
                // `H128`: the input is rotated by HQ-DiT's Hadamard transform in blocks of 128.
                act: match s.hadamard {
                    Some(h) => format!("{} H{}", describe(&s.act_format), h.block),
                    None => describe(&s.act_format),
                },
                class: s.act_class.clone(),
                weight_scale,
                act_scale: dense("scale").unwrap_or_default(),
                act_zero_point: dense("zero_point").unwrap_or_default(),
                adapters: (lora.enabled() && s.weight_format.is_some()).then(|| {
                    format!(
                        "K={} r={} {:?} ({} weight sets)",
                        lora.adapters,
                        lora.rank,
                        lora.placement,
                        packed.map_or(0, |t| t.shape[0])
                    )
                    .to_lowercase()
                }),
            }
        })
        .collect())
}

/// A fixed-width table, one layer per line.
pub fn render(layers: &[LayerInfo]) -> String {
    let mut out = format!(
        "{:<28} {:<18} {:<20} {:<5} {:<32} {:<24} {}\n",
        "layer", "weight", "act", "class", "weight scale min/mean/max", "act scale (zero point)", "adapters"
    );
    for l in layers {
        let ws = l.weight_scale.map_or("-".into(), |[a, b, c]| format!("{a:.3e}/{b:.3e}/{c:.3e}"));
        let first = |v: &[f32]| v.first().map(|x| format!("{x:.4}"));
        let act = match (first(&l.act_scale), first(&l.act_zero_point)) {
            (Some(s), Some(z)) => format!("{s} ({z})"),
            (Some(s), None) => s,
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{:<28} {:<18} {:<20} {:<5} {:<32} {:<24} {}\n",
            l.path,
            l.weight,
            l.act,
            l.class.as_deref().unwrap_or("-"),
            ws,
            act,
            l.adapters.as_deref().unwrap_or("-")
        ));
    }
    out
}
