//! Quantization sites: every layer of a model that can carry quantizers, with its module path
//! (the same path its parameters have in checkpoints) and whether its input comes straight out of
//! a SiLU/GELU/softmax (the structural half of MSFP's anomalous-activation rule). Besides the
//! weight layers, the four inputs of each attention's matmuls are sites without a weight.

use burn::tensor::Device;

use super::attention::MatmulInput;
use super::{Conv2d, Linear};
use crate::base::params::HostTensor;
use crate::quant::layer::LayerQuant;

/// Mutable access to a quantizable layer.
pub enum LayerMut<'a> {
    Linear(&'a mut Linear),
    Conv2d(&'a mut Conv2d),
    /// An attention matmul input (activation only), with the device of its attention.
    Matmul(&'a mut MatmulInput, Device),
}

const NO_WEIGHT: &str = "an attention matmul input has no weight: callers check `has_weight` first";

impl LayerMut<'_> {
    pub fn quant_mut(&mut self) -> &mut Option<LayerQuant> {
        match self {
            LayerMut::Linear(l) => &mut l.quant,
            LayerMut::Conv2d(c) => &mut c.quant,
            LayerMut::Matmul(m, _) => &mut m.quant,
        }
    }

    /// Whether the site has a weight (a Linear or Conv2d) rather than only an input.
    pub fn has_weight(&self) -> bool {
        !matches!(self, LayerMut::Matmul(..))
    }

    pub fn quant(&self) -> Option<&LayerQuant> {
        match self {
            LayerMut::Linear(l) => l.quant.as_ref(),
            LayerMut::Conv2d(c) => c.quant.as_ref(),
            LayerMut::Matmul(m, _) => m.quant.as_ref(),
        }
    }

    /// Gives a weight layer its adapters (or takes them away).
    pub fn set_lora(&mut self, lora: Option<crate::lora::Talora>) {
        match self {
            LayerMut::Linear(l) => l.lora = lora,
            LayerMut::Conv2d(c) => c.lora = lora,
            LayerMut::Matmul(..) => panic!("{NO_WEIGHT}"),
        }
    }

    pub fn lora(&self) -> Option<&crate::lora::Talora> {
        match self {
            LayerMut::Linear(l) => l.lora.as_ref(),
            LayerMut::Conv2d(c) => c.lora.as_ref(),
            LayerMut::Matmul(..) => None,
        }
    }

    /// The weight's shape.
    pub fn weight_dims(&self) -> Vec<usize> {
        match self {
            LayerMut::Linear(l) => l.weight.dims().to_vec(),
            LayerMut::Conv2d(c) => c.weight.dims().to_vec(),
            LayerMut::Matmul(..) => panic!("{NO_WEIGHT}"),
        }
    }

    /// The weight the layer computes with at `ctx` (adapted and fake-quantized), on the host.
    pub fn effective_weight_host(&self, ctx: &crate::base::step::StepCtx) -> HostTensor {
        match self {
            LayerMut::Linear(l) => HostTensor::from_tensor(&super::quantized_weight(
                l.weight.val(),
                l.quant.as_ref(),
                l.lora.as_ref(),
                ctx,
            )),
            LayerMut::Conv2d(c) => HostTensor::from_tensor(&super::quantized_weight(
                c.weight.val(),
                c.quant.as_ref(),
                c.lora.as_ref(),
                ctx,
            )),
            LayerMut::Matmul(..) => panic!("{NO_WEIGHT}"),
        }
    }

    /// The weight on the host (row-major, with its full shape).
    pub fn weight_host(&self) -> HostTensor {
        match self {
            LayerMut::Linear(l) => HostTensor::from_tensor(&l.weight.val()),
            LayerMut::Conv2d(c) => HostTensor::from_tensor(&c.weight.val()),
            LayerMut::Matmul(..) => panic!("{NO_WEIGHT}"),
        }
    }

    /// Rotates the layer's input (HQ-DiT) with the weight folded; only linear layers take one.
    pub fn set_hadamard(&mut self, spec: crate::quant::hadamard::HadamardSpec) -> crate::error::Result<()> {
        match self {
            LayerMut::Linear(l) => {
                l.set_hadamard(spec);
                Ok(())
            }
            _ => Err(crate::error::Error::usage(
                "the Hadamard transform applies to linear layers only (not convolutions or attention matmul inputs)",
            )),
        }
    }

    /// The input rotation of the layer, if any.
    pub fn hadamard(&self) -> Option<crate::quant::hadamard::HadamardSpec> {
        match self {
            LayerMut::Linear(l) => l.hadamard.as_ref().map(|h| h.spec),
            _ => None,
        }
    }

    /// The device the layer's parameters live on.
    pub fn device(&self) -> Device {
        match self {
            LayerMut::Linear(l) => l.weight.val().device(),
            LayerMut::Conv2d(c) => c.weight.val().device(),
            LayerMut::Matmul(_, device) => device.clone(),
        }
    }
}

pub struct QuantSite<'a> {
    pub path: String,
    pub layer: LayerMut<'a>,
    /// The input is the output of a SiLU or GELU (asymmetric: its minimum is about -0.28 / -0.17)
    /// or of a softmax (in [0, 1]).
    pub after_activation: bool,
}

impl<'a> QuantSite<'a> {
    pub fn linear(path: impl Into<String>, l: &'a mut Linear, after_activation: bool) -> Self {
        Self { path: path.into(), layer: LayerMut::Linear(l), after_activation }
    }

    pub fn conv(path: impl Into<String>, c: &'a mut Conv2d, after_activation: bool) -> Self {
        Self { path: path.into(), layer: LayerMut::Conv2d(c), after_activation }
    }

    pub fn matmul(
        path: impl Into<String>,
        m: &'a mut MatmulInput,
        after_activation: bool,
        device: &Device,
    ) -> Self {
        Self { path: path.into(), layer: LayerMut::Matmul(m, device.clone()), after_activation }
    }
}
