//! Tiny LDM-style UNet for 32x32 single-channel images: ResBlocks with GroupNorm + SiLU, a
//! sinusoidal timestep embedding, self-attention at the lowest resolution, class conditioning
//! by an embedding added to the timestep embedding, and skip connections as in LDM's UNetModel.

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::base::params::NamedTensors;
use crate::error::{Result, positive};
use crate::models::blocks::ResnetBlock;
use crate::nn::Router;
use crate::nn::site::QuantSite;
use crate::nn::{
    ClassEmbedding, Conv2d, GroupNorm, Linear, SelfAttention, StepCtx, add, silu, timestep_embedding,
};
use crate::rng::SeededRng;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UnetConfig {
    /// Channels at the full resolution.
    pub base_channels: usize,
    /// Channel multiplier per resolution level (each level after the first halves H and W).
    pub channel_mult: Vec<usize>,
    /// Residual blocks per level on the way down (the way up has one more, as in LDM).
    pub res_blocks: usize,
    /// Self-attention heads at the lowest resolution.
    pub attention_heads: usize,
    /// GroupNorm groups.
    pub groups: usize,
}

impl Default for UnetConfig {
    fn default() -> Self {
        Self { base_channels: 32, channel_mult: vec![1, 2, 2], res_blocks: 1, attention_heads: 4, groups: 8 }
    }
}

impl UnetConfig {
    /// `[model.unet]`'s ranges.
    pub fn validate(&self) -> Result<()> {
        positive("model.unet.base_channels", self.base_channels)?;
        positive("model.unet.res_blocks", self.res_blocks)?;
        positive("model.unet.attention_heads", self.attention_heads)?;
        positive("model.unet.groups", self.groups)?;
        if self.channel_mult.is_empty() || self.channel_mult.len() > 4 || self.channel_mult.contains(&0) {
            usage!(
                "model.unet.channel_mult = {:?} is out of range: give 1 to 4 positive multipliers",
                self.channel_mult
            );
        }
        for m in &self.channel_mult {
            if !(self.base_channels * m).is_multiple_of(self.groups) {
                usage!(
                    "model.unet.groups = {} must divide every level's channels (base_channels * channel_mult = {})",
                    self.groups,
                    self.base_channels * m
                );
            }
        }
        let lowest = self.base_channels * self.channel_mult.last().copied().unwrap_or(1);
        if !lowest.is_multiple_of(self.attention_heads) {
            usage!(
                "model.unet.attention_heads = {} must divide the lowest level's {lowest} channels",
                self.attention_heads
            );
        }
        Ok(())
    }
}

/// Spatial self-attention block: GroupNorm, attention over the H*W tokens, residual.
#[derive(Module, Debug)]
pub struct AttnBlock {
    pub norm: GroupNorm,
    pub attn: SelfAttention,
}

impl AttnBlock {
    fn new(channels: usize, heads: usize, groups: usize, rng: &mut SeededRng, device: &Device) -> Self {
        Self {
            norm: GroupNorm::new(groups, channels, device),
            attn: SelfAttention::new(channels, heads, rng, device),
        }
    }

    fn forward(&self, x: Tensor<4>, ctx: &StepCtx) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let tokens = self.norm.forward(x.clone()).reshape([b, c, h * w]).swap_dims(1, 2);
        let out = self.attn.forward(tokens, ctx).swap_dims(1, 2).reshape([b, c, h, w]);
        add(x, out)
    }
}

/// GroupNorm's eps in the tiny UNet's ResNet blocks (PyTorch's default).
const GROUP_NORM_EPS: f64 = 1e-5;

/// The names of the tiny UNet's ResNet-block layers in files written before the block was
/// shared with SD (sessions up to 2026-12-04, the shipped `checkpoints/tiny_unet_mnist.safetensors`
/// among them): `emb_proj` is now `time_emb_proj`, `skip` is `conv_shortcut`.
pub fn upgrade_legacy_names(tensors: NamedTensors) -> NamedTensors {
    let rename = |name: String| {
        let parts: Vec<&str> = name
            .split('.')
            .map(|p| match p {
                "emb_proj" => "time_emb_proj",
                "skip" => "conv_shortcut",
                other => other,
            })
            .collect();
        parts.join(".")
    };
    tensors.into_iter().map(|(name, t)| (rename(name), t)).collect()
}

