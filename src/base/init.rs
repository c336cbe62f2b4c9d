//! Parameter initialisation from the project's own RNG, so a seed fixes the initial weights on
//! every backend (burn's initialisers draw from the backend's generator, which differs).

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};

use crate::rng::SeededRng;

/// Uniform(-bound, bound), as PyTorch's default for Linear/Conv (bound = 1/sqrt(fan_in)).
pub fn uniform<const D: usize>(
    rng: &mut SeededRng,
    shape: [usize; D],
    bound: f32,
    device: &Device,
) -> Param<Tensor<D>> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) * bound).collect();
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

/// N(0, std^2).
pub fn normal<const D: usize>(
    rng: &mut SeededRng,
    shape: [usize; D],
    std: f32,
    device: &Device,
) -> Param<Tensor<D>> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = rng.normals(n).into_iter().map(|v| v * std).collect();
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

pub fn constant<const D: usize>(shape: [usize; D], value: f32, device: &Device) -> Param<Tensor<D>> {
    Param::from_tensor(Tensor::full(shape, value, device))
}
