//! What one W4A4 QAT step of the tiny SD student asks of a GPU: the compute kernels it launches
//! (counted by name through CubeCL's launch observer) and the reads to the host msfp issues
//! (each waits for the device to drain). The student is the SD job's (`configs/msfp_sd_tiny.toml`'s
//! UNet from its fixture, W4A4 with TALoRA branch adapters as in `sd14.rs`), batch 2
//! (conditional + unconditional) at latent 8, one step = forward, MSE, backward, AdamW, counted
//! phase by phase. Steps run until the counts repeat (the first compiles kernels); three more
//! are timed. Used by `launches_wgpu` (lavapipe: counts hold on any GPU) and the GPU check.

#![allow(dead_code)] // each bench uses part of it

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::tensor::{Device, Tensor};
use burn_cubecl::cubecl::config::{TypeNameFormatLevel, type_name_format};
use burn_cubecl::cubecl::logging::{LaunchObservation, LaunchObserver};
use msfp::base::params;

use super::sd14;

/// Launches by kernel name.
#[derive(Default)]
struct Launches(Mutex<BTreeMap<&'static str, usize>>);

impl LaunchObserver for Launches {
    fn launched(&self, kernel: &'static str) {
        *self.0.lock().expect("counter").entry(kernel).or_default() += 1;
    }
}

/// The counts and times of the tiny-SD QAT step on `device` (named `spec`), as JSON.
pub fn tiny_sd_step(spec: &str, device: &Device) -> serde_json::Value {
    let cfg = msfp::Config::load(Path::new("configs/msfp_sd_tiny.toml"), &[])
        .expect("configs/msfp_sd_tiny.toml (run from the repository root)");
    let ad = device.clone().autodiff();
    let teacher = msfp::models::registry::load_denoiser(&cfg.model, None, &ad).expect("tiny SD UNet");
    let (mut model, _, trainable) = sd14::student_of(teacher, &cfg);
    let latent = 8;
    let inputs = sd14::Inputs::with_context(2, latent, 32, &ad);
    let mut optim = msfp::train::optim::AdamW::new(0.0, 1.0);

    // One observed step, phase by phase as `sd14::qat_step` runs it: launches by short kernel
    // name per phase (forward with the loss, backward, optimizer with the step's read), and the
    // host reads.
    // Only the student's trainable parameters have gradients.
    let lr = |_: &str| 1e-5;
    let mut observe = |model: msfp::models::Denoiser| {
        let reads = msfp::base::params::host_reads();
        let mut phases = Vec::new();
        let started = std::time::Instant::now();
        let mut phase = |f: &mut dyn FnMut()| {
            device.sync().expect("device sync");
            let launches = Arc::new(Launches::default());
            let guard = LaunchObservation::new(launches.clone());
            f();
            device.sync().expect("device sync");
            drop(guard);
            let mut by_name = BTreeMap::<String, usize>::new();
            for (kernel, n) in launches.0.lock().expect("counter").iter() {
                *by_name.entry(type_name_format(kernel, TypeNameFormatLevel::Short)).or_default() += n;
            }
            phases.push(by_name);
        };
        let mut loss = None;
        phase(&mut || loss = Some((inputs.forward(&model) - inputs.target.clone()).square().mean()));
        let loss = loss.expect("loss");
        let mut grads = None;
        phase(&mut || grads = Some(params::collect_grads(&model, &loss.backward())));
        let mut next = None;
        let mut model = Some(model);
        phase(&mut || {
            let (m, squared) =
                optim
                    .step_deferred(model.take().expect("model"), grads.take().expect("grads"), lr, |_| false);
            let _ = params::host_values(Tensor::cat(vec![loss.clone().inner().reshape([1]), squared], 0));
            next = Some(m);
        });
        let seconds = started.elapsed().as_secs_f64();
        (next.expect("stepped"), phases, msfp::base::params::host_reads() - reads, seconds)
    };
    let names = ["forward", "backward", "optimizer"];
    let mut steps: Vec<(Vec<BTreeMap<String, usize>>, usize)> = Vec::new();
    let mut seconds = Vec::new();
    for _ in 0..6 {
        let (next, phases, reads, s) = observe(model);
        model = next;
        let total: usize = phases.iter().flat_map(|p| p.values()).sum();
        eprintln!("step {}: {total} launches, {reads} host reads, {s:.3} s", steps.len() + 1);
        let repeated = steps.last().is_some_and(|(last, r)| last == &phases && *r == reads);
        steps.push((phases, reads));
        seconds.push(s);
        if repeated {
            break;
        }
    }
    // Wall time of further steps (each ends with a sync), after the counted ones.
    for _ in 0..3 {
        let (next, _, _, s) = observe(model);
        model = next;
        seconds.push(s);
    }
    let (phases, reads) = steps.last().cloned().expect("a step");
    let sum = |m: &BTreeMap<String, usize>| m.values().sum::<usize>();
    let sorted = |m: &BTreeMap<String, usize>| {
        let mut v: Vec<(&String, &usize)> = m.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        v.iter().map(|(k, n)| serde_json::json!([k, n])).collect::<Vec<_>>()
    };
    let mut all = BTreeMap::<String, usize>::new();
    for (k, n) in phases.iter().flatten() {
        *all.entry(k.clone()).or_default() += n;
    }
    serde_json::json!({
        "device": spec,
        "model": "tiny SD UNet (configs/msfp_sd_tiny.toml fixture), W4A4, TALoRA 2 x rank 16 branch",
        "batch": 2,
        "latent": [4, latent, latent],
        "trainable_parameters": trainable,
        "trainable_tensors": params::collect_trainable(&model).len(),
        "steps_observed": steps.len(),
        "launches_per_step_by_step": steps.iter().map(|(p, _)| p.iter().map(sum).sum::<usize>()).collect::<Vec<_>>(),
        "launches_per_step": sum(&all),
        "launches_per_phase": names.iter().zip(&phases).map(|(n, p)| (n.to_string(), sum(p))).collect::<BTreeMap<_, _>>(),
        "host_reads_per_step": reads,
        "step_seconds": seconds,
        "step_seconds_note": "wall time of each step with its syncs on this device; on lavapipe a CPU runs the kernels, so this is a proxy for issue and pass overhead, not a GPU's time",
        "launches_by_kernel": sorted(&all),
        "launches_by_kernel_per_phase": names.iter().zip(&phases).map(|(n, p)| (n.to_string(), sorted(p))).collect::<BTreeMap<_, _>>(),
    })
}
