//! Post-training calibration (PTQ): attaches observers to a model's quant sites, lets the caller
//! run the model over calibration inputs spanning the timesteps, then searches every layer's
//! formats, clipping ranges and zero points (MSFP's mixup-sign initialisation) and installs the
//! quantizers. The plan it follows is `quant::plan`; the searches are `quant::calib`.

use burn::tensor::{Tensor, TensorData};

use crate::error::{Error, Result};
use crate::models::Denoiser;
use crate::quant::calib::{CalibConfig, Granularity, Objective, search_clipping, search_fp_formats};
use crate::quant::format::Format;
use crate::quant::layer::{ActQuant, LayerQuant, Observer, SlotStats, WeightQuant};
use crate::quant::mixup::{MixupConfig, SignClass, choose_activation_format};
use crate::quant::plan::{FormatChoice, LayerPlan, QuantConfig, SiteReport};

/// Post-training calibration of `model` in place. `run` must push calibration inputs through
/// the model (e.g. teacher sampling trajectories over the timesteps); every quantized layer's
/// inputs are observed, then formats, scales and zero points are searched.
pub fn calibrate(
    model: &mut Denoiser,
    quant: &QuantConfig,
    calib: &CalibConfig,
    mixup: &MixupConfig,
    timesteps: usize,
    seed: u64,
    run: impl FnOnce(&Denoiser) -> Result<()>,
) -> Result<Vec<SiteReport>> {
    quant.validate("quant")?;
    calib.validate("calib")?;
    mixup.validate("mixup")?;
    let mut plans: Vec<(LayerPlan, Option<Observer>)> = Vec::new();
    let rotate: Vec<glob::Pattern> =
        quant.hadamard.iter().filter_map(|g| glob::Pattern::new(g).ok()).collect();
    for (i, mut site) in model.quant_sites().into_iter().enumerate() {
        if rotate.iter().any(|g| g.matches(&site.path)) {
            let refuse = |what: &str| {
                Error::usage(format!(
                    "quant.hadamard matches `{}`, {what}: the transform applies to linear layers",
                    site.path
                ))
            };
            let width = match &site.layer {
                crate::nn::site::LayerMut::Linear(l) => l.d_in(),
                crate::nn::site::LayerMut::Conv2d(_) => return Err(refuse("a convolution")),
                crate::nn::site::LayerMut::Matmul(..) => return Err(refuse("an attention matmul input")),
            };
            let spec = crate::quant::hadamard::HadamardSpec::for_width(
                width,
                seed ^ (crate::rng::stream::HADAMARD_SIGNS + i as u64),
            )
            .ok_or_else(|| refuse(&format!("whose input width {width} is odd")))?;
            site.layer.set_hadamard(spec)?;
        }
        let mut plan = quant.resolve(&site.path)?;
        if !site.layer.has_weight() {
            plan.weight = FormatChoice::None;
            if !quant.attention_matmuls {
                plan.act = FormatChoice::None;
            }
        }
        let observer = (plan.act != FormatChoice::None).then(|| {
            let stats = SlotStats::new(
                quant.act_timestep_slots,
                timesteps,
                calib.sample_size,
                seed.wrapping_add(i as u64),
            );
            std::sync::Arc::new(std::sync::Mutex::new(stats))
        });
        *site.layer.quant_mut() = observer.clone().map(|o| LayerQuant {
            weight: None,
            act: None,
            observer: Some(o),
            weight_sets: None,
        });
        plans.push((plan, observer));
    }
    run(model)?;

    let mut reports = Vec::new();
    for (mut site, (plan, observer)) in model.quant_sites().into_iter().zip(plans) {
        if !site.layer.has_weight() && plan.act == FormatChoice::None {
            continue; // an attention matmul input left in full precision: not part of the plan
        }
        let mut report =
            SiteReport { path: site.path.clone(), hadamard: site.layer.hadamard(), ..Default::default() };
        let device = site.layer.device();
        let weight = match &plan.weight {
            FormatChoice::None => None,
            choice => {
                let w = site.layer.weight_host();
                let rows = w.shape[0];
                let fan_in = w.data.len() / rows;
                let mat = [rows, fan_in];
                let w = w.data;
                let g = plan.weight_group_size;
                let grouped = g > 0 && fan_in.is_multiple_of(g);
                if g > 0 && !grouped {
                    tracing::warn!(
                        "`{}`: weight group size {g} does not divide its fan-in {fan_in}; per-channel scales",
                        site.path
                    );
                }
                let cfg = CalibConfig {
                    granularity: if grouped { Granularity::PerGroup } else { Granularity::PerChannel },
                    group_size: if grouped { g } else { calib.group_size },
                    ..calib.clone()
                };
                let best = match choice {
                    FormatChoice::Fixed(f) => search_clipping(f, &w, &mat, &cfg, &Objective::TensorMse)?,
                    FormatChoice::SearchFp(bits) => {
                        search_fp_formats(*bits, true, &w, &mat, &cfg, &Objective::TensorMse)?.best
                    }
                    FormatChoice::None => unreachable!(),
                };
                report.weight_format = Some(best.spec.clone());
                report.weight_error = Some(best.error);
                let n = best.scales.len();
                let scale = Tensor::<1>::from_data(TensorData::new(best.scales.clone(), [n]), &device);
                let format = Format::parse(&best.spec)?;
                if grouped {
                    report.weight_group_size = Some(g);
                    Some(WeightQuant::grouped(format, scale, g))
                } else {
                    Some(WeightQuant::new(format, scale))
                }
            }
        };
        let act = match (&plan.act, observer) {
            (FormatChoice::None, _) | (_, None) => None,
            (choice, Some(obs)) => {
                let slot_stats = obs.lock().expect("observer lock").clone();
                let stats = slot_stats.all.clone();
                if stats.count == 0 {
                    return Err(Error::runtime(format!(
                        "calibration never reached layer `{}`: the calibration run must call the model",
                        site.path
                    )));
                }
                // A rotated input mixes every feature of its block: no longer one-signed.
                let class = mixup.classify(&stats, site.after_activation && report.hadamard.is_none());
                let (spec, scale, zero, error) = match choice {
                    FormatChoice::Fixed(f) => {
                        let r = search_clipping(
                            f,
                            stats.sample(),
                            &[stats.sample().len()],
                            &CalibConfig { granularity: Granularity::PerTensor, ..calib.clone() },
                            &Objective::TensorMse,
                        )?;
                        (r.spec.clone(), r.scales[0], r.zero_points.as_ref().map(|z| z[0]), r.error)
                    }
                    FormatChoice::SearchFp(bits) => {
                        let c = choose_activation_format(&stats, class, *bits, calib, mixup.mixup_sign)?;
                        (c.spec, c.scale, c.zero_point, c.error)
                    }
                    FormatChoice::None => unreachable!(),
                };
                report.act_format = Some(spec.clone());
                report.act_class = Some(match class {
                    SignClass::Anomalous => "AAL".into(),
                    SignClass::Normal => "NAL".into(),
                });
                report.act_scale = Some(scale);
                report.act_zero_point = zero;
                report.act_error = Some(error);
                report.act_min = Some(stats.min);
                report.act_max = Some(stats.max);
                // One scale (and zero point) per timestep slot: the format is the one chosen on
                // all timesteps, the clipping is searched again on each slot's own inputs (a slot
                // the calibration never reached keeps the overall values).
                let format = Format::parse(&spec)?;
                let slots = quant.act_timestep_slots;
                let (mut scales, mut zeros) = (vec![scale; slots], zero.map(|z| vec![z; slots]));
                for (k, s) in slot_stats.slots.iter().enumerate().filter(|(_, s)| s.count > 0) {
                    let r = search_clipping(
                        &format,
                        s.sample(),
                        &[s.sample().len()],
                        &CalibConfig { granularity: Granularity::PerTensor, ..calib.clone() },
                        &Objective::TensorMse,
                    )?;
                    scales[k] = r.scales[0];
                    if let (Some(z), Some(rz)) = (zeros.as_mut(), r.zero_points.as_ref()) {
                        z[k] = rz[0];
                    }
                }
                if slots > 1 {
                    report.act_slot_scales = Some(scales.clone());
                    report.act_slot_zero_points = zeros.clone();
                }
                let scales = Tensor::<1>::from_data(TensorData::new(scales, [slots]), &device);
                let zeros = zeros.map(|z| Tensor::<1>::from_data(TensorData::new(z, [slots]), &device));
                Some(ActQuant::new(format, scales, zeros, timesteps))
            }
        };
        *site.layer.quant_mut() = (weight.is_some() || act.is_some()).then_some(LayerQuant {
            weight,
            act,
            observer: None,
            weight_sets: None,
        });
        reports.push(report);
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::StepCtx;
    use crate::pipeline::config::ModelConfig;
    use crate::quant::plan::LayerOverride;
    use crate::rng::SeededRng;
    use burn::tensor::{Device, Int};

    fn tiny_unet(device: &Device) -> Denoiser {
        Denoiser::new(&ModelConfig::test_unet(), &mut SeededRng::new(0), device)
    }

    fn batch(device: &Device) -> (Tensor<4>, Tensor<1>, Tensor<1, Int>) {
        let x =
            Tensor::from_data(TensorData::new(SeededRng::new(5).normals(2 * 1024), [2, 1, 32, 32]), device);
        (x, Tensor::from_floats([300.0, 300.0], device), Tensor::from_ints([1, 2], device))
    }

    #[test]
    fn w4a4_calibration_quantizes_every_site_with_mixup_sign() {
        let device = Device::flex();
        let mut model = tiny_unet(&device);
        let (x, t, y) = batch(&device);
        let fp = model.forward(x.clone(), t.clone(), y.clone(), &StepCtx::at(300));
        let quant = QuantConfig {
            layers: vec![
                LayerOverride {
                    pattern: "conv_in".into(),
                    weight: Some("e4m3".into()),
                    act: Some("e4m3".into()),
                    ..Default::default()
                },
                LayerOverride { pattern: "time_embed_*".into(), skip: true, ..Default::default() },
            ],
            ..Default::default()
        };
        let calib =
            CalibConfig { clip_grid: 20, zero_point_grid: 5, sample_size: 4096, ..Default::default() };
        let reports = calibrate(&mut model, &quant, &calib, &MixupConfig::default(), 1000, 0, |m| {
            for t in [900.0, 500.0, 100.0] {
                let tt = Tensor::from_floats([t, t], &device);
                m.forward(x.clone(), tt, y.clone(), &StepCtx::at(t as usize));
            }
            Ok(())
        })
        .unwrap();
        let find = |p: &str| reports.iter().find(|r| r.path == p).unwrap_or_else(|| panic!("{p}"));
        assert_eq!(find("conv_in").weight_format.as_deref(), Some("e4m3"));
        assert_eq!(find("conv_in").act_format.as_deref(), Some("e4m3"));
        assert_eq!(find("time_embed_1").weight_format, None, "skipped");
        // After SiLU: anomalous, unsigned 4-bit FP with a zero point; attention input: signed.
        let conv1 = find("down.0.res.conv1");
        assert_eq!(conv1.act_class.as_deref(), Some("AAL"));
        assert!(conv1.act_format.as_deref().unwrap().starts_with("ue"), "{conv1:?}");
        assert!(conv1.act_zero_point.unwrap() < 0.0);
        let qkv = find("down.1.attn.attn.qkv");
        assert!(qkv.act_format.as_deref().unwrap().starts_with('e'), "{qkv:?}");
        assert!(
            reports.iter().filter(|r| r.weight_format.is_some()).all(|r| r
                .weight_format
                .as_ref()
                .unwrap()
                .len()
                == 4)
        );
        assert!(!reports.iter().any(|r| is_matmul_input(&r.path)), "matmul inputs stay off by default");
        let q = model.forward(x, t, y, &StepCtx::at(300));
        let diff = (q.clone() - fp).abs().max().into_scalar::<f32>();
        assert!(diff > 1e-4 && q.abs().max().into_scalar::<f32>().is_finite(), "{diff}");
    }

    /// `quant.hadamard` rotates the matching linear layers before calibration (recorded in their
    /// reports; full precision unchanged) and refuses a convolution with a usage error.
    #[test]
    fn hadamard_globs_rotate_linear_layers_and_refuse_convolutions() {
        let device = Device::flex();
        let (x, t, y) = batch(&device);
        let run = |hadamard: Vec<&str>| {
            let mut model = tiny_unet(&device);
            let quant = QuantConfig {
                hadamard: hadamard.into_iter().map(String::from).collect(),
                ..Default::default()
            };
            let calib =
                CalibConfig { clip_grid: 5, zero_point_grid: 3, sample_size: 512, ..Default::default() };
            let mut fp = None;
            let reports = calibrate(&mut model, &quant, &calib, &MixupConfig::default(), 1000, 0, |m| {
                fp = Some(m.forward(x.clone(), t.clone(), y.clone(), &StepCtx::at(300)));
                Ok(())
            });
            reports.map(|r| (r, crate::base::params::host_values(fp.unwrap())))
        };
        let (plain, fp_plain) = run(vec![]).unwrap();
        let (rotated, fp_rotated) = run(vec!["*.attn.qkv", "*.attn.proj", "time_embed_2"]).unwrap();
        let specs: Vec<&str> =
            rotated.iter().filter(|r| r.hadamard.is_some()).map(|r| r.path.as_str()).collect();
        assert_eq!(specs.len(), 9, "four attentions' qkv and proj, and time_embed_2: {specs:?}");
        assert!(specs.iter().all(|p| p.ends_with(".qkv") || p.ends_with(".proj") || *p == "time_embed_2"));
        assert!(plain.iter().all(|r| r.hadamard.is_none()));
        let te2 = rotated.iter().find(|r| r.path == "time_embed_2").unwrap();
        assert_eq!(te2.act_class.as_deref(), Some("NAL"), "a rotated SiLU output is not one-signed");
        // Calibration observed the rotated model, whose full-precision output is the same.
        for (a, b) in fp_plain.iter().zip(&fp_rotated) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
        }
        let err = run(vec!["conv_in"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("conv_in") && err.to_string().contains("linear"), "{err}");
    }

    #[test]
    fn grouped_weight_scales_lower_the_weight_error() {
        let device = Device::flex();
        let (x, t, y) = batch(&device);
        let calib =
            CalibConfig { clip_grid: 10, zero_point_grid: 3, sample_size: 1024, ..Default::default() };
        let mut errors = Vec::new();
        for weight_group_size in [0, 8] {
            let mut model = tiny_unet(&device);
            let quant = QuantConfig { weight_group_size, ..Default::default() };
            let reports = calibrate(&mut model, &quant, &calib, &MixupConfig::default(), 1000, 0, |m| {
                m.forward(x.clone(), t.clone(), y.clone(), &StepCtx::at(300));
                Ok(())
            })
            .unwrap();
            let find = |p: &str| reports.iter().find(|r| r.path == p).unwrap().clone();
            if weight_group_size > 0 {
                // conv_in's fan-in is 9: per channel; a 3x3 conv of 8 channels: 72 / 8 groups.
                assert_eq!(find("conv_in").weight_group_size, None);
                assert_eq!(find("down.0.res.conv1").weight_group_size, Some(8));
                let site = model.quant_sites().into_iter().find(|s| s.path == "down.0.res.conv1").unwrap();
                assert_eq!(site.layer.quant().unwrap().weight.as_ref().unwrap().scale.dims(), [8 * 72 / 8]);
                let out = model.forward(x.clone(), t.clone(), y.clone(), &StepCtx::at(300));
                assert!(out.abs().max().into_scalar::<f32>().is_finite());
            }
            errors.push(reports.iter().filter_map(|r| r.weight_error).sum::<f64>());
        }
        assert!(errors[1] < errors[0], "per-group {} vs per-channel {}", errors[1], errors[0]);
    }

    fn is_matmul_input(path: &str) -> bool {
        [".q_in", ".k_in", ".probs_in", ".v_in"].iter().any(|s| path.ends_with(s))
    }

    #[test]
    fn attention_matmul_inputs_are_calibrated_when_asked() {
        let device = Device::flex();
        let (x, t, y) = batch(&device);
        let calib =
            CalibConfig { clip_grid: 10, zero_point_grid: 5, sample_size: 4096, ..Default::default() };
        let mut outputs = Vec::new();
        for attention_matmuls in [false, true] {
            let mut model = tiny_unet(&device);
            let quant = QuantConfig { attention_matmuls, ..Default::default() };
            let reports = calibrate(&mut model, &quant, &calib, &MixupConfig::default(), 1000, 0, |m| {
                m.forward(x.clone(), t.clone(), y.clone(), &StepCtx::at(300));
                Ok(())
            })
            .unwrap();
            let inputs: Vec<&SiteReport> = reports.iter().filter(|r| is_matmul_input(&r.path)).collect();
            if attention_matmuls {
                let paths: Vec<&str> = inputs.iter().map(|r| r.path.as_str()).collect();
                assert!(
                    paths.contains(&"mid_attn.attn.q_in") && paths.contains(&"mid_attn.attn.v_in"),
                    "{paths:?}"
                );
                assert!(inputs.iter().all(|r| r.weight_format.is_none() && r.act_format.is_some()));
                // Softmax probabilities are one-sided: unsigned FP; queries are signed.
                let probs = inputs.iter().find(|r| r.path == "mid_attn.attn.probs_in").unwrap();
                assert_eq!(probs.act_class.as_deref(), Some("AAL"));
                assert!(probs.act_format.as_deref().unwrap().starts_with("ue"), "{probs:?}");
                assert!(probs.act_min.unwrap() >= 0.0 && probs.act_max.unwrap() <= 1.0);
                let q = inputs.iter().find(|r| r.path == "mid_attn.attn.q_in").unwrap();
                assert!(q.act_format.as_deref().unwrap().starts_with('e'), "{q:?}");
            } else {
                assert!(inputs.is_empty());
            }
            outputs.push(model.forward(x.clone(), t.clone(), y.clone(), &StepCtx::at(300)));
        }
        let diff = (outputs[1].clone() - outputs[0].clone()).abs().max().into_scalar::<f32>();
        assert!(diff > 1e-5, "quantizing the matmul inputs changes the output ({diff})");
    }

    #[test]
    fn timestep_slots_get_their_own_calibrated_scales() {
        let device = Device::flex();
        let mut model = tiny_unet(&device);
        let (x, _, y) = batch(&device);
        let quant = QuantConfig { act_timestep_slots: 2, ..Default::default() };
        let calib =
            CalibConfig { clip_grid: 10, zero_point_grid: 3, sample_size: 2048, ..Default::default() };
        // Slot 0 sees small inputs, slot 1 inputs ten times larger.
        let reports = calibrate(&mut model, &quant, &calib, &MixupConfig::default(), 1000, 0, |m| {
            for (t, gain) in [(100usize, 0.1f32), (900, 1.0)] {
                let tt = Tensor::from_floats([t as f32, t as f32], &device);
                m.forward(x.clone() * gain, tt, y.clone(), &StepCtx::at(t));
            }
            Ok(())
        })
        .unwrap();
        let conv_in = reports.iter().find(|r| r.path == "conv_in").unwrap();
        let scales = conv_in.act_slot_scales.as_ref().expect("per-slot scales");
        assert!(scales[1] > 5.0 * scales[0], "{scales:?}");
        // The layer carries them, selected by the timestep.
        let site = model.quant_sites().into_iter().find(|s| s.path == "conv_in").unwrap();
        let act = site.layer.quant().unwrap().act.as_ref().unwrap();
        assert_eq!(crate::base::params::host_values(act.scale.val()), *scales);
    }
}
