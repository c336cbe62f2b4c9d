//! DiT (Peebles & Xie): patchify, fixed 2-D sin-cos position embedding, adaLN-Zero transformer
//! blocks conditioned on timestep + class, linear decoder back to patches. The shipped MNIST DiT
//! and facebookresearch's DiT-XL/2 are this code at two configs ([`DitConfig::published`]).

use burn::module::Module;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{Result, positive};
use crate::kernels::norm::layer_norm_modulate;
use crate::nn::Router;
use crate::nn::site::QuantSite;
use crate::nn::{
    ClassEmbedding, Conv2d, Linear, SelfAttention, StepCtx, add_gated, gelu, gelu_tanh, silu,
    sinusoidal_embedding,
};
use crate::rng::SeededRng;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DitConfig {
    pub patch_size: usize,
    pub hidden: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_ratio: usize,
    /// Input channels: 1 for MNIST pixels, 4 for SD-VAE latents (DiT-XL/2).
    pub in_channels: usize,
    /// Input side: 32 pixels for MNIST, 32 latents for DiT-XL/2 at 256 px (64 at 512 px).
    pub input_size: usize,
    /// Class labels; the null label of classifier-free guidance is one more.
    pub num_classes: usize,
    /// DiT's learned variance: twice `in_channels` out, of which the first half is eps.
    pub learn_sigma: bool,
    /// The MLP's GELU with the tanh approximation (DiT's) instead of the exact erf form.
    pub gelu_tanh: bool,
    /// Timestep frequencies `exp(-ln(1e4) i / (128 - freq_shift))`: 0 is DiT's own (and the tiny
    /// DiT's), 1 is diffusers' `DiTTransformer2DModel` (its `downscale_freq_shift = 1`).
    pub freq_shift: usize,
    /// The SD AutoencoderKL that decodes a latent DiT's samples (`stabilityai/sd-vae-ft-ema` or
    /// `-mse`, a diffusers folder); required when `in_channels` is 4.
    pub vae: Option<PathBuf>,
}

impl Default for DitConfig {
    fn default() -> Self {
        Self {
            patch_size: 4,
            hidden: 128,
            depth: 6,
            heads: 4,
            mlp_ratio: 4,
            in_channels: 1,
            input_size: 32,
            num_classes: 10,
            learn_sigma: false,
            gelu_tanh: false,
            freq_shift: 0,
            vae: None,
        }
    }
}

impl DitConfig {
    /// Output channels: eps, and with `learn_sigma` the variance half.
    pub fn out_channels(&self) -> usize {
        self.in_channels * if self.learn_sigma { 2 } else { 1 }
    }

    /// facebookresearch/DiT's class-conditional ImageNet models on SD-VAE latents (8x down,
    /// 4 channels): `DiT-XL/2`, `DiT-B/2`, `DiT-S/2` at `image` = 256 or 512 pixels.
    pub fn published(name: &str, image: usize) -> Option<Self> {
        let (hidden, depth, heads) = match name {
            "DiT-XL/2" => (1152, 28, 16),
            "DiT-B/2" => (768, 12, 12),
            "DiT-S/2" => (384, 12, 6),
            _ => return None,
        };
        Some(Self {
            patch_size: 2,
            hidden,
            depth,
            heads,
            mlp_ratio: 4,
            in_channels: 4,
            input_size: image / 8,
            num_classes: 1000,
            learn_sigma: true,
            gelu_tanh: true,
            freq_shift: 0,
            vae: None,
        })
    }
}

impl DitConfig {
    /// `[model.dit]`'s ranges.
    pub fn validate(&self) -> Result<()> {
        positive("model.dit.depth", self.depth)?;
        positive("model.dit.heads", self.heads)?;
        positive("model.dit.mlp_ratio", self.mlp_ratio)?;
        positive("model.dit.in_channels", self.in_channels)?;
        positive("model.dit.num_classes", self.num_classes)?;
        if self.freq_shift > 1 {
            usage!(
                "model.dit.freq_shift = {} is out of range: 0 (DiT's own) or 1 (diffusers')",
                self.freq_shift
            );
        }
        if self.patch_size == 0 || self.input_size == 0 || !self.input_size.is_multiple_of(self.patch_size) {
            usage!(
                "model.dit.patch_size = {} is out of range: it must divide model.dit.input_size ({})",
                self.patch_size,
                self.input_size
            );
        }
        if self.hidden == 0
            || !self.hidden.is_multiple_of(self.heads)
            || !(self.hidden / self.heads).is_multiple_of(2)
        {
            usage!(
                "model.dit.hidden = {} must be a positive multiple of 2 * model.dit.heads ({})",
                self.hidden,
                self.heads
            );
        }
        Ok(())
    }

