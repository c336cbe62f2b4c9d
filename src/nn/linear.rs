//! Fully connected layer with PyTorch's weight layout `[out, in]`, so real checkpoints load
//! without transposition and per-output-channel quantization is a per-row operation.

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};

use super::{StepCtx, init};
use crate::lora::Talora;
use crate::quant::hadamard::{Hadamard, HadamardSpec};
use crate::quant::layer::LayerQuant;
use crate::rng::SeededRng;

#[derive(Module, Debug)]
pub struct Linear {
    /// `[d_out, d_in]`.
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
    /// Weight/input quantizers; `None` is the full-precision layer.
    pub quant: Option<LayerQuant>,
    /// TALoRA adapters (fine-tuning); `None` without.
    pub lora: Option<Talora>,
    /// HQ-DiT's rotation of the input (its transpose folded into `weight`); `None` without.
    #[module(skip)]
    pub hadamard: Option<Hadamard>,
}

impl Linear {
    /// PyTorch-default initialisation.
    pub fn new(d_in: usize, d_out: usize, bias: bool, rng: &mut SeededRng, device: &Device) -> Self {
        let bound = 1.0 / (d_in as f32).sqrt();
        Self {
            weight: init::uniform(rng, [d_out, d_in], bound, device),
            bias: bias.then(|| init::uniform(rng, [d_out], bound, device)),
            quant: None,
            lora: None,
            hadamard: None,
        }
    }

    /// Zero-initialised (adaLN-Zero modulation and final layers start as the identity path).
    pub fn zeros(d_in: usize, d_out: usize, device: &Device) -> Self {
        Self {
            weight: init::constant([d_out, d_in], 0.0, device),
            bias: Some(init::constant([d_out], 0.0, device)),
            quant: None,
            lora: None,
            hadamard: None,
        }
    }

    pub fn d_out(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn d_in(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Rotates the layer's input by `spec` from now on and folds the rotation's transpose into
    /// the weight, so the full-precision output stays the same.
    pub fn set_hadamard(&mut self, spec: HadamardSpec) {
        let h = Hadamard::new(spec, self.d_in());
        self.weight = self.weight.clone().map(|w| h.rotate(w));
        self.hadamard = Some(h);
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>, ctx: &StepCtx) -> Tensor<D> {
        use crate::kernels::linear::linear;
        use crate::kernels::qweight::{Layer, quantized_layer};
        let x = match &self.hadamard {
            Some(h) => h.rotate(x),
            None => x,
        };
        let low_rank = super::branch(self.lora.as_ref()).map(|l| {
            let (down, up) = l.factors(ctx);
            linear(linear(x.clone(), down, None), up, None)
        });
        let x = match &self.quant {
            Some(q) => q.input(x, ctx),
            None => x,
        };
        let bias = self.bias.as_ref().map(|b| b.val());
        let y = match super::weight_in_op(&x.device(), self.quant.as_ref(), self.lora.as_ref()) {
            Some((scale, q)) => quantized_layer(x, self.weight.val(), scale, bias, Layer::Linear, q),
            None => {
                let w =
                    super::quantized_weight(self.weight.val(), self.quant.as_ref(), self.lora.as_ref(), ctx);
                linear(x, w, bias)
            }
        };
        match low_rank {
            Some(l) => y + l,
            None => y,
        }
    }
}
