//! A teacher's W4A4 student as the benches build it: signed FP4 e2m1 weights per output channel,
//! unsigned ue2m2 + zero point inputs after SiLU/GELU/softmax and e2m1 elsewhere, the first and
//! last layers at e4m3, the given TALoRA, and plausible scales instead of calibrated ones (the
//! cost does not depend on the values); adapters and quantizer scales trainable.

#![allow(dead_code)] // each bench uses part of it

use msfp::base::params;
use msfp::lora::LoraConfig;
use msfp::models::Denoiser;
use msfp::pipeline::student::{self, ParamGroups, StudentPlan};
use msfp::quant::plan::SiteReport;

#[path = "scales.rs"]
mod scales;

/// The student built on `teacher`'s own weights (autodiff enabled on the same tensors, so the
/// frozen base weights are one copy in memory), its plan (for export) and its number of
/// trainable parameters. `eight_bit` names the layers kept at e4m3.
pub fn w4a4(
    teacher: Denoiser,
    lora: LoraConfig,
    eight_bit: impl Fn(&str) -> bool,
) -> (Denoiser, StudentPlan, usize) {
    use burn::module::Module;
    let mut model = teacher.train();
    let sites: Vec<SiteReport> = model
        .quant_sites()
        .into_iter()
        .filter(|s| s.layer.has_weight())
        .map(|s| SiteReport {
            weight_format: Some(if eight_bit(&s.path) { "e4m3" } else { "e2m1" }.into()),
            act_format: Some(match (eight_bit(&s.path), s.after_activation) {
                (true, _) => "e4m3".into(),
                (false, true) => "ue2m2".into(),
                (false, false) => "e2m1".into(),
            }),
            act_zero_point: s.after_activation.then_some(-0.28),
            path: s.path,
            ..Default::default()
        })
        .collect();
    let plan = StudentPlan { sites, act_timestep_slots: 1, timesteps: 1000, lora };
    student::build(&mut model, &plan, 0).expect("student");
    let mut model = scales::plausible(model, 0.01);
    let groups = ParamGroups::of(&mut model);
    let model = params::set_trainable(model, |p| groups.group(p).is_some());
    let trainable = params::collect_trainable(&model).values().map(|t| t.data.len()).sum();
    (model, plan, trainable)
}
