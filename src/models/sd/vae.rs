//! AutoencoderKL, SD's first stage (also sd-vae-ft-ema/mse, which DiT decodes with): the encoder
//! to a diagonal Gaussian over latents and the decoder back to pixels. It runs in full precision
//! in msfp's jobs, but is built from `crate::nn` layers like everything else. Parameter paths are
//! diffusers' key names.

use burn::module::Module;
use burn::tensor::ops::PadMode;
use burn::tensor::{Device, Tensor};

use super::config::VaeConfig;
use super::unet::Resample;
use crate::models::blocks::ResnetBlock;
use crate::nn::{Attention, Conv2d, GroupNorm, StepCtx};
use crate::rng::SeededRng;

/// ResNet blocks then an optional resampler (diffusers `DownEncoderBlock2D` / `UpDecoderBlock2D`).
#[derive(Module, Debug)]
pub struct VaeLevel {
    pub resnets: Vec<ResnetBlock>,
    pub downsamplers: Vec<Resample>,
    pub upsamplers: Vec<Resample>,
}

/// ResNet, single-head self-attention over positions, ResNet.
#[derive(Module, Debug)]
pub struct VaeMidBlock {
    pub resnets: Vec<ResnetBlock>,
    pub attentions: Vec<Attention>,
}

impl VaeMidBlock {
    fn new(c: usize, groups: usize, rng: &mut SeededRng, device: &Device) -> Self {
        let mut attention = Attention::new(c, None, 1, c, true, rng, device);
        attention.group_norm = Some(GroupNorm::with_eps(groups, c, EPS, device));
        Self {
            resnets: vec![
                ResnetBlock::new(c, c, None, groups, EPS, rng, device),
                ResnetBlock::new(c, c, None, groups, EPS, rng, device),
            ],
            attentions: vec![attention],
        }
    }

    fn forward(&self, x: Tensor<4>, ctx: &StepCtx) -> Tensor<4> {
        let h = self.resnets[0].forward(x, None, ctx);
        let h = self.attentions[0].forward_spatial(h, ctx);
        self.resnets[1].forward(h, None, ctx)
    }
}

/// The VAE's norms use eps 1e-6.
const EPS: f64 = 1e-6;

#[derive(Module, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<VaeLevel>,
    pub mid_block: VaeMidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

#[derive(Module, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: VaeMidBlock,
    pub up_blocks: Vec<VaeLevel>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

#[derive(Module, Debug)]
pub struct AutoencoderKl {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Conv2d,
    pub post_quant_conv: Conv2d,
    pub scaling_factor: f64,
}

impl AutoencoderKl {
    pub fn new(cfg: &VaeConfig, rng: &mut SeededRng, device: &Device) -> Self {
        let chans = &cfg.block_out_channels;
        let (g, lpb, levels) = (cfg.norm_num_groups, cfg.layers_per_block, chans.len());
        let top = chans[levels - 1];
        let z = cfg.latent_channels;

        let mut down_blocks = Vec::new();
        let mut ch = chans[0];
        for (level, &c) in chans.iter().enumerate() {
            let resnets = (0..lpb)
                .map(|j| ResnetBlock::new(if j == 0 { ch } else { c }, c, None, g, EPS, rng, device))
                .collect();
            ch = c;
            let downsamplers = if level + 1 < levels {
                vec![Resample { conv: Conv2d::new(c, c, 3, 2, 0, rng, device) }]
            } else {
                Vec::new()
            };
            down_blocks.push(VaeLevel { resnets, downsamplers, upsamplers: Vec::new() });
        }
        let encoder = Encoder {
            conv_in: Conv2d::same3(cfg.in_channels, chans[0], rng, device),
            down_blocks,
            mid_block: VaeMidBlock::new(top, g, rng, device),
            conv_norm_out: GroupNorm::with_eps(g, top, EPS, device),
            conv_out: Conv2d::same3(top, 2 * z, rng, device),
        };

        let mut up_blocks = Vec::new();
        let mut prev = top;
        for (i, &c) in chans.iter().rev().enumerate() {
            let resnets = (0..=lpb)
                .map(|j| ResnetBlock::new(if j == 0 { prev } else { c }, c, None, g, EPS, rng, device))
                .collect();
            prev = c;
            let upsamplers = if i + 1 < levels {
                vec![Resample { conv: Conv2d::same3(c, c, rng, device) }]
            } else {
                Vec::new()
            };
            up_blocks.push(VaeLevel { resnets, downsamplers: Vec::new(), upsamplers });
        }
        let decoder = Decoder {
            conv_in: Conv2d::same3(z, top, rng, device),
            mid_block: VaeMidBlock::new(top, g, rng, device),
            up_blocks,
            conv_norm_out: GroupNorm::with_eps(g, chans[0], EPS, device),
            conv_out: Conv2d::same3(chans[0], cfg.out_channels, rng, device),
        };
        Self {
            encoder,
            decoder,
            quant_conv: Conv2d::new(2 * z, 2 * z, 1, 1, 0, rng, device),
            post_quant_conv: Conv2d::new(z, z, 1, 1, 0, rng, device),
            scaling_factor: cfg.scaling_factor,
        }
    }

    /// Images `[B, 3, H, W]` in [-1, 1] -> the posterior's mean and log-variance `[B, z, H/f, W/f]`.
    pub fn encode(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let ctx = StepCtx::default();
        let e = &self.encoder;
        let mut h = e.conv_in.forward(x, &ctx);
        for level in &e.down_blocks {
            for resnet in &level.resnets {
                h = resnet.forward(h, None, &ctx);
            }
            for down in &level.downsamplers {
                // Asymmetric padding (right and bottom by one), as the published weights expect.
                h = down.conv.forward(h.pad((0, 1, 0, 1), PadMode::Constant(0.0)), &ctx);
            }
        }
        h = e.mid_block.forward(h, &ctx);
        let moments =
            self.quant_conv.forward(e.conv_out.forward(e.conv_norm_out.forward_silu(h), &ctx), &ctx);
        let z = moments.dims()[1] / 2;
        let [mean, logvar]: [Tensor<4>; 2] = moments.split(z, 1).try_into().expect("mean and log-variance");
        (mean, logvar.clamp(-30.0, 20.0))
    }

    /// Latents `[B, z, h, w]` (unscaled: divide diffusion latents by `scaling_factor` first) ->
    /// images `[B, 3, f*h, f*w]`, nominally in [-1, 1].
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        let ctx = StepCtx::default();
        let d = &self.decoder;
        let mut h = d.conv_in.forward(self.post_quant_conv.forward(z, &ctx), &ctx);
        h = d.mid_block.forward(h, &ctx);
        for level in &d.up_blocks {
            for resnet in &level.resnets {
                h = resnet.forward(h, None, &ctx);
            }
            for up in &level.upsamplers {
                h = up.conv.forward(crate::nn::upsample_nearest2(h), &ctx);
            }
        }
        d.conv_out.forward(d.conv_norm_out.forward_silu(h), &ctx)
    }
}
