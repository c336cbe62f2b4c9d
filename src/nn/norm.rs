//! Normalisations. They carry no weight matrix, so they are never quantized.

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};

use super::init;

/// GroupNorm with per-channel affine; eps 1e-5 as PyTorch's default unless set (SD's VAE and
/// transformer blocks use 1e-6).
#[derive(Module, Debug)]
pub struct GroupNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, device: &Device) -> Self {
        Self::with_eps(groups, channels, 1e-5, device)
    }

    pub fn with_eps(groups: usize, channels: usize, eps: f64, device: &Device) -> Self {
        Self {
            weight: init::constant([channels], 1.0, device),
            bias: init::constant([channels], 0.0, device),
            groups,
            eps,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let g = self.groups;
        let xg = x.reshape([b, g, (c / g) * h * w]);
        let mean = xg.clone().mean_dim(2);
        let centered = xg - mean;
        let var = centered.clone().square().mean_dim(2);
        let normed = (centered / (var + self.eps).sqrt()).reshape([b, c, h, w]);
        normed * self.weight.val().reshape([1, c, 1, 1]) + self.bias.val().reshape([1, c, 1, 1])
    }
}

/// LayerNorm over the last dimension without affine parameters (DiT's adaLN supplies them).
pub fn layer_norm<const D: usize>(x: Tensor<D>, eps: f64) -> Tensor<D> {
    let mean = x.clone().mean_dim(D - 1);
    let centered = x - mean;
    let var = centered.clone().square().mean_dim(D - 1);
    centered / (var + eps).sqrt()
}

/// LayerNorm over the last dimension with a learned per-feature affine (CLIP, SD's transformer
/// blocks).
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, device: &Device) -> Self {
        Self { weight: init::constant([dim], 1.0, device), bias: init::constant([dim], 0.0, device), eps }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dim = self.weight.dims()[0];
        let mut shape = [1; D];
        shape[D - 1] = dim;
        layer_norm(x, self.eps) * self.weight.val().reshape(shape) + self.bias.val().reshape(shape)
    }
}