    /// A latent DiT (DiT-XL/2) needs its published weights and the SD VAE that decodes it.
    pub fn validate_files(&self, weights: Option<&Path>) -> Result<()> {
        if self.in_channels == 4 {
            if weights.is_none() {
                usage!(
                    "model.weights is not set: download facebookresearch's DiT-XL-2-256x256.pt \
                     (https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt; CC-BY-NC) or the diffusers \
                     directory facebook/DiT-XL-2-256 on huggingface.co, and set model.weights to its path"
                );
            }
            if self.vae.is_none() {
                usage!(
                    "model.dit.vae is not set: a latent DiT's samples are decoded by the SD VAE; download \
                     stabilityai/sd-vae-ft-ema (or -mse) from huggingface.co and set model.dit.vae to its folder"
                );
            }
        }
        Ok(())
    }
}

const FREQ_DIM: usize = 256;

#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

#[derive(Module, Debug)]
pub struct DitBlock {
    pub attn: SelfAttention,
    pub mlp: Mlp,
    /// SiLU -> Linear(hidden, 6 * hidden), zero-initialised (adaLN-Zero).
    pub ada_ln: Linear,
    pub gelu_tanh: bool,
}

impl DitBlock {
    fn forward(&self, x: Tensor<3>, c: Tensor<2>, ctx: &StepCtx) -> Tensor<3> {
        let mods = self.ada_ln.forward(silu(c), ctx).chunk(6, 1);
        let [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp]: [Tensor<2>; 6] =
            mods.try_into().expect("six modulation chunks");
        let h = self.attn.forward(layer_norm_modulate(x.clone(), shift_msa, scale_msa, 1e-6), ctx);
        let x = add_gated(x, gate_msa, h);
        let h = layer_norm_modulate(x.clone(), shift_mlp, scale_mlp, 1e-6);
        let h = self.mlp.fc1.forward(h, ctx);
        let h = self.mlp.fc2.forward(if self.gelu_tanh { gelu_tanh(h) } else { gelu(h) }, ctx);
        add_gated(x, gate_mlp, h)
    }
}

#[derive(Module, Debug)]
pub struct Dit {
    pub patch_embed: Conv2d,
    pub t_embed_1: Linear,
    pub t_embed_2: Linear,
    pub class_embed: ClassEmbedding,
    pub blocks: Vec<DitBlock>,
    pub final_ada_ln: Linear,
    pub final_linear: Linear,
    pub patch_size: usize,
    pub hidden: usize,
    pub in_channels: usize,
    pub input_size: usize,
    pub freq_shift: usize,
    /// TALoRA router of a fine-tuned student; it sets each step's adapter route.
    pub router: Option<Router>,
}

impl Dit {
    pub fn new(cfg: &DitConfig, rng: &mut SeededRng, device: &Device) -> Self {
        let h = cfg.hidden;
        let p = cfg.patch_size;
        let blocks = (0..cfg.depth)
            .map(|_| DitBlock {
                attn: SelfAttention::new(h, cfg.heads, rng, device),
                mlp: Mlp {
                    fc1: Linear::new(h, cfg.mlp_ratio * h, true, rng, device),
                    fc2: Linear::new(cfg.mlp_ratio * h, h, true, rng, device),
                },
                ada_ln: Linear::zeros(h, 6 * h, device),
                gelu_tanh: cfg.gelu_tanh,
            })
            .collect();
        Self {
            patch_embed: Conv2d::new(cfg.in_channels, h, p, p, 0, rng, device),
            t_embed_1: Linear::new(FREQ_DIM, h, true, rng, device),
            t_embed_2: Linear::new(h, h, true, rng, device),
            class_embed: ClassEmbedding::new(cfg.num_classes, h, rng, device),
            blocks,
            final_ada_ln: Linear::zeros(h, 2 * h, device),
            final_linear: Linear::zeros(h, p * p * cfg.out_channels(), device),
            patch_size: p,
            hidden: h,
            in_channels: cfg.in_channels,
            input_size: cfg.input_size,
            freq_shift: cfg.freq_shift,
            router: None,
        }
    }

    /// All output channels: eps, then (with `learn_sigma`) the variance half.
    pub fn forward(&self, x: Tensor<4>, t: Tensor<1>, y: Tensor<1, Int>, ctx: &StepCtx) -> Tensor<4> {
        let device = x.device();
        let routed = self.router.as_ref().map(|r| r.routed(ctx, &device));
        let ctx = routed.as_ref().unwrap_or(ctx);
        let [b, _, _, _] = x.dims();
        let p = self.patch_size;
        let g = self.input_size / p;
        let n = g * g;
        let tokens = self.patch_embed.forward(x, ctx).reshape([b, self.hidden, n]).swap_dims(1, 2);
        let mut x = tokens + pos_embed_2d(self.hidden, g, &device).unsqueeze::<3>();

        let temb = sinusoidal_embedding(t, FREQ_DIM, self.freq_shift as f32, true);
        let c = self.t_embed_2.forward(silu(self.t_embed_1.forward(temb, ctx)), ctx)
            + self.class_embed.forward(y);
        for block in &self.blocks {
            x = block.forward(x, c.clone(), ctx);
        }
        let [shift, scale]: [Tensor<2>; 2] =
            self.final_ada_ln.forward(silu(c), ctx).chunk(2, 1).try_into().expect("two chunks");
        let x = self.final_linear.forward(layer_norm_modulate(x, shift, scale, 1e-6), ctx);
        // [B, N, p*p*C] -> [B, C, g*p, g*p] (DiT's unpatchify: nhwpqc -> nchpwq)
        let c = self.out_channels();
        x.reshape([b, g, g, p, p, c]).permute([0, 5, 1, 3, 2, 4]).reshape([b, c, g * p, g * p])
    }
}