/// One UNet stage: a ResNet block, optionally followed by attention.
#[derive(Module, Debug)]
pub struct Stage {
    pub res: ResnetBlock,
    pub attn: Option<AttnBlock>,
}

impl Stage {
    fn forward(&self, x: Tensor<4>, emb: Tensor<2>, ctx: &StepCtx) -> Tensor<4> {
        let h = self.res.forward(x, Some(emb), ctx);
        match &self.attn {
            Some(a) => a.forward(h, ctx),
            None => h,
        }
    }
}

#[derive(Module, Debug)]
pub struct TinyUnet {
    pub time_embed_1: Linear,
    pub time_embed_2: Linear,
    pub class_embed: ClassEmbedding,
    pub conv_in: Conv2d,
    pub down: Vec<Stage>,
    /// Stride-2 convolutions after every level but the last.
    pub downsample: Vec<Conv2d>,
    pub mid_1: ResnetBlock,
    pub mid_attn: AttnBlock,
    pub mid_2: ResnetBlock,
    pub up: Vec<Stage>,
    /// Nearest x2 followed by a 3x3 conv, after every level but the lowest.
    pub upsample: Vec<Conv2d>,
    pub norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub base_channels: usize,
    pub res_blocks: usize,
    pub levels: usize,
    /// TALoRA router of a fine-tuned student; it sets each step's adapter route.
    pub router: Option<Router>,
}

impl TinyUnet {
    pub fn new(cfg: &UnetConfig, rng: &mut SeededRng, device: &Device) -> Self {
        let c0 = cfg.base_channels;
        let emb = 4 * c0;
        let g = cfg.groups;
        let levels = cfg.channel_mult.len();
        let chans: Vec<usize> = cfg.channel_mult.iter().map(|m| m * c0).collect();
        let attn_at = |level: usize| level == levels - 1;

        let time_embed_1 = Linear::new(c0, emb, true, rng, device);
        let time_embed_2 = Linear::new(emb, emb, true, rng, device);
        let class_embed = ClassEmbedding::new(10, emb, rng, device);
        let conv_in = Conv2d::same3(1, c0, rng, device);

        let mut skip_chans = vec![c0];
        let mut down = Vec::new();
        let mut downsample = Vec::new();
        let mut ch = c0;
        for (level, &c) in chans.iter().enumerate() {
            for _ in 0..cfg.res_blocks {
                let res = ResnetBlock::new(ch, c, Some(emb), g, GROUP_NORM_EPS, rng, device);
                let attn = attn_at(level).then(|| AttnBlock::new(c, cfg.attention_heads, g, rng, device));
                down.push(Stage { res, attn });
                ch = c;
                skip_chans.push(ch);
            }
            if level + 1 < levels {
                downsample.push(Conv2d::new(ch, ch, 3, 2, 1, rng, device));
                skip_chans.push(ch);
            }
        }

        let mid_1 = ResnetBlock::new(ch, ch, Some(emb), g, GROUP_NORM_EPS, rng, device);
        let mid_attn = AttnBlock::new(ch, cfg.attention_heads, g, rng, device);
        let mid_2 = ResnetBlock::new(ch, ch, Some(emb), g, GROUP_NORM_EPS, rng, device);

        let mut up = Vec::new();
        let mut upsample = Vec::new();
        for (level, &c) in chans.iter().enumerate().rev() {
            for _ in 0..=cfg.res_blocks {
                let skip = skip_chans.pop().expect("one skip per up block");
                let res = ResnetBlock::new(ch + skip, c, Some(emb), g, GROUP_NORM_EPS, rng, device);
                let attn = attn_at(level).then(|| AttnBlock::new(c, cfg.attention_heads, g, rng, device));
                up.push(Stage { res, attn });
                ch = c;
            }
            if level > 0 {
                upsample.push(Conv2d::same3(ch, ch, rng, device));
            }
        }

        Self {
            time_embed_1,
            time_embed_2,
            class_embed,
            conv_in,
            down,
            downsample,
            mid_1,
            mid_attn,
            mid_2,
            up,
            upsample,
            norm_out: GroupNorm::new(g, ch, device),
            conv_out: Conv2d::same3(ch, 1, rng, device),
            base_channels: c0,
            res_blocks: cfg.res_blocks,
            levels,
            router: None,
        }
    }

