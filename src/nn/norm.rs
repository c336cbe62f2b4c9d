//! Normalisations. They carry no weight matrix, so they are never quantized.

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};

use super::init;
use crate::kernels::norm::group_norm;
pub use crate::kernels::norm::layer_norm;

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
        group_norm(x, self.weight.val(), self.bias.val(), self.groups, self.eps, false)
    }

    /// `silu(self.forward(x))`, fused on flex (the pre-activation of every UNet convolution).
    pub fn forward_silu(&self, x: Tensor<4>) -> Tensor<4> {
        group_norm(x, self.weight.val(), self.bias.val(), self.groups, self.eps, true)
    }
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
