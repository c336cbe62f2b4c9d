//! SD's UNet2DConditionModel from `crate::nn` layers, so every convolution and linear layer is a
//! quantization site that can carry TALoRA adapters. Parameter paths are diffusers' key names
//! (except `ff.net.0.proj` / `ff.net.2`, see `keymap`), and the forward pass follows diffusers'
//! numerics (checked against it on a tiny config: `tests/sd_parity.rs`).

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::config::UnetConfig;
use crate::models::blocks::ResnetBlock;
use crate::nn::Router;
use crate::nn::site::QuantSite;
use crate::nn::{Attention, Conv2d, GroupNorm, LayerNorm, Linear, StepCtx, add, gelu, silu};
use crate::rng::SeededRng;

/// `linear_2(silu(linear_1(features)))`.
#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

/// GEGLU feed-forward: `out(h * gelu(g))` with `[h | g] = proj(x)`. Paths `ff.proj` / `ff.out`
/// are diffusers' `ff.net.0.proj` / `ff.net.2`.
#[derive(Module, Debug)]
pub struct FeedForward {
    pub proj: Linear,
    pub out: Linear,
}

impl FeedForward {
    pub fn forward(&self, x: Tensor<3>, ctx: &StepCtx) -> Tensor<3> {
        let hg = self.proj.forward(x, ctx);
        let inner = hg.dims()[2] / 2;
        let [h, g]: [Tensor<3>; 2] = hg.split(inner, 2).try_into().expect("two halves");
        self.out.forward(h * gelu(g), ctx)
    }
}

/// Self-attention, cross-attention on the conditioning tokens, GEGLU feed-forward; each behind
/// a LayerNorm with a residual (diffusers `BasicTransformerBlock`).
#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        context_dim: usize,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Self {
        let inner = 4 * dim;
        Self {
            norm1: LayerNorm::new(dim, 1e-5, device),
            attn1: Attention::new(dim, None, heads, head_dim, false, rng, device),
            norm2: LayerNorm::new(dim, 1e-5, device),
            attn2: Attention::new(dim, Some(context_dim), heads, head_dim, false, rng, device),
            norm3: LayerNorm::new(dim, 1e-5, device),
            ff: FeedForward {
                proj: Linear::new(dim, 2 * inner, true, rng, device),
                out: Linear::new(inner, dim, true, rng, device),
            },
        }
    }

    pub fn forward(&self, x: Tensor<3>, context: Tensor<3>, ctx: &StepCtx) -> Tensor<3> {
        let x = add(self.attn1.forward(self.norm1.forward(x.clone()), None, ctx), x);
        let x = add(self.attn2.forward(self.norm2.forward(x.clone()), Some(context), ctx), x);
        add(self.ff.forward(self.norm3.forward(x.clone()), ctx), x)
    }

    fn sites<'a>(&'a mut self, p: &str, out: &mut Vec<QuantSite<'a>>) {
        self.attn1.sites(&format!("{p}.attn1"), out);
        self.attn2.sites(&format!("{p}.attn2"), out);
        out.push(QuantSite::linear(format!("{p}.ff.proj"), &mut self.ff.proj, false));
        // h * gelu(g) is not one-sided: signed.
        out.push(QuantSite::linear(format!("{p}.ff.out"), &mut self.ff.out, false));
    }
}

/// A projection in or out of a transformer: a 1x1 convolution (SD1.x) or a linear layer on the
/// tokens (SD2.x, `use_linear_projection`).
#[derive(Module, Debug)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// Spatial transformer (diffusers `Transformer2DModel`): group norm, project in, transformer
/// blocks over the `H * W` tokens, project out, residual.
#[derive(Module, Debug)]
pub struct Transformer2D {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

impl Transformer2D {
    pub fn new(channels: usize, cfg: &UnetConfig, rng: &mut SeededRng, device: &Device) -> Self {
        let (heads, head_dim) = cfg.heads.split(channels);
        let inner = heads * head_dim;
        let proj = |a, b, rng: &mut SeededRng| match cfg.use_linear_projection {
            true => Projection::Linear(Linear::new(a, b, true, rng, device)),
            false => Projection::Conv(Conv2d::new(a, b, 1, 1, 0, rng, device)),
        };
        let proj_in = proj(channels, inner, rng);
        let transformer_blocks = (0..cfg.transformer_layers)
            .map(|_| BasicTransformerBlock::new(inner, heads, head_dim, cfg.cross_attention_dim, rng, device))
            .collect();
        Self {
            norm: GroupNorm::with_eps(cfg.norm_num_groups, channels, 1e-6, device),
            proj_in,
            transformer_blocks,
            proj_out: proj(inner, channels, rng),
        }
    }