impl Dit {
    /// Output channels, as the final layer has them: eps, then any variance half.
    pub fn out_channels(&self) -> usize {
        self.final_linear.d_out() / (self.patch_size * self.patch_size)
    }

    /// The noise prediction: the eps half of the output (all of it without learned sigma).
    pub fn eps(&self, x: Tensor<4>, t: Tensor<1>, y: Tensor<1, Int>, ctx: &StepCtx) -> Tensor<4> {
        let out = self.forward(x, t, y, ctx);
        if self.out_channels() == self.in_channels { out } else { out.narrow(1, 0, self.in_channels) }
    }
}

/// DiT's fixed 2-D sin-cos position embedding, `[grid*grid, dim]`: half the channels encode the
/// row, half the column.
pub fn pos_embed_2d(dim: usize, grid: usize, device: &Device) -> Tensor<2> {
    let quarter = dim / 4;
    let mut values = Vec::with_capacity(grid * grid * dim);
    for row in 0..grid {
        for col in 0..grid {
            for pos in [col as f32, row as f32] {
                let omega = |i: usize| 1.0 / 10000f32.powf(i as f32 / quarter as f32);
                values.extend((0..quarter).map(|i| (pos * omega(i)).sin()));
                values.extend((0..quarter).map(|i| (pos * omega(i)).cos()));
            }
        }
    }
    Tensor::from_data(TensorData::new(values, [grid * grid, dim]), device)
}

impl Dit {
    /// Every quantizable layer, in forward order.
    pub fn quant_sites(&mut self) -> Vec<QuantSite<'_>> {
        let mut out = Vec::new();
        out.push(QuantSite::conv("patch_embed", &mut self.patch_embed, false));
        out.push(QuantSite::linear("t_embed_1", &mut self.t_embed_1, false));
        out.push(QuantSite::linear("t_embed_2", &mut self.t_embed_2, true));
        for (i, b) in self.blocks.iter_mut().enumerate() {
            out.push(QuantSite::linear(format!("blocks.{i}.ada_ln"), &mut b.ada_ln, true));
            b.attn.sites(&format!("blocks.{i}.attn"), &mut out);
            out.push(QuantSite::linear(format!("blocks.{i}.mlp.fc1"), &mut b.mlp.fc1, false));
            out.push(QuantSite::linear(format!("blocks.{i}.mlp.fc2"), &mut b.mlp.fc2, true));
        }
        out.push(QuantSite::linear("final_ada_ln", &mut self.final_ada_ln, true));
        out.push(QuantSite::linear("final_linear", &mut self.final_linear, false));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DiT-XL/2's shape at a small width: latents in, eps and the variance half out, 1000
    /// classes plus the null label, the tanh GELU.
    #[test]
    fn published_dit_shapes_at_a_small_width() {
        let device = Device::flex();
        let mut cfg = DitConfig::published("DiT-XL/2", 64).unwrap();
        assert_eq!((cfg.in_channels, cfg.input_size, cfg.patch_size, cfg.num_classes), (4, 8, 2, 1000));
        (cfg.hidden, cfg.depth, cfg.heads) = (32, 1, 2);
        let m = Dit::new(&cfg, &mut SeededRng::new(0), &device);
        assert_eq!(m.class_embed.null_label(), 1000);
        let x = Tensor::<4>::from_data(
            TensorData::new(SeededRng::new(1).normals(2 * 4 * 64), [2, 4, 8, 8]),
            &device,
        );
        let t = Tensor::<1>::from_floats([10.0, 900.0], &device);
        let y = Tensor::<1, Int>::from_ints([3, 1000], &device);
        assert_eq!(m.forward(x.clone(), t.clone(), y.clone(), &StepCtx::default()).dims(), [2, 8, 8, 8]);
        assert_eq!(m.eps(x, t, y, &StepCtx::default()).dims(), [2, 4, 8, 8]);
        assert!(DitConfig::published("DiT-XL/3", 256).is_none());
    }

    #[test]
    fn tanh_gelu_is_the_approximation() {
        let device = Device::flex();
        let xs: Vec<f32> = (-40..=40).map(|i| i as f32 * 0.1).collect();
        let x = Tensor::<1>::from_data(TensorData::new(xs.clone(), [xs.len()]), &device);
        let approx = crate::base::params::host_values(gelu_tanh(x.clone()));
        let exact = crate::base::params::host_values(gelu(x));
        for ((a, e), v) in approx.iter().zip(&exact).zip(&xs) {
            let want =
                0.5 * v * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh());
            assert!((a - want).abs() < 1e-5 && (a - e).abs() < 2e-3, "x = {v}: {a} vs {want} / exact {e}");
        }
    }
}
