//! Timestep and class embeddings.

use burn::module::{Module, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::init;
use crate::rng::SeededRng;

/// Sinusoidal embedding of (possibly fractional) timesteps, `[B] -> [B, dim]`, laid out
/// `[cos | sin]` with frequencies `10000^(-i/half)` as in ADM/DiT.
pub fn timestep_embedding(t: Tensor<1>, dim: usize) -> Tensor<2> {
    sinusoidal_embedding(t, dim, 0.0, true)
}

/// The one sinusoidal timestep embedding of every model (diffusers' `get_timestep_embedding`):
/// frequencies `exp(-ln(1e4) i / (dim / 2 - shift))` (`shift`: diffusers'
/// `downscale_freq_shift`; DiT's own is 0, diffusers' DiT 1), laid out `[cos | sin]` when
/// `cos_first` (ADM, DiT, SD's `flip_sin_to_cos`), else `[sin | cos]`.
pub fn sinusoidal_embedding(t: Tensor<1>, dim: usize, shift: f32, cos_first: bool) -> Tensor<2> {
    let half = dim / 2;
    let denom = half as f32 - shift;
    let device = t.device();
    let freqs: Vec<f32> = (0..half).map(|i| (-(10000f32.ln()) * i as f32 / denom).exp()).collect();
    let freqs = Tensor::<1>::from_data(TensorData::new(freqs, [half]), &device).unsqueeze::<2>();
    let args = t.unsqueeze_dim::<2>(1) * freqs;
    let (cos, sin) = (args.clone().cos(), args.sin());
    Tensor::cat(if cos_first { vec![cos, sin] } else { vec![sin, cos] }, 1)
}

/// Class-label embedding with one extra row, the null label used by classifier-free guidance.
#[derive(Module, Debug)]
pub struct ClassEmbedding {
    /// `[num_classes + 1, dim]`; the last row is the null label.
    pub weight: Param<Tensor<2>>,
}

/// Init std of the class rows: N(0, 1), as `nn.Embedding` in LDM / guided-diffusion (DiT uses
/// 0.02). At 0.02 the tiny UNet's rows were still only 0.4-1.0 in norm after 5,000 steps and the
/// classes with the smallest rows (2 and 9) were the ones it drew wrong most often.
const INIT_STD: f32 = 1.0;

impl ClassEmbedding {
    pub fn new(num_classes: usize, dim: usize, rng: &mut SeededRng, device: &Device) -> Self {
        Self { weight: init::normal(rng, [num_classes + 1, dim], INIT_STD, device) }
    }

    /// Index of the null (unconditional) label.
    pub fn null_label(&self) -> usize {
        self.weight.dims()[0] - 1
    }

    pub fn forward(&self, labels: Tensor<1, Int>) -> Tensor<2> {
        self.weight.val().select(0, labels)
    }
}

/// A lookup table `[num, dim]` (token and position embeddings).
#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
}

impl Embedding {
    pub fn new(num: usize, dim: usize, std: f32, rng: &mut SeededRng, device: &Device) -> Self {
        Self { weight: init::normal(rng, [num, dim], std, device) }
    }

    /// Ids `[B, N]` -> `[B, N, dim]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [b, n] = ids.dims();
        let dim = self.weight.dims()[1];
        self.weight.val().select(0, ids.reshape([b * n])).reshape([b, n, dim])
    }
}