    pub fn forward(&self, x: Tensor<4>, context: Tensor<3>, ctx: &StepCtx) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let normed = self.norm.forward(x.clone());
        let to_tokens = |t: Tensor<4>| {
            let inner = t.dims()[1];
            t.reshape([b, inner, h * w]).swap_dims(1, 2)
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(normed, ctx)),
            Projection::Linear(lin) => lin.forward(to_tokens(normed), ctx),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, context.clone(), ctx);
        }
        let inner = tokens.dims()[2];
        let to_map = |t: Tensor<3>, ch: usize| t.swap_dims(1, 2).reshape([b, ch, h, w]);
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(to_map(tokens, inner), ctx),
            Projection::Linear(lin) => to_map(lin.forward(tokens, ctx), c),
        };
        add(out, x)
    }

    fn sites<'a>(&'a mut self, p: &str, out: &mut Vec<QuantSite<'a>>) {
        let push = |proj: &'a mut Projection, path: String, out: &mut Vec<QuantSite<'a>>| match proj {
            Projection::Conv(c) => out.push(QuantSite::conv(path, c, false)),
            Projection::Linear(l) => out.push(QuantSite::linear(path, l, false)),
        };
        push(&mut self.proj_in, format!("{p}.proj_in"), out);
        for (i, block) in self.transformer_blocks.iter_mut().enumerate() {
            block.sites(&format!("{p}.transformer_blocks.{i}"), out);
        }
        push(&mut self.proj_out, format!("{p}.proj_out"), out);
    }
}

/// A 3x3 convolution after nearest x2 upsampling (`upsamplers.0`), or with stride 2
/// (`downsamplers.0`, padding `pad`: 1 in the UNet; the VAE pads asymmetrically itself).
#[derive(Module, Debug)]
pub struct Resample {
    pub conv: Conv2d,
}

/// One resolution level on the way down or up: ResNet blocks, each followed by a transformer
/// where the level has attention, then an optional resampler.
#[derive(Module, Debug)]
pub struct UnetLevel {
    pub resnets: Vec<ResnetBlock>,
    pub attentions: Vec<Transformer2D>,
    pub downsamplers: Vec<Resample>,
    pub upsamplers: Vec<Resample>,
}

#[derive(Module, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock>,
    pub attentions: Vec<Transformer2D>,
}

