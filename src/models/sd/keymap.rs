//! Key maps onto diffusers' parameter names, which the SD models use as their parameter paths.
//!
//! A CompVis (latent-diffusion / stable-diffusion repo) single file names the three networks
//! after their own modules: the UNet under `model.diffusion_model.` in openaimodel naming
//! (`input_blocks.i.j`, `middle_block`, `output_blocks`), the VAE under `first_stage_model.`
//! (`encoder.down.i.block.j`, `decoder.up.i` numbered from the lowest resolution), the CLIP text
//! encoder under `cond_stage_model.transformer.`, and optionally EMA copies of the UNet as
//! `model_ema.<UNet key without "model." and without dots>`. The UNet map is index arithmetic
//! over `layers_per_block`, so it is written as functions rather than as a table: each returns
//! `None` for a key it cannot place, and [`plan_compvis`] turns those into an error naming the key.
//!
//! Names produced (diffusers, current): UNet `conv_in`, `time_embedding.linear_{1,2}`,
//! `down_blocks.L.{resnets.j, attentions.j, downsamplers.0.conv}`, `mid_block.{resnets.0,
//! attentions.0, resnets.1}`, `up_blocks.L.{resnets.j, attentions.j, upsamplers.0.conv}`,
//! `conv_norm_out`, `conv_out`; resnets `norm1 conv1 time_emb_proj norm2 conv2 conv_shortcut`;
//! attentions keep their sub-names (`norm proj_in transformer_blocks.0.attn1.to_q proj_out`).
//! VAE `{encoder,decoder}.{conv_in, mid_block.resnets.{0,1}, mid_block.attentions.0.{group_norm,
//! to_q, to_k, to_v, to_out.0}, conv_norm_out, conv_out}`, `encoder.down_blocks.i.{resnets.j,
//! downsamplers.0.conv}`, `decoder.up_blocks.i.{resnets.j, upsamplers.0.conv}`, `quant_conv`,
//! `post_quant_conv`; the mid attention's q/k/v/out weights are Linear `[c, c]`. Text encoder
//! `text_model.{embeddings, encoder, final_layer_norm}.*` as transformers' CLIPTextModel.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const TEXT_ENCODER_PREFIX: &str = "cond_stage_model.transformer.";
pub const EMA_PREFIX: &str = "model_ema.";

/// CompVis keys that are read by no model: the LatentDiffusion module's noise-schedule buffers
/// (msfp computes its own schedule), the EMA bookkeeping, and CLIP's integer position ids.
pub const IGNORED_COMPVIS_KEYS: &[&str] = &[
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "model_ema.decay",
    "model_ema.num_updates",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.transformer.embeddings.position_ids",
];

/// The text encoder's buffer of position indices (an int64 arange), never a weight.
pub const TEXT_ENCODER_POSITION_IDS: &str = "text_model.embeddings.position_ids";

/// Which network a tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    Vae,
    TextEncoder,
}

