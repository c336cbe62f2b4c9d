//! The GPU code path against the CPU: the tiny UNet and DiT (full precision, perturbed weights)
//! on `wgpu-cpu` (Mesa lavapipe, the wgpu backend on a machine without a GPU) give the same
//! output as on flex within 1e-4. Built only with `--features wgpu`.
#![cfg(feature = "wgpu")]

use burn::tensor::{Device, Int, Tensor, TensorData};
use msfp::config::{ModelConfig, ModelKind};
use msfp::models::Denoiser;
use msfp::nn::StepCtx;
use msfp::rng::SeededRng;

fn forward(kind: ModelKind, device: &Device) -> Vec<f32> {
    let mut cfg = ModelConfig { kind, ..Default::default() };
    cfg.unet.base_channels = 8;
    cfg.unet.channel_mult = vec![1, 2];
    cfg.unet.attention_heads = 2;
    cfg.unet.groups = 4;
    cfg.dit.hidden = 32;
    cfg.dit.depth = 2;
    cfg.dit.heads = 2;
    // Weights come from the host RNG, so both devices build the same model; a deterministic
    // perturbation wakes up the DiT's zero-initialised (adaLN-Zero) layers.
    let model = Denoiser::new(&cfg, &mut SeededRng::new(3), device);
    let model = msfp::train::params::map_params(model, |_, t| {
        let n = t.dims()[0];
        let v: Vec<f32> = msfp::train::params::host_values(t.clone())
            .iter()
            .enumerate()
            .map(|(i, x)| x + 0.02 * (i as f32 * 0.37).sin())
            .collect();
        Tensor::from_data(TensorData::new(v, [n]), &t.device())
    });
    let x =
        Tensor::<4>::from_data(TensorData::new(SeededRng::new(4).normals(2 * 1024), [2, 1, 32, 32]), device);
    let t = Tensor::<1>::from_floats([250.0, 750.0], device);
    let y = Tensor::<1, Int>::from_ints([1, 10], device);
    model.forward(x, t, y, &StepCtx::default()).into_data().try_into_vec::<f32>().expect("f32")
}

#[test]
fn tiny_models_on_wgpu_cpu_match_flex() {
    let gpu = match msfp::device::make_device("wgpu-cpu") {
        Ok(d) => d,
        Err(e) => panic!("wgpu-cpu is not available ({e}); install mesa-vulkan-drivers"),
    };
    for kind in [ModelKind::TinyUnet, ModelKind::TinyDit] {
        let (a, b) = (forward(kind, &Device::flex()), forward(kind, &gpu));
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{kind:?}: max |flex - wgpu-cpu| = {diff}");
    }
}