/// Noise prediction `eps(x_t, t, context)` on latents `[B, C, H, W]` with conditioning tokens
/// `[B, M, cross_attention_dim]` (CLIP's last hidden state for SD; a class token for LDM).
#[derive(Module, Debug)]
pub struct SdUnet {
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    pub down_blocks: Vec<UnetLevel>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UnetLevel>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    /// TALoRA's router (fine-tuning); `None` without adapters.
    pub router: Option<Router>,
    pub base_channels: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl SdUnet {
    pub fn new(cfg: &UnetConfig, rng: &mut SeededRng, device: &Device) -> Self {
        let chans = &cfg.block_out_channels;
        let levels = chans.len();
        let (g, eps, lpb) = (cfg.norm_num_groups, cfg.norm_eps, cfg.layers_per_block);
        let temb = cfg.time_embed_dim();
        let res = |a, b, rng: &mut SeededRng| ResnetBlock::new(a, b, Some(temb), g, eps, rng, device);
        let conv_in = Conv2d::same3(cfg.in_channels, chans[0], rng, device);
        let time_embedding = TimestepEmbedding {
            linear_1: Linear::new(chans[0], temb, true, rng, device),
            linear_2: Linear::new(temb, temb, true, rng, device),
        };

        let mut down_blocks = Vec::with_capacity(levels);
        let mut ch = chans[0];
        for (level, &c) in chans.iter().enumerate() {
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for _ in 0..lpb {
                resnets.push(res(ch, c, rng));
                ch = c;
                if cfg.cross_attention[level] {
                    attentions.push(Transformer2D::new(c, cfg, rng, device));
                }
            }
            let downsamplers = if level + 1 < levels {
                vec![Resample { conv: Conv2d::new(c, c, 3, 2, 1, rng, device) }]
            } else {
                Vec::new()
            };
            down_blocks.push(UnetLevel { resnets, attentions, downsamplers, upsamplers: Vec::new() });
        }

        let top = chans[levels - 1];
        let mid_block = MidBlock {
            resnets: vec![res(top, top, rng), res(top, top, rng)],
            attentions: vec![Transformer2D::new(top, cfg, rng, device)],
        };

        let mut up_blocks = Vec::with_capacity(levels);
        let mut prev = top;
        for i in 0..levels {
            let level = levels - 1 - i;
            let c = chans[level];
            let skip_in = chans[level.saturating_sub(1)];
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..=lpb {
                let skip = if j == lpb { skip_in } else { c };
                let input = if j == 0 { prev } else { c };
                resnets.push(res(input + skip, c, rng));
                if cfg.cross_attention[level] {
                    attentions.push(Transformer2D::new(c, cfg, rng, device));
                }
            }
            let upsamplers = if level > 0 {
                vec![Resample { conv: Conv2d::same3(c, c, rng, device) }]
            } else {
                Vec::new()
            };
            up_blocks.push(UnetLevel { resnets, attentions, downsamplers: Vec::new(), upsamplers });
            prev = c;
        }

        Self {
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::with_eps(g, chans[0], eps, device),
            conv_out: Conv2d::same3(chans[0], cfg.out_channels, rng, device),
            router: None,
            base_channels: chans[0],
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
        }
    }

    /// Predicts the noise in `x` at timesteps `t` (`[B]`) given conditioning tokens `context`.
    pub fn forward(&self, x: Tensor<4>, t: Tensor<1>, context: Tensor<3>, ctx: &StepCtx) -> Tensor<4> {
        let routed = self.router.as_ref().map(|r| r.routed(ctx, &x.device()));
        let ctx = routed.as_ref().unwrap_or(ctx);
        let features = crate::nn::sinusoidal_embedding(
            t,
            self.base_channels,
            self.freq_shift as f32,
            self.flip_sin_to_cos,
        );
        let te = &self.time_embedding;
        let temb = te.linear_2.forward(silu(te.linear_1.forward(features, ctx)), ctx);

        let mut h = self.conv_in.forward(x, ctx);
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = resnet.forward(h, Some(temb.clone()), ctx);
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(h, context.clone(), ctx);
                }
                skips.push(h.clone());
            }
            for down in &block.downsamplers {
                h = down.conv.forward(h, ctx);
                skips.push(h.clone());
            }
        }

        let mid = &self.mid_block;
        h = mid.resnets[0].forward(h, Some(temb.clone()), ctx);
        h = mid.attentions[0].forward(h, context.clone(), ctx);
        h = mid.resnets[1].forward(h, Some(temb.clone()), ctx);

        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up resnet");
                h = resnet.forward(Tensor::cat(vec![h, skip], 1), Some(temb.clone()), ctx);
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(h, context.clone(), ctx);
                }
            }
            for up in &block.upsamplers {
                h = up.conv.forward(crate::nn::upsample_nearest2(h), ctx);
            }
        }
        self.conv_out.forward(self.conv_norm_out.forward_silu(h), ctx)
    }

    /// Every quantizable layer, in forward order, by its parameter path.
    pub fn quant_sites(&mut self) -> Vec<QuantSite<'_>> {
        let mut out = Vec::new();
        out.push(QuantSite::linear("time_embedding.linear_1", &mut self.time_embedding.linear_1, false));
        out.push(QuantSite::linear("time_embedding.linear_2", &mut self.time_embedding.linear_2, true));
        out.push(QuantSite::conv("conv_in", &mut self.conv_in, false));
        for (i, block) in self.down_blocks.iter_mut().enumerate() {
            level_sites(block, &format!("down_blocks.{i}"), &mut out);
        }
        let mid = &mut self.mid_block;
        let (first, second) = mid.resnets.split_at_mut(1);
        first[0].sites("mid_block.resnets.0", &mut out);
        mid.attentions[0].sites("mid_block.attentions.0", &mut out);
        second[0].sites("mid_block.resnets.1", &mut out);
        for (i, block) in self.up_blocks.iter_mut().enumerate() {
            level_sites(block, &format!("up_blocks.{i}"), &mut out);
        }
        out.push(QuantSite::conv("conv_out", &mut self.conv_out, true));
        out
    }
}

fn level_sites<'a>(block: &'a mut UnetLevel, p: &str, out: &mut Vec<QuantSite<'a>>) {
    let mut attentions = block.attentions.iter_mut();
    for (j, resnet) in block.resnets.iter_mut().enumerate() {
        resnet.sites(&format!("{p}.resnets.{j}"), out);
        if let Some(attn) = attentions.next() {
            attn.sites(&format!("{p}.attentions.{j}"), out);
        }
    }
    for (j, r) in block.downsamplers.iter_mut().enumerate() {
        out.push(QuantSite::conv(format!("{p}.downsamplers.{j}.conv"), &mut r.conv, false));
    }
    for (j, r) in block.upsamplers.iter_mut().enumerate() {
        out.push(QuantSite::conv(format!("{p}.upsamplers.{j}.conv"), &mut r.conv, false));
    }
}
