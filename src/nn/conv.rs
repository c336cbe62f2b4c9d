//! 2-D convolution with square kernels and symmetric padding (all the tiny and SD models need).

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};

use super::{StepCtx, init};
use crate::lora::Talora;
use crate::quant::layer::LayerQuant;
use crate::rng::SeededRng;

#[derive(Module, Debug)]
pub struct Conv2d {
    /// `[c_out, c_in, k, k]`.
    pub weight: Param<Tensor<4>>,
    pub bias: Option<Param<Tensor<1>>>,
    pub stride: usize,
    pub padding: usize,
    /// Weight/input quantizers; `None` is the full-precision layer.
    pub quant: Option<LayerQuant>,
    /// TALoRA adapters (fine-tuning); `None` without.
    pub lora: Option<Talora>,
}

impl Conv2d {
    pub fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Self {
        let bound = 1.0 / ((c_in * kernel * kernel) as f32).sqrt();
        Self {
            weight: init::uniform(rng, [c_out, c_in, kernel, kernel], bound, device),
            bias: Some(init::uniform(rng, [c_out], bound, device)),
            stride,
            padding,
            quant: None,
            lora: None,
        }
    }

    /// "Same" 3x3 convolution.
    pub fn same3(c_in: usize, c_out: usize, rng: &mut SeededRng, device: &Device) -> Self {
        Self::new(c_in, c_out, 3, 1, 1, rng, device)
    }

    pub fn forward(&self, x: Tensor<4>, ctx: &StepCtx) -> Tensor<4> {
        use crate::kernels::conv::conv2d;
        use crate::kernels::qweight::{Layer, quantized_layer};
        let (s, p) = (self.stride, self.padding);
        // The branch adapter as a rank-m convolution with the layer's kernel, then a 1x1.
        let low_rank = super::branch(self.lora.as_ref()).map(|l| {
            let [c_out, c_in, kh, kw] = self.weight.dims();
            let (down, up) = l.factors(ctx);
            let m = down.dims()[0];
            let h = conv2d(x.clone(), down.reshape([m, c_in, kh, kw]), None, s, p);
            conv2d(h, up.reshape([c_out, m, 1, 1]), None, 1, 0)
        });
        let x = match &self.quant {
            Some(q) => q.input(x, ctx),
            None => x,
        };
        let bias = self.bias.as_ref().map(|b| b.val());
        let y = match super::weight_in_op(&x.device(), self.quant.as_ref(), self.lora.as_ref()) {
            Some((scale, q)) => {
                let layer = Layer::Conv { stride: s, padding: p };
                quantized_layer(x, self.weight.val(), scale, bias, layer, q)
            }
            None => {
                let w =
                    super::quantized_weight(self.weight.val(), self.quant.as_ref(), self.lora.as_ref(), ctx);
                conv2d(x, w, bias, s, p)
            }
        };
        match low_rank {
            Some(l) => y + l,
            None => y,
        }
    }
}
