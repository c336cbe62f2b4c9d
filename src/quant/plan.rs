//! Which layers are quantized and at which formats.
//!
//! A [`QuantConfig`] gives default weight and activation formats and overrides by glob pattern
//! on module paths (e.g. keep `conv_in` and `conv_out` at 8 bits); [`SiteReport`] is what
//! calibration (`pipeline::calibrate`, which walks a model's sites) decided for one layer.

use serde::{Deserialize, Serialize};

use super::format::Format;
use crate::error::{Error, Result};

/// A format choice: a fixed spec (`e2m1`, `ue2m2`, `int4`, ...), a family searched per layer
/// (`fp4`, `fp6`, `fp8`: every exponent/mantissa split of that width; for activations the
/// mixup-sign rule picks signed or unsigned), or `none` (full precision).
#[derive(Debug, Clone, PartialEq)]
pub enum FormatChoice {
    None,
    Fixed(Format),
    SearchFp(u32),
}

impl FormatChoice {
    pub fn parse(s: &str, key: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "" => Ok(FormatChoice::None),
            "fp4" => Ok(FormatChoice::SearchFp(4)),
            "fp6" => Ok(FormatChoice::SearchFp(6)),
            "fp8" => Ok(FormatChoice::SearchFp(8)),
            other => Format::parse(other)
                .map(FormatChoice::Fixed)
                .map_err(|e| Error::usage(format!("{key} = \"{s}\": {e} (or fp4, fp6, fp8, none)"))),
        }
    }

    pub fn bits(&self) -> Option<u32> {
        match self {
            FormatChoice::None => None,
            FormatChoice::Fixed(f) => Some(f.bits()),
            FormatChoice::SearchFp(b) => Some(*b),
        }
    }
}

/// Per-layer override, matched by a glob on the module path (`*` matches dots too).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct LayerOverride {
    pub pattern: String,
    pub weight: Option<String>,
    pub act: Option<String>,
    /// Weight scale group size of matching layers (0: per output channel).
    pub weight_group_size: Option<usize>,
    /// Leave matching layers in full precision.
    #[serde(default)]
    pub skip: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QuantConfig {
    /// Weight format of every layer: a spec, `fp4`/`fp6`/`fp8`, or `none`.
    pub weight: String,
    /// One weight scale per this many consecutive fan-in elements (16: NVFP4-shaped blocks,
    /// 32: MX); 0 is one scale per output channel. A layer whose fan-in it does not divide keeps
    /// per-channel scales.
    pub weight_group_size: usize,
    /// Input-activation format of every layer (per tensor): a spec, `fp4`/`fp6`/`fp8`, or `none`.
    pub act: String,
    /// Activation scales (and zero points) per layer, one per equal range of timesteps.
    pub act_timestep_slots: usize,
    /// Also quantize the four inputs of every attention's two matmuls (`q_in`, `k_in` of
    /// `Q K^T`; `probs_in`, `v_in` of `P V`), at `act` and the overrides matching their paths.
    pub attention_matmuls: bool,
    /// Overrides, later entries winning.
    pub layers: Vec<LayerOverride>,
    /// Globs of linear layers whose input HQ-DiT's randomized Hadamard transform rotates (the
    /// transpose folded into the weight), e.g. `["blocks.*.attn.qkv", "blocks.*.mlp.fc2"]`.
    pub hadamard: Vec<String>,
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self {
            weight: "fp4".into(),
            act: "fp4".into(),
            weight_group_size: 0,
            act_timestep_slots: 1,
            attention_matmuls: false,
            layers: Vec::new(),
            hadamard: Vec::new(),
        }
    }
}

/// The resolved formats of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan {
    pub weight: FormatChoice,
    pub act: FormatChoice,
    pub weight_group_size: usize,
}

impl QuantConfig {
    pub fn validate(&self, section: &str) -> Result<()> {
        FormatChoice::parse(&self.weight, &format!("{section}.weight"))?;
        FormatChoice::parse(&self.act, &format!("{section}.act"))?;
        if self.act_timestep_slots == 0 {
            return Err(Error::usage(format!(
                "{section}.act_timestep_slots = 0 is out of range: it must be at least 1"
            )));
        }
        for (i, g) in self.hadamard.iter().enumerate() {
            glob::Pattern::new(g)
                .map_err(|e| Error::usage(format!("{section}.hadamard[{i}] = \"{g}\": {e}")))?;
        }
        for (i, o) in self.layers.iter().enumerate() {
            let key = format!("{section}.layers[{i}]");
            glob::Pattern::new(&o.pattern)
                .map_err(|e| Error::usage(format!("{key}.pattern = \"{}\": {e}", o.pattern)))?;
            if let Some(w) = &o.weight {
                FormatChoice::parse(w, &format!("{key}.weight"))?;
            }
            if let Some(a) = &o.act {
                FormatChoice::parse(a, &format!("{key}.act"))?;
            }
        }
        Ok(())
    }

    /// The formats of the layer at `path` (after overrides).
    pub fn resolve(&self, path: &str) -> Result<LayerPlan> {
        let (mut weight, mut act) = (self.weight.clone(), self.act.clone());
        let mut weight_group_size = self.weight_group_size;
        for o in &self.layers {
            let pattern = glob::Pattern::new(&o.pattern)
                .map_err(|e| Error::usage(format!("pattern {}: {e}", o.pattern)))?;
            if !pattern.matches(path) {
                continue;
            }
            if o.skip {
                (weight, act) = ("none".into(), "none".into());
            }
            if let Some(w) = &o.weight {
                weight = w.clone();
            }
            if let Some(a) = &o.act {
                act = a.clone();
            }
            if let Some(g) = o.weight_group_size {
                weight_group_size = g;
            }
        }
        Ok(LayerPlan {
            weight: FormatChoice::parse(&weight, "quant.weight")?,
            act: FormatChoice::parse(&act, "quant.act")?,
            weight_group_size,
        })
    }
}

/// What calibration decided for one layer (for reports and `inspect`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SiteReport {
    pub path: String,
    pub weight_format: Option<String>,
    /// Weight scales per group of this many fan-in elements; `None`: per output channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_group_size: Option<usize>,
    pub weight_error: Option<f64>,
    pub act_format: Option<String>,
    pub act_class: Option<String>,
    pub act_scale: Option<f32>,
    pub act_zero_point: Option<f32>,
    pub act_error: Option<f64>,
    pub act_min: Option<f32>,
    pub act_max: Option<f32>,
    /// With several timestep slots: each slot's own calibrated scale (and zero point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act_slot_scales: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act_slot_zero_points: Option<Vec<f32>>,
    /// HQ-DiT's input rotation, folded into the weight before its quantizer was calibrated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hadamard: Option<super::hadamard::HadamardSpec>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_quant_config_names_the_key() {
        let q = QuantConfig { act: "e9m9".into(), ..Default::default() };
        let e = q.validate("quant").unwrap_err();
        assert!(e.message.contains("quant.act"), "{e}");
        let q = QuantConfig {
            layers: vec![LayerOverride { pattern: "[".into(), ..Default::default() }],
            ..Default::default()
        };
        assert!(q.validate("quant").unwrap_err().message.contains("quant.layers[0].pattern"));
    }
}
