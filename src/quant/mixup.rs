//! MSFP's mixup-sign rule: a quantized layer whose input activations are *anomalous* (AAL:
//! asymmetric, e.g. right after SiLU, whose minimum is about -0.278) gets an unsigned FP format
//! with a zero point (the sign bit becomes an extra exponent or mantissa bit); a layer with
//! *normal* input (NAL) keeps a signed FP format.
//!
//! Confirmed by the paper: that split and a search-based initialisation minimising the error.
//! Our reconstruction (configurable): how a layer is classified ([`MixupRule`]) and the search
//! space (all exponent/mantissa splits of the bit width, clipping-ratio grid, zero point in
//! `[min(x), 0]`; see [`super::calib`]).

use serde::{Deserialize, Serialize};

use super::calib::{ActStats, CalibConfig, FormatError, Granularity, Objective, search_fp_formats};
use crate::error::Result;

/// How a quantized layer's input is classified as anomalous (AAL) or normal (NAL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixupRule {
    /// The model says so: the input comes straight from a SiLU or GELU.
    Structural,
    /// The calibration statistics say so: `min >= -k * max` with `max > 0`, i.e. the negative
    /// tail is at most `k` times the positive one.
    Statistical,
    /// Both conditions must hold.
    Both,
    /// Either condition is enough (the default: it catches SiLU/GELU outputs by construction
    /// and other one-sided inputs, such as attention probabilities, by their statistics).
    #[default]
    Either,
}

/// The class of a quantized layer's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignClass {
    /// Anomalous activation layer: asymmetric input, unsigned FP with a zero point.
    Anomalous,
    /// Normal activation layer: signed FP.
    Normal,
}

/// The mixup-sign settings of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MixupConfig {
    /// Off: signed FP for every activation (the ablation baseline).
    pub mixup_sign: bool,
    pub rule: MixupRule,
    /// `k` of the statistical rule `min >= -k * max` (default 0.5). The threshold is our
    /// reconstruction: the paper does not publish one. SiLU's output has `min` of about -0.278
    /// against a `max` of several units (`min / max` about -0.07 for N(0, 1) inputs), far
    /// inside it; a symmetric input has `min / max` near -1, far outside.
    pub k: f64,
}

impl Default for MixupConfig {
    fn default() -> Self {
        Self { mixup_sign: true, rule: MixupRule::Either, k: 0.5 }
    }
}

impl MixupConfig {
    /// Usage errors name the key as `{section}.{key}`.
    pub fn validate(&self, section: &str) -> Result<()> {
        if !(self.k.is_finite() && (0.0..=1.0).contains(&self.k)) {
            let key = if section.is_empty() { "k".to_string() } else { format!("{section}.k") };
            usage!("{key} = {} is out of range: it must be in [0, 1]", self.k);
        }
        Ok(())
    }

    /// Classifies an input from its calibration statistics and whether it follows SiLU/GELU.
    pub fn classify(&self, stats: &ActStats, follows_silu_or_gelu: bool) -> SignClass {
        classify(self.rule, self.k, follows_silu_or_gelu, stats)
    }
}

/// The statistical condition: `max > 0` and `min >= -k * max`. Empty statistics are not
/// asymmetric.
pub fn is_asymmetric(stats: &ActStats, k: f64) -> bool {
    stats.count > 0 && stats.max > 0.0 && stats.min as f64 >= -k * stats.max as f64
}

/// Applies `rule`; `follows_silu_or_gelu` is the structural fact the caller knows about the
/// model, `stats` the calibration statistics of the layer's input.
pub fn classify(rule: MixupRule, k: f64, follows_silu_or_gelu: bool, stats: &ActStats) -> SignClass {
    let structural = follows_silu_or_gelu;
    let statistical = || is_asymmetric(stats, k);
    let anomalous = match rule {
        MixupRule::Structural => structural,
        MixupRule::Statistical => statistical(),
        MixupRule::Both => structural && statistical(),
        MixupRule::Either => structural || statistical(),
    };
    if anomalous { SignClass::Anomalous } else { SignClass::Normal }
}