fn index(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

/// A parameter leaf name: `weight` or `bias`.
fn leaf(s: &str) -> Option<&str> {
    matches!(s, "weight" | "bias").then_some(s)
}

/// An openaimodel ResBlock's sub-key (`in_layers.0.weight`) in diffusers' ResnetBlock2D naming.
fn unet_resnet(rest: &[&str]) -> Option<String> {
    let (name, l) = match rest {
        ["in_layers", "0", l] => ("norm1", l),
        ["in_layers", "2", l] => ("conv1", l),
        ["emb_layers", "1", l] => ("time_emb_proj", l),
        ["out_layers", "0", l] => ("norm2", l),
        ["out_layers", "3", l] => ("conv2", l),
        ["skip_connection", l] => ("conv_shortcut", l),
        _ => return None,
    };
    Some(format!("{name}.{}", leaf(l)?))
}

/// A SpatialTransformer's sub-key: the names are diffusers' Transformer2DModel names already.
fn unet_attention(rest: &[&str]) -> Option<String> {
    match rest {
        [first, .., last] if matches!(*first, "norm" | "proj_in" | "proj_out" | "transformer_blocks") => {
            leaf(last)?;
            Some(rest.join("."))
        }
        _ => None,
    }
}

/// A CompVis UNet key (without `model.diffusion_model.`) as a diffusers UNet2DConditionModel key.
/// `layers_per_block` is the UNet config's (SD: 2): input level `L` holds blocks
/// `1 + L*(lpb+1) ..`, the last of each level (but the deepest) a downsampler; output level `L`
/// holds `lpb+1` blocks, the last with an upsampler (but the top level).
pub fn unet_key(key: &str, layers_per_block: usize) -> Option<String> {
    let p: Vec<&str> = key.split('.').collect();
    let per_level = layers_per_block + 1;
    let mapped = match p.as_slice() {
        ["time_embed", "0", l] => format!("time_embedding.linear_1.{}", leaf(l)?),
        ["time_embed", "2", l] => format!("time_embedding.linear_2.{}", leaf(l)?),
        ["input_blocks", "0", "0", l] => format!("conv_in.{}", leaf(l)?),
        ["input_blocks", i, layer, rest @ ..] => {
            let i = index(i)?.checked_sub(1)?;
            let (level, j) = (i / per_level, i % per_level);
            let base = format!("down_blocks.{level}");
            match (*layer, j < layers_per_block, rest) {
                ("0", true, _) => format!("{base}.resnets.{j}.{}", unet_resnet(rest)?),
                ("1", true, _) => format!("{base}.attentions.{j}.{}", unet_attention(rest)?),
                ("0", false, ["op", l]) => format!("{base}.downsamplers.0.conv.{}", leaf(l)?),
                _ => return None,
            }
        }
        ["middle_block", "0", rest @ ..] => format!("mid_block.resnets.0.{}", unet_resnet(rest)?),
        ["middle_block", "1", rest @ ..] => format!("mid_block.attentions.0.{}", unet_attention(rest)?),
        ["middle_block", "2", rest @ ..] => format!("mid_block.resnets.1.{}", unet_resnet(rest)?),
        ["output_blocks", i, layer, rest @ ..] => {
            let i = index(i)?;
            let (level, j) = (i / per_level, i % per_level);
            let base = format!("up_blocks.{level}");
            match (*layer, rest) {
                ("0", _) => format!("{base}.resnets.{j}.{}", unet_resnet(rest)?),
                ("1" | "2", ["conv", l]) if j == layers_per_block => {
                    format!("{base}.upsamplers.0.conv.{}", leaf(l)?)
                }
                ("1", _) => format!("{base}.attentions.{j}.{}", unet_attention(rest)?),
                _ => return None,
            }
        }
        ["out", "0", l] => format!("conv_norm_out.{}", leaf(l)?),
        ["out", "2", l] => format!("conv_out.{}", leaf(l)?),
        _ => return None,
    };
    Some(mapped)
}

/// A CompVis VAE ResnetBlock sub-key (`norm1.weight`, `nin_shortcut.bias`).
fn vae_resnet(rest: &[&str]) -> Option<String> {
    let (name, l) = match rest {
        [n @ ("norm1" | "conv1" | "norm2" | "conv2"), l] => (*n, l),
        ["nin_shortcut", l] => ("conv_shortcut", l),
        _ => return None,
    };
    Some(format!("{name}.{}", leaf(l)?))
}

/// A CompVis VAE mid attention sub-key (`q.weight`): its 1x1 convs are diffusers' Linear layers.
fn vae_attention(rest: &[&str]) -> Option<String> {
    let (name, l) = match rest {
        ["norm", l] => ("group_norm", l),
        ["q", l] => ("to_q", l),
        ["k", l] => ("to_k", l),
        ["v", l] => ("to_v", l),
        ["proj_out", l] => ("to_out.0", l),
        _ => return None,
    };
    Some(format!("{name}.{}", leaf(l)?))
}

/// A CompVis VAE key (without `first_stage_model.`) as a diffusers AutoencoderKL key.
/// `decoder_levels` is the number of `decoder.up.i` levels: CompVis numbers them from the lowest
/// resolution (`up.0` runs last), diffusers in the order they run.
pub fn vae_key(key: &str, decoder_levels: usize) -> Option<String> {
    let p: Vec<&str> = key.split('.').collect();
    let mapped = match p.as_slice() {
        [side @ ("encoder" | "decoder"), rest @ ..] => {
            let body = match rest {
                ["conv_in", l] => format!("conv_in.{}", leaf(l)?),
                ["conv_out", l] => format!("conv_out.{}", leaf(l)?),
                ["norm_out", l] => format!("conv_norm_out.{}", leaf(l)?),
                ["mid", "block_1", r @ ..] => format!("mid_block.resnets.0.{}", vae_resnet(r)?),
                ["mid", "block_2", r @ ..] => format!("mid_block.resnets.1.{}", vae_resnet(r)?),
                ["mid", "attn_1", r @ ..] => format!("mid_block.attentions.0.{}", vae_attention(r)?),
                ["down", i, "block", j, r @ ..] if *side == "encoder" => {
                    format!("down_blocks.{}.resnets.{}.{}", index(i)?, index(j)?, vae_resnet(r)?)
                }
                ["down", i, "downsample", "conv", l] if *side == "encoder" => {
                    format!("down_blocks.{}.downsamplers.0.conv.{}", index(i)?, leaf(l)?)
                }
                ["up", i, "block", j, r @ ..] if *side == "decoder" => {
                    let i = decoder_levels.checked_sub(1)?.checked_sub(index(i)?)?;
                    format!("up_blocks.{i}.resnets.{}.{}", index(j)?, vae_resnet(r)?)
                }
                ["up", i, "upsample", "conv", l] if *side == "decoder" => {
                    let i = decoder_levels.checked_sub(1)?.checked_sub(index(i)?)?;
                    format!("up_blocks.{i}.upsamplers.0.conv.{}", leaf(l)?)
                }
                _ => return None,
            };
            format!("{side}.{body}")
        }
        [conv @ ("quant_conv" | "post_quant_conv"), l] => format!("{conv}.{}", leaf(l)?),
        _ => return None,
    };
    Some(mapped)
}

/// A CLIP text-encoder key, with or without its `text_model.` prefix (CompVis files after
/// `cond_stage_model.transformer.`, or diffusers files written by transformers 5), as
/// `text_model.*`. `None` for anything outside `embeddings`, `encoder`, `final_layer_norm`.
pub fn text_encoder_key(key: &str) -> Option<String> {
    let rest = key.strip_prefix("text_model.").unwrap_or(key);
    match rest.split('.').next()? {
        "embeddings" | "encoder" | "final_layer_norm" => Some(format!("text_model.{rest}")),
        _ => None,
    }
}

/// A diffusers VAE key in current naming: files written before diffusers 0.14 named the mid
/// attention `query`, `key`, `value`, `proj_attn`.
pub fn vae_diffusers_key(key: &str) -> String {
    const MID: &str = ".mid_block.attentions.0.";
    let Some(at) = key.find(MID) else { return key.to_string() };
    let (head, tail) = key.split_at(at + MID.len());
    let renamed = [("query.", "to_q."), ("key.", "to_k."), ("value.", "to_v."), ("proj_attn.", "to_out.0.")]
        .iter()
        .find_map(|(old, new)| tail.strip_prefix(old).map(|l| format!("{new}{l}")));
    match renamed {
        Some(t) => format!("{head}{t}"),
        None => key.to_string(),
    }
}

/// The shape a VAE tensor must take under its diffusers name: the mid attention's q/k/v/out
/// weights are Linear `[c, c]`, stored by CompVis as 1x1 convs `[c, c, 1, 1]`.
pub fn vae_target_shape(diffusers_key: &str, shape: &[usize]) -> Vec<usize> {
    let linear = diffusers_key.contains(".mid_block.attentions.")
        && ["to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"]
            .iter()
            .any(|t| diffusers_key.ends_with(t));
    match shape {
        [a, b, 1, 1] if linear => vec![*a, *b],
        _ => shape.to_vec(),
    }
}

/// The EMA copy's key of a full CompVis UNet key (`model.diffusion_model.input_blocks.0.0.weight`
/// -> `model_ema.diffusion_modelinput_blocks00weight`).
pub fn ema_key(full_unet_key: &str) -> Option<String> {
    let rest = full_unet_key.strip_prefix("model.")?;
    Some(format!("{EMA_PREFIX}{}", rest.replace('.', "")))
}

/// Whether a CompVis file holds EMA weights (any `model_ema.*` tensor but the bookkeeping).
pub fn has_ema<'a>(names: impl IntoIterator<Item = &'a str>) -> bool {
    names.into_iter().any(|n| n.starts_with(EMA_PREFIX) && !IGNORED_COMPVIS_KEYS.contains(&n))
}

