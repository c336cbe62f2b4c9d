//! LeNet-style MNIST classifier. Its penultimate activations are the feature space of the
//! project's FID; its predictions give the class accuracy of conditional samples.

use burn::module::Module;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use crate::nn::{Conv2d, Linear, StepCtx};
use crate::rng::SeededRng;

/// Width of the feature vector used for FID.
pub const FEATURE_DIM: usize = 128;

#[derive(Module, Debug)]
pub struct Classifier {
    pub conv1: Conv2d,
    pub conv2: Conv2d,
    pub fc1: Linear,
    pub fc2: Linear,
}

fn max_pool2(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h / 2, 2, w / 2, 2]).max_dim(5).max_dim(3).reshape([b, c, h / 2, w / 2])
}

impl Classifier {
    pub fn new(rng: &mut SeededRng, device: &Device) -> Self {
        Self {
            conv1: Conv2d::new(1, 16, 5, 1, 2, rng, device),
            conv2: Conv2d::new(16, 32, 5, 1, 2, rng, device),
            fc1: Linear::new(32 * 8 * 8, FEATURE_DIM, true, rng, device),
            fc2: Linear::new(FEATURE_DIM, 10, true, rng, device),
        }
    }

    /// Pre-activation penultimate features `[B, FEATURE_DIM]` of images `[B, 1, 32, 32]` in [-1, 1].
    pub fn features(&self, x: Tensor<4>) -> Tensor<2> {
        let h = max_pool2(relu(self.conv1.forward(x, &StepCtx::default())));
        let h = max_pool2(relu(self.conv2.forward(h, &StepCtx::default())));
        let [b, _, _, _] = h.dims();
        self.fc1.forward(h.reshape([b, 32 * 8 * 8]), &StepCtx::default())
    }

    /// Class logits from features.
    pub fn logits_from_features(&self, features: Tensor<2>) -> Tensor<2> {
        self.fc2.forward(relu(features), &StepCtx::default())
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.logits_from_features(self.features(x))
    }
}