    /// Predicts the noise in `x` (`[B, 1, 32, 32]`) at timesteps `t` (`[B]`) for labels `y`
    /// (`[B]`, the null label for unconditional).
    pub fn forward(&self, x: Tensor<4>, t: Tensor<1>, y: Tensor<1, Int>, ctx: &StepCtx) -> Tensor<4> {
        let routed = self.router.as_ref().map(|r| r.routed(ctx, &x.device()));
        let ctx = routed.as_ref().unwrap_or(ctx);
        let temb = timestep_embedding(t, self.base_channels);
        let emb = self.time_embed_2.forward(silu(self.time_embed_1.forward(temb, ctx)), ctx)
            + self.class_embed.forward(y);

        let mut h = self.conv_in.forward(x, ctx);
        let mut skips = vec![h.clone()];
        let mut blocks = self.down.iter();
        for level in 0..self.levels {
            for _ in 0..self.res_blocks {
                h = blocks.next().expect("down block").forward(h, emb.clone(), ctx);
                skips.push(h.clone());
            }
            if let Some(ds) = self.downsample.get(level) {
                h = ds.forward(h, ctx);
                skips.push(h.clone());
            }
        }

        h = self.mid_1.forward(h, Some(emb.clone()), ctx);
        h = self.mid_attn.forward(h, ctx);
        h = self.mid_2.forward(h, Some(emb.clone()), ctx);

        let mut blocks = self.up.iter();
        for level in 0..self.levels {
            for _ in 0..=self.res_blocks {
                let skip = skips.pop().expect("skip");
                h = blocks.next().expect("up block").forward(Tensor::cat(vec![h, skip], 1), emb.clone(), ctx);
            }
            if let Some(us) = self.upsample.get(level) {
                h = us.forward(crate::nn::upsample_nearest2(h), ctx);
            }
        }
        self.conv_out.forward(self.norm_out.forward_silu(h), ctx)
    }
}

impl AttnBlock {
    fn sites<'a>(&'a mut self, p: &str, out: &mut Vec<QuantSite<'a>>) {
        self.attn.sites(&format!("{p}.attn"), out);
    }
}

impl TinyUnet {
    /// Every quantizable layer, in forward order.
    pub fn quant_sites(&mut self) -> Vec<QuantSite<'_>> {
        let mut out = Vec::new();
        out.push(QuantSite::linear("time_embed_1", &mut self.time_embed_1, false));
        out.push(QuantSite::linear("time_embed_2", &mut self.time_embed_2, true));
        out.push(QuantSite::conv("conv_in", &mut self.conv_in, false));
        for (i, stage) in self.down.iter_mut().enumerate() {
            stage.res.sites(&format!("down.{i}.res"), &mut out);
            if let Some(a) = stage.attn.as_mut() {
                a.sites(&format!("down.{i}.attn"), &mut out);
            }
        }
        for (i, ds) in self.downsample.iter_mut().enumerate() {
            out.push(QuantSite::conv(format!("downsample.{i}"), ds, false));
        }
        self.mid_1.sites("mid_1", &mut out);
        self.mid_attn.sites("mid_attn", &mut out);
        self.mid_2.sites("mid_2", &mut out);
        for (i, stage) in self.up.iter_mut().enumerate() {
            stage.res.sites(&format!("up.{i}.res"), &mut out);
            if let Some(a) = stage.attn.as_mut() {
                a.sites(&format!("up.{i}.attn"), &mut out);
            }
        }
        for (i, us) in self.upsample.iter_mut().enumerate() {
            out.push(QuantSite::conv(format!("upsample.{i}"), us, false));
        }
        out.push(QuantSite::conv("conv_out", &mut self.conv_out, true));
        out
    }
}
