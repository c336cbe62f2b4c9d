//! Quantization sites: every layer of a model that can carry quantizers, with its module path
//! (the same path its parameters have in checkpoints) and whether its input comes straight out of
//! a SiLU/GELU (the structural half of MSFP's anomalous-activation rule).

use crate::nn::{Conv2d, Linear};
use crate::quant::layer::LayerQuant;

/// Mutable access to a quantizable layer.
pub enum LayerMut<'a> {
    Linear(&'a mut Linear),
    Conv2d(&'a mut Conv2d),
}

impl LayerMut<'_> {
    pub fn quant_mut(&mut self) -> &mut Option<LayerQuant> {
        match self {
            LayerMut::Linear(l) => &mut l.quant,
            LayerMut::Conv2d(c) => &mut c.quant,
        }
    }

    pub fn quant(&self) -> Option<&LayerQuant> {
        match self {
            LayerMut::Linear(l) => l.quant.as_ref(),
            LayerMut::Conv2d(c) => c.quant.as_ref(),
        }
    }

    /// The weight as a host matrix `[C_out, K]` (row-major) with its full shape.
    pub fn weight_host(&self) -> (Vec<f32>, Vec<usize>) {
        let data = match self {
            LayerMut::Linear(l) => l.weight.val().into_data(),
            LayerMut::Conv2d(c) => c.weight.val().into_data(),
        };
        let shape = data.shape().to_vec();
        (data.convert::<f32>().try_to_vec::<f32>().expect("f32 weights"), shape)
    }
}

pub struct QuantSite<'a> {
    pub path: String,
    pub layer: LayerMut<'a>,
    /// The input is the output of a SiLU or GELU (asymmetric: its minimum is about -0.28 / -0.17).
    pub after_activation: bool,
}

impl<'a> QuantSite<'a> {
    pub fn linear(path: impl Into<String>, l: &'a mut Linear, after_activation: bool) -> Self {
        Self { path: path.into(), layer: LayerMut::Linear(l), after_activation }
    }

    pub fn conv(path: impl Into<String>, c: &'a mut Conv2d, after_activation: bool) -> Self {
        Self { path: path.into(), layer: LayerMut::Conv2d(c), after_activation }
    }
}