/// Where one tensor of a CompVis file goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedKey {
    /// The key in the file (for the UNet with EMA chosen, the `model_ema.*` copy).
    pub source: String,
    pub component: Component,
    /// The diffusers key.
    pub target: String,
}

/// Places every tensor of a CompVis file: returns the mapped keys (sorted by component and
/// target), or one usage error naming the first key that has no place, an EMA copy that is
/// missing, or two keys landing on one name. Ignored: [`IGNORED_COMPVIS_KEYS`], and `model_ema.*`
/// unless `use_ema`.
pub fn plan_compvis<'a>(
    names: impl IntoIterator<Item = &'a str>,
    layers_per_block: usize,
    use_ema: bool,
) -> Result<Vec<MappedKey>> {
    let names: Vec<&str> = names.into_iter().collect();
    let decoder_levels = names
        .iter()
        .filter_map(|n| {
            n.strip_prefix(VAE_PREFIX)?.strip_prefix("decoder.up.")?.split('.').next().and_then(index)
        })
        .max()
        .map_or(0, |m| m + 1);
    let mut mapped = Vec::with_capacity(names.len());
    let mut ema: HashSet<&str> = HashSet::new();
    let mut unplaced: Vec<&str> = Vec::new();
    for &name in &names {
        if IGNORED_COMPVIS_KEYS.contains(&name) {
            continue;
        }
        let placed = if let Some(k) = name.strip_prefix(UNET_PREFIX) {
            unet_key(k, layers_per_block).map(|t| (Component::Unet, t))
        } else if let Some(k) = name.strip_prefix(VAE_PREFIX) {
            vae_key(k, decoder_levels).map(|t| (Component::Vae, t))
        } else if let Some(k) = name.strip_prefix(TEXT_ENCODER_PREFIX) {
            text_encoder_key(k).map(|t| (Component::TextEncoder, t))
        } else if name.starts_with(EMA_PREFIX) {
            ema.insert(name);
            continue;
        } else {
            None
        };
        match placed {
            Some((component, target)) => {
                mapped.push(MappedKey { source: name.to_string(), component, target })
            }
            None => unplaced.push(name),
        }
    }
    if let Some(first) = unplaced.first() {
        let more = match unplaced.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        return Err(Error::usage(format!(
            "tensor `{first}`{more} has no place in the Stable Diffusion v1 UNet (layers_per_block \
             {layers_per_block}), VAE or text encoder; is this an SD v1.x checkpoint matching the UNet config?"
        )));
    }
    if use_ema {
        if ema.is_empty() {
            return Err(Error::usage(
                "EMA weights were asked for but the file has none (no `model_ema.*` tensors); load the non-EMA weights instead",
            ));
        }
        for m in mapped.iter_mut().filter(|m| m.component == Component::Unet) {
            let key = ema_key(&m.source).expect("UNet keys start with `model.`");
            if !ema.remove(key.as_str()) {
                return Err(Error::usage(format!(
                    "the EMA copy `{key}` of `{}` is missing; the file's EMA weights are incomplete: load the non-EMA weights instead",
                    m.source
                )));
            }
            m.source = key;
        }
        let mut left: Vec<&str> = ema.into_iter().collect();
        left.sort_unstable();
        if let Some(first) = left.first() {
            return Err(Error::usage(format!(
                "EMA tensor `{first}`{} matches no UNet tensor `model.diffusion_model.*`; is this an SD v1.x checkpoint?",
                if left.len() > 1 { format!(" (and {} more)", left.len() - 1) } else { String::new() }
            )));
        }
    }
    let mut seen: HashMap<(Component, &str), &str> = HashMap::new();
    for m in &mapped {
        if let Some(other) = seen.insert((m.component, m.target.as_str()), m.source.as_str()) {
            return Err(Error::usage(format!(
                "tensors `{other}` and `{}` both map to `{}`; the file is not a consistent SD v1.x checkpoint",
                m.source, m.target
            )));
        }
    }
    mapped.sort_by(|a, b| (a.component, &a.target).cmp(&(b.component, &b.target)));
    Ok(mapped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_keys_follow_the_level_arithmetic() {
        let m = |k: &str| unet_key(k, 2);
        assert_eq!(m("input_blocks.0.0.weight").as_deref(), Some("conv_in.weight"));
        assert_eq!(
            m("input_blocks.1.0.in_layers.0.bias").as_deref(),
            Some("down_blocks.0.resnets.0.norm1.bias")
        );
        assert_eq!(
            m("input_blocks.2.1.transformer_blocks.0.attn1.to_q.weight").as_deref(),
            Some("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight")
        );
        assert_eq!(
            m("input_blocks.3.0.op.weight").as_deref(),
            Some("down_blocks.0.downsamplers.0.conv.weight")
        );
        assert_eq!(
            m("input_blocks.4.0.skip_connection.weight").as_deref(),
            Some("down_blocks.1.resnets.0.conv_shortcut.weight")
        );
        assert_eq!(
            m("input_blocks.11.0.out_layers.3.weight").as_deref(),
            Some("down_blocks.3.resnets.1.conv2.weight")
        );
        assert_eq!(
            m("middle_block.1.proj_in.weight").as_deref(),
            Some("mid_block.attentions.0.proj_in.weight")
        );
        assert_eq!(
            m("middle_block.2.emb_layers.1.weight").as_deref(),
            Some("mid_block.resnets.1.time_emb_proj.weight")
        );
        assert_eq!(
            m("output_blocks.2.1.conv.weight").as_deref(),
            Some("up_blocks.0.upsamplers.0.conv.weight")
        );
        assert_eq!(m("output_blocks.5.2.conv.bias").as_deref(), Some("up_blocks.1.upsamplers.0.conv.bias"));
        assert_eq!(
            m("output_blocks.5.1.norm.weight").as_deref(),
            Some("up_blocks.1.attentions.2.norm.weight")
        );
        assert_eq!(
            m("output_blocks.0.0.in_layers.2.weight").as_deref(),
            Some("up_blocks.0.resnets.0.conv1.weight")
        );
        assert_eq!(m("time_embed.2.bias").as_deref(), Some("time_embedding.linear_2.bias"));
        assert_eq!(m("out.0.weight").as_deref(), Some("conv_norm_out.weight"));
        assert_eq!(m("out.2.bias").as_deref(), Some("conv_out.bias"));
        // Not places: an upsampler in the middle of a level, unknown sub-keys, bad indices.
        assert_eq!(m("output_blocks.1.1.conv.weight"), None);
        assert_eq!(m("input_blocks.3.1.norm.weight"), None);
        assert_eq!(m("input_blocks.1.0.in_layers.1.weight"), None);
        assert_eq!(m("input_blocks.01.0.in_layers.0.weight"), None);
        assert_eq!(m("label_emb.0.0.weight"), None);
    }

    #[test]
    fn vae_keys_reverse_the_decoder_levels() {
        let m = |k: &str| vae_key(k, 4);
        assert_eq!(
            m("decoder.up.0.block.2.nin_shortcut.weight").as_deref(),
            Some("decoder.up_blocks.3.resnets.2.conv_shortcut.weight")
        );
        assert_eq!(
            m("decoder.up.3.upsample.conv.bias").as_deref(),
            Some("decoder.up_blocks.0.upsamplers.0.conv.bias")
        );
        assert_eq!(
            m("encoder.down.1.downsample.conv.weight").as_deref(),
            Some("encoder.down_blocks.1.downsamplers.0.conv.weight")
        );
        assert_eq!(
            m("encoder.mid.attn_1.proj_out.bias").as_deref(),
            Some("encoder.mid_block.attentions.0.to_out.0.bias")
        );
        assert_eq!(
            m("decoder.mid.attn_1.norm.weight").as_deref(),
            Some("decoder.mid_block.attentions.0.group_norm.weight")
        );
        assert_eq!(m("encoder.norm_out.bias").as_deref(), Some("encoder.conv_norm_out.bias"));
        assert_eq!(m("post_quant_conv.weight").as_deref(), Some("post_quant_conv.weight"));
        assert_eq!(m("decoder.up.4.block.0.conv1.weight"), None);
        assert_eq!(m("encoder.up.0.block.0.conv1.weight"), None);
        assert_eq!(
            vae_diffusers_key("decoder.mid_block.attentions.0.proj_attn.bias"),
            "decoder.mid_block.attentions.0.to_out.0.bias"
        );
        assert_eq!(
            vae_diffusers_key("encoder.mid_block.attentions.0.key.weight"),
            "encoder.mid_block.attentions.0.to_k.weight"
        );
        assert_eq!(vae_target_shape("encoder.mid_block.attentions.0.to_k.weight", &[8, 8, 1, 1]), vec![8, 8]);
        assert_eq!(vae_target_shape("encoder.conv_in.weight", &[8, 3, 1, 1]), vec![8, 3, 1, 1]);
    }

    #[test]
    fn ema_and_text_encoder_names() {
        assert_eq!(
            ema_key("model.diffusion_model.input_blocks.0.0.weight").as_deref(),
            Some("model_ema.diffusion_modelinput_blocks00weight")
        );
        assert_eq!(
            text_encoder_key("text_model.encoder.layers.0.self_attn.q_proj.weight").as_deref(),
            Some("text_model.encoder.layers.0.self_attn.q_proj.weight")
        );
        assert_eq!(
            text_encoder_key("final_layer_norm.bias").as_deref(),
            Some("text_model.final_layer_norm.bias")
        );
        assert_eq!(text_encoder_key("logit_scale"), None);
    }
}
