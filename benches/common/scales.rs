//! Plausible quantizer scales for the benches' uncalibrated students: the cost of a quantized
//! forward or QAT step does not depend on the values, only on their being in range.

use burn::tensor::{Tensor, TensorData};
use msfp::models::Denoiser;
use msfp::rng::SeededRng;

/// Weight scales uniform in `[w, 2w)`, activation scales in `[0.5, 1)`, from one seeded stream.
pub fn plausible(model: Denoiser, w: f32) -> Denoiser {
    let mut rng = SeededRng::new(5);
    msfp::base::params::map_params(model, |path, t| {
        let n = t.dims()[0];
        let v: Vec<f32> = if path.ends_with(".quant.weight.scale") {
            (0..n).map(|_| w + w * rng.uniform()).collect()
        } else if path.ends_with(".quant.act.scale") {
            (0..n).map(|_| 0.5 + 0.5 * rng.uniform()).collect()
        } else {
            return t;
        };
        Tensor::from_data(TensorData::new(v, [n]), &t.device())
    })
}