/// The activation quantizer chosen for one layer input.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActivationChoice {
    /// Canonical spec of the chosen format (`ueXmY` or `eXmY`).
    pub spec: String,
    /// Per-tensor scale.
    pub scale: f32,
    /// Zero point (unsigned formats only).
    pub zero_point: Option<f32>,
    /// The clipping ratio the search picked.
    pub ratio: f32,
    pub class: SignClass,
    /// Tensor MSE of the chosen quantizer on the reservoir sample.
    pub error: f64,
    /// Every candidate format's best error on the sample.
    pub candidates: Vec<FormatError>,
}

/// Picks the activation format of one layer input: with `mixup_sign`, anomalous inputs get the
/// best unsigned FP with a zero point (format search over the `ueXmY` splits of `bits`) and
/// normal inputs the best signed FP (`eXmY` splits); without it, signed FP everywhere.
///
/// The search runs per tensor on the reservoir sample of `stats` with the tensor-MSE objective
/// (a sample has no structure a layer could run on), with `cfg`'s grids; `cfg.granularity` is
/// not used.
pub fn choose_activation_format(
    stats: &ActStats,
    class: SignClass,
    bits: u32,
    cfg: &CalibConfig,
    mixup_sign: bool,
) -> Result<ActivationChoice> {
    let sample = stats.sample();
    if sample.is_empty() {
        runtime!("no finite activation values were observed: cannot choose a format");
    }
    let unsigned = mixup_sign && class == SignClass::Anomalous;
    let cfg = CalibConfig { granularity: Granularity::PerTensor, ..cfg.clone() };
    let search = search_fp_formats(bits, !unsigned, sample, &[sample.len()], &cfg, &Objective::TensorMse)?;
    let best = search.best;
    Ok(ActivationChoice {
        spec: best.spec,
        scale: best.scales[0],
        zero_point: best.zero_points.map(|z| z[0]),
        ratio: best.ratios[0],
        class,
        error: best.error,
        candidates: search.errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::quant::calib::tests::silu;
    use crate::quant::format::Format;
    use crate::rng::SeededRng;

    fn stats(values: &[f32]) -> ActStats {
        let mut s = ActStats::new(8192, 0);
        s.observe(values);
        s
    }

    fn small_cfg() -> CalibConfig {
        CalibConfig { clip_grid: 40, zero_point_grid: 10, ..CalibConfig::default() }
    }

    #[test]
    fn rules_classify_silu_as_anomalous_and_gaussian_as_normal() {
        let mut rng = SeededRng::new(17);
        let gauss = rng.normals(10_000);
        let silu_out: Vec<f32> = gauss.iter().map(|&x| silu(x)).collect();
        let (s_silu, s_gauss) = (stats(&silu_out), stats(&gauss));
        assert!(s_silu.min > -0.279 && s_silu.min < -0.27, "{}", s_silu.min);
        use MixupRule::*;
        use SignClass::*;
        // (rule, follows SiLU?, stats, expected)
        let cases = [
            (Structural, true, &s_silu, Anomalous),
            (Structural, false, &s_silu, Normal),
            (Structural, false, &s_gauss, Normal),
            (Structural, true, &s_gauss, Anomalous),
            (Statistical, false, &s_silu, Anomalous),
            (Statistical, true, &s_gauss, Normal),
            (Statistical, false, &s_gauss, Normal),
            (Both, true, &s_silu, Anomalous),
            (Both, false, &s_silu, Normal),
            (Both, true, &s_gauss, Normal),
            (Either, false, &s_silu, Anomalous),
            (Either, true, &s_gauss, Anomalous),
            (Either, false, &s_gauss, Normal),
        ];
        for (rule, follows, st, want) in cases {
            assert_eq!(
                classify(rule, 0.5, follows, st),
                want,
                "{rule:?} follows={follows} min={} max={}",
                st.min,
                st.max
            );
        }
        // The threshold k: SiLU's min/max ratio is about -0.07 here.
        assert_eq!(classify(Statistical, 0.01, false, &s_silu), Normal);
        let lopsided = stats(&[-1.0, 0.5, 2.0]);
        assert_eq!(classify(Statistical, 0.5, false, &lopsided), Anomalous);
        assert_eq!(classify(Statistical, 0.4, false, &lopsided), Normal);
        // Empty or non-positive statistics are never asymmetric.
        assert_eq!(classify(Statistical, 0.5, false, &ActStats::new(8, 0)), Normal);
        assert_eq!(classify(Statistical, 0.5, false, &stats(&[-1.0, -0.5])), Normal);
        let cfg = MixupConfig::default();
        assert_eq!(cfg.classify(&s_silu, false), Anomalous);
    }

    #[test]
    fn mixup_config_parses_and_validates() {
        let c: MixupConfig = toml::from_str("rule = \"both\"\nk = 0.25").unwrap();
        assert_eq!((c.rule, c.k, c.mixup_sign), (MixupRule::Both, 0.25, true));
        assert_eq!(toml::from_str::<MixupConfig>("").unwrap(), MixupConfig::default());
        assert!(toml::from_str::<MixupConfig>("rule = \"sometimes\"").is_err());
        assert!(toml::from_str::<MixupConfig>("kk = 1").is_err());
        let e = MixupConfig { k: 1.5, ..MixupConfig::default() }.validate("quant.mixup").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Usage);
        assert!(e.message.starts_with("quant.mixup.k = 1.5"), "{}", e.message);
    }

    #[test]
    fn activation_format_follows_the_class() {
        let mut rng = SeededRng::new(23);
        let gauss = rng.normals(6000);
        let silu_out: Vec<f32> = gauss.iter().map(|&x| silu(x)).collect();
        let mix = MixupConfig::default();
        let cfg = small_cfg();

        let s = stats(&silu_out);
        let class = mix.classify(&s, true);
        assert_eq!(class, SignClass::Anomalous);
        let aal = choose_activation_format(&s, class, 4, &cfg, true).unwrap();
        let f = Format::parse(&aal.spec).unwrap();
        assert!(!f.signed() && f.bits() == 4, "{}", aal.spec);
        let z = aal.zero_point.expect("unsigned gets a zero point");
        assert!((s.min..=0.0).contains(&z), "z {z}");
        assert_eq!(aal.candidates.len(), 4);
        assert!(aal.candidates.iter().all(|c| c.spec.starts_with("ue")));

        // Without mixup-sign the same input gets signed FP, with a larger error.
        let plain = choose_activation_format(&s, class, 4, &cfg, false).unwrap();
        let f = Format::parse(&plain.spec).unwrap();
        assert!(f.signed() && f.bits() == 4, "{}", plain.spec);
        assert_eq!(plain.zero_point, None);
        assert_eq!(plain.candidates.len(), 3);
        assert!(aal.error < plain.error, "{} vs {}", aal.error, plain.error);
        eprintln!(
            "SiLU input: mixup-sign {} (MSE {:.3e}) vs signed {} (MSE {:.3e})",
            aal.spec, aal.error, plain.spec, plain.error
        );

        let g = stats(&gauss);
        let class = mix.classify(&g, false);
        assert_eq!(class, SignClass::Normal);
        let nal = choose_activation_format(&g, class, 4, &cfg, true).unwrap();
        assert!(Format::parse(&nal.spec).unwrap().signed(), "{}", nal.spec);
        assert_eq!(nal.class, SignClass::Normal);

        // 6- and 8-bit widths work the same way.
        let six = choose_activation_format(&s, SignClass::Anomalous, 6, &cfg, true).unwrap();
        assert!(six.spec.starts_with("ue") && six.candidates.len() == 6);
        assert!(six.error < aal.error);

        let e = choose_activation_format(&ActStats::new(8, 0), class, 4, &cfg, true).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Runtime);
        assert!(choose_activation_format(&g, class, 5, &cfg, true).is_err());
    }
}
