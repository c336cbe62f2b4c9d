//! Blocks shared by the model families.

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use crate::nn::site::QuantSite;
use crate::nn::{Conv2d, GroupNorm, Linear, StepCtx, add, add_channel_shift, silu};
use crate::rng::SeededRng;

/// The ResNet block of every UNet and VAE here (the tiny UNet, SD's UNet, the SD VAE): two
/// GroupNorm + SiLU + 3x3 convolutions, the timestep embedding added as a per-channel shift
/// between them (none in a VAE), a 1x1 shortcut when the width changes. Diffusers'
/// `ResnetBlock` and its names; CompVis' `ResBlock` maps onto it (`sd::keymap`).
#[derive(Module, Debug)]
pub struct ResnetBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        c_in: usize,
        c_out: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Self {
        Self {
            norm1: GroupNorm::with_eps(groups, c_in, eps, device),
            conv1: Conv2d::same3(c_in, c_out, rng, device),
            time_emb_proj: temb.map(|d| Linear::new(d, c_out, true, rng, device)),
            norm2: GroupNorm::with_eps(groups, c_out, eps, device),
            conv2: Conv2d::same3(c_out, c_out, rng, device),
            conv_shortcut: (c_in != c_out).then(|| Conv2d::new(c_in, c_out, 1, 1, 0, rng, device)),
        }
    }

    pub fn forward(&self, x: Tensor<4>, temb: Option<Tensor<2>>, ctx: &StepCtx) -> Tensor<4> {
        let mut h = self.conv1.forward(self.norm1.forward_silu(x.clone()), ctx);
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            h = add_channel_shift(h, proj.forward(silu(temb), ctx));
        }
        let h = self.conv2.forward(self.norm2.forward_silu(h), ctx);
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(x, ctx),
            None => x,
        };
        add(skip, h)
    }

    pub fn sites<'a>(&'a mut self, p: &str, out: &mut Vec<QuantSite<'a>>) {
        out.push(QuantSite::conv(format!("{p}.conv1"), &mut self.conv1, true));
        if let Some(proj) = self.time_emb_proj.as_mut() {
            out.push(QuantSite::linear(format!("{p}.time_emb_proj"), proj, true));
        }
        out.push(QuantSite::conv(format!("{p}.conv2"), &mut self.conv2, true));
        if let Some(conv) = self.conv_shortcut.as_mut() {
            out.push(QuantSite::conv(format!("{p}.conv_shortcut"), conv, false));
        }
    }
}
