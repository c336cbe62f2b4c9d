//! CLIP's text transformer as SD1.x conditions on it (transformers' `CLIPTextModel`, ViT-L/14:
//! 12 layers of width 768, causal self-attention, QuickGELU, final layer norm; the output is the
//! last hidden state of all 77 positions). Parameter paths are the `text_model.*` keys of SD's
//! files. It stays in full precision in msfp's jobs.

use burn::module::Module;
use burn::tensor::activation::sigmoid;
use burn::tensor::{Bool, Device, Int, Tensor};

use crate::nn::attention::{MatmulInput, attend};
use crate::nn::{Embedding, LayerNorm, Linear, StepCtx};
use crate::rng::SeededRng;

#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
}

impl ClipTextConfig {
    /// CLIP ViT-L/14's text tower (SD1.x's `text_encoder`).
    pub fn vit_l14() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            layer_norm_eps: 1e-5,
        }
    }

    /// Reads transformers' `text_encoder/config.json` (QuickGELU only, as CLIP ViT-L/14).
    pub fn from_json(path: &std::path::Path) -> crate::error::Result<Self> {
        #[derive(serde::Deserialize)]
        struct Raw {
            vocab_size: usize,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            max_position_embeddings: usize,
            layer_norm_eps: Option<f64>,
            hidden_act: Option<String>,
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| crate::error::Error::usage(format!("{}: {e}", path.display())))?;
        let raw: Raw = serde_json::from_str(&text).map_err(|e| {
            crate::error::Error::usage(format!("{}: not a CLIP text config ({e})", path.display()))
        })?;
        if raw.hidden_act.as_deref().is_some_and(|a| a != "quick_gelu") {
            usage!(
                "{}: hidden_act {:?} is not supported (quick_gelu, as CLIP ViT-L/14)",
                path.display(),
                raw.hidden_act
            );
        }
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            max_position_embeddings: raw.max_position_embeddings,
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-5),
        })
    }
}

#[derive(Module, Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub heads: usize,
    pub q_in: MatmulInput,
    pub k_in: MatmulInput,
    pub probs_in: MatmulInput,
    pub v_in: MatmulInput,
}

#[derive(Module, Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

#[derive(Module, Debug)]
pub struct ClipEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}

#[derive(Module, Debug)]
pub struct ClipEncoder {
    pub layers: Vec<ClipEncoderLayer>,
}

#[derive(Module, Debug)]
pub struct ClipTextTransformer {
    pub embeddings: ClipEmbeddings,
    pub encoder: ClipEncoder,
    pub final_layer_norm: LayerNorm,
}

/// `text_model.*`, as the keys of SD's text encoder files.
#[derive(Module, Debug)]
pub struct ClipTextModel {
    pub text_model: ClipTextTransformer,
}

/// `x * sigmoid(1.702 x)`.
fn quick_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clone() * sigmoid(x * 1.702)
}

impl ClipTextModel {
    pub fn new(cfg: &ClipTextConfig, rng: &mut SeededRng, device: &Device) -> Self {
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| ClipEncoderLayer {
                self_attn: ClipAttention {
                    q_proj: Linear::new(d, d, true, rng, device),
                    k_proj: Linear::new(d, d, true, rng, device),
                    v_proj: Linear::new(d, d, true, rng, device),
                    out_proj: Linear::new(d, d, true, rng, device),
                    heads: cfg.num_attention_heads,
                    q_in: MatmulInput::default(),
                    k_in: MatmulInput::default(),
                    probs_in: MatmulInput::default(),
                    v_in: MatmulInput::default(),
                },
                layer_norm1: LayerNorm::new(d, eps, device),
                mlp: ClipMlp {
                    fc1: Linear::new(d, cfg.intermediate_size, true, rng, device),
                    fc2: Linear::new(cfg.intermediate_size, d, true, rng, device),
                },
                layer_norm2: LayerNorm::new(d, eps, device),
            })
            .collect();
        Self {
            text_model: ClipTextTransformer {
                embeddings: ClipEmbeddings {
                    token_embedding: Embedding::new(cfg.vocab_size, d, 0.02, rng, device),
                    position_embedding: Embedding::new(cfg.max_position_embeddings, d, 0.01, rng, device),
                },
                encoder: ClipEncoder { layers },
                final_layer_norm: LayerNorm::new(d, eps, device),
            },
        }
    }

    /// Token ids `[B, N]` -> the last hidden state `[B, N, hidden]` (after the final layer norm).
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let ctx = StepCtx::default();
        let tm = &self.text_model;
        let [b, n] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<1, Int>::arange(0..n as i64, &device).reshape([1, n]);
        let mut h =
            tm.embeddings.token_embedding.forward(ids) + tm.embeddings.position_embedding.forward(positions);
        // Position i attends to positions <= i.
        let causal = Tensor::<2, Bool>::tril_mask([n, n], 0, &device).reshape([1, 1, n, n]);
        for layer in &tm.encoder.layers {
            let a = &layer.self_attn;
            let x = layer.layer_norm1.forward(h.clone());
            let heads = a.heads;
            let split = |t: Tensor<3>| {
                let c = t.dims()[2];
                t.reshape([b, n, heads, c / heads]).swap_dims(1, 2)
            };
            let (q, k, v) = (
                split(a.q_proj.forward(x.clone(), &ctx)),
                split(a.k_proj.forward(x.clone(), &ctx)),
                split(a.v_proj.forward(x, &ctx)),
            );
            let inputs = [&a.q_in, &a.k_in, &a.probs_in, &a.v_in];
            let out = attend(q, k, v, inputs, Some(causal.clone()), &ctx);
            h = h + a.out_proj.forward(out, &ctx);
            let x = layer.layer_norm2.forward(h.clone());
            h = h + layer.mlp.fc2.forward(quick_gelu(layer.mlp.fc1.forward(x, &ctx)), &ctx);
        }
        tm.final_layer_norm.forward(h)
    }
}
