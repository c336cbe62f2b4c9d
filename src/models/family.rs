//! What the pipeline stages need to know about a model family besides its denoiser: how it is
//! conditioned (class labels or text prompts, and the null condition classifier-free guidance
//! contrasts with), the shape of what it denoises (pixels or latents), and how that becomes an
//! image (clamping, or the first-stage VAE's decoder).

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};

use super::NUM_CLASSES;
use super::clip::ClipTextModel;
use super::clip::tokenizer::{ClipTokenizer, MAX_LEN};
use super::sd::{AutoencoderKl, SdArch, SdConfig};
use crate::error::{Error, Result};
use crate::rng::SeededRng;

/// A batch's conditioning.
#[derive(Debug, Clone)]
pub enum Cond {
    /// Class labels `[B]` (the null label for the unconditional branch).
    Labels(Tensor<1, Int>),
    /// Conditioning tokens `[B, M, D]` (CLIP's last hidden state for SD).
    Tokens(Tensor<3>),
}

impl From<Tensor<1, Int>> for Cond {
    fn from(labels: Tensor<1, Int>) -> Self {
        Cond::Labels(labels)
    }
}

impl Cond {
    pub fn kind(&self) -> &'static str {
        match self {
            Cond::Labels(_) => "class-label",
            Cond::Tokens(_) => "token",
        }
    }

    pub fn batch(&self) -> usize {
        match self {
            Cond::Labels(l) => l.dims()[0],
            Cond::Tokens(t) => t.dims()[0],
        }
    }

    /// Concatenates along the batch (e.g. conditional then unconditional); all parts of one kind.
    pub fn cat(parts: Vec<Cond>) -> Cond {
        let (mut labels, mut tokens) = (Vec::new(), Vec::new());
        for part in parts {
            match part {
                Cond::Labels(l) => labels.push(l),
                Cond::Tokens(t) => tokens.push(t),
            }
        }
        match (labels.is_empty(), tokens.is_empty()) {
            (false, true) => Cond::Labels(Tensor::cat(labels, 0)),
            (true, false) => Cond::Tokens(Tensor::cat(tokens, 0)),
            (true, true) => panic!("no conditions to concatenate"),
            (false, false) => panic!("cannot concatenate label and token conditions"),
        }
    }

    /// Batch elements `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Cond {
        match self {
            Cond::Labels(l) => Cond::Labels(l.clone().narrow(0, start, len)),
            Cond::Tokens(t) => Cond::Tokens(t.clone().narrow(0, start, len)),
        }
    }

    /// The same values as a tensor of the autodiff device wrapping theirs.
    pub fn from_inner(self) -> Cond {
        match self {
            Cond::Labels(l) => Cond::Labels(Tensor::from_inner(l)),
            Cond::Tokens(t) => Cond::Tokens(Tensor::from_inner(t)),
        }
    }
}

/// How a family is conditioned.
pub enum Conditioner {
    /// Labels `0..classes`; label `classes` is the null label.
    Classes { classes: usize },
    /// Prompts through CLIP's tokenizer and text transformer; the null condition is the
    /// negative prompt's embedding `[1, M, D]` (SD: the empty prompt), encoded once.
    Text { tokenizer: ClipTokenizer, encoder: ClipTextModel, prompts: Vec<String>, negative: Tensor<3> },
}

/// A model family at run time: conditioning, sample shape, and the way to images.
pub struct Family {
    pub conditioner: Conditioner,
    /// `[C, H, W]` of what the denoiser denoises.
    pub sample_shape: [usize; 3],
    /// Decodes latents to images (latent families).
    pub first_stage: Option<AutoencoderKl>,
    pub device: Device,
}

impl Family {
    /// The tiny MNIST models: ten class labels, 1 x 32 x 32 pixels.
    pub fn tiny(device: &Device) -> Self {
        Self {
            conditioner: Conditioner::Classes { classes: NUM_CLASSES },
            sample_shape: [1, 32, 32],
            first_stage: None,
            device: device.clone(),
        }
    }

    /// A DiT of `cfg`: its class labels and sample shape; a latent DiT's samples are decoded by
    /// `vae` (DiT-XL/2: the SD AutoencoderKL, sd-vae-ft-ema/mse).
    pub fn dit(cfg: &super::dit::DitConfig, vae: Option<AutoencoderKl>, device: &Device) -> Self {
        Self {
            conditioner: Conditioner::Classes { classes: cfg.num_classes },
            sample_shape: [cfg.in_channels, cfg.input_size, cfg.input_size],
            first_stage: vae,
            device: device.clone(),
        }
    }

    /// Whether the MNIST classifier's feature space scores this family (FID, accuracy): the
    /// tiny models' ten digits as 1 x 32 x 32 pixels.
    pub fn is_mnist(&self) -> bool {
        matches!(self.conditioner, Conditioner::Classes { classes: NUM_CLASSES })
            && self.sample_shape == [1, 32, 32]
            && self.first_stage.is_none()
    }

    /// SD: prompts from `model.sd.prompts`, the given text encoder and VAE.
    pub fn sd(
        sd: &SdConfig,
        text_encoder: ClipTextModel,
        vae: AutoencoderKl,
        device: &Device,
    ) -> Result<Self> {
        let arch = SdArch::of(sd.preset);
        let side = sd.resolution / arch.vae_factor();
        let tokenizer = ClipTokenizer::sd()?;
        let negative = encode_texts(&tokenizer, &text_encoder, &[sd.negative_prompt.as_str()], device);
        Ok(Self {
            conditioner: Conditioner::Text {
                tokenizer,
                encoder: text_encoder,
                prompts: read_prompts(&sd.prompts)?,
                negative,
            },
            sample_shape: [arch.unet.in_channels, side, side],
            first_stage: Some(vae),
            device: device.clone(),
        })
    }

    /// Samples these prompts instead of the prompts file (text families only).
    pub fn set_prompts(&mut self, given: Vec<String>) -> Result<()> {
        match &mut self.conditioner {
            Conditioner::Text { prompts, .. } => {
                *prompts = given;
                Ok(())
            }
            Conditioner::Classes { .. } => Err(Error::usage(
                "--prompt is for text-conditioned models; this config's model takes class labels",
            )),
        }
    }

    /// How many distinct conditions the family cycles through (classes or prompts).
    pub fn cycle_len(&self) -> usize {
        match &self.conditioner {
            Conditioner::Classes { classes } => *classes,
            Conditioner::Text { prompts, .. } => prompts.len(),
        }
    }

    /// Conditions `indices` (class labels, or prompt numbers) as a batch.
    pub fn cond(&self, indices: &[usize]) -> Cond {
        match &self.conditioner {
            Conditioner::Classes { .. } => Cond::Labels(Tensor::from_data(
                TensorData::new(indices.iter().map(|&l| l as i64).collect::<Vec<_>>(), [indices.len()]),
                &self.device,
            )),
            Conditioner::Text { prompts, .. } => {
                let texts: Vec<&str> = indices.iter().map(|&i| prompts[i % prompts.len()].as_str()).collect();
                self.encode(&texts)
            }
        }
    }

    /// Conditions of `n` samples drawn at random from `rng` (one draw per sample).
    pub fn draw(&self, rng: &mut SeededRng, n: usize) -> Cond {
        let len = self.cycle_len();
        let indices: Vec<usize> = (0..n).map(|_| rng.below(len)).collect();
        self.cond(&indices)
    }

    /// The null condition for `n` samples.
    pub fn null(&self, n: usize) -> Cond {
        match &self.conditioner {
            Conditioner::Classes { classes } => {
                Cond::Labels(Tensor::full([n], *classes as i64, &self.device))
            }
            Conditioner::Text { negative, .. } => Cond::Tokens(negative.clone().repeat_dim(0, n)),
        }
    }

    /// Text prompts as conditioning tokens (text families only).
    pub fn encode(&self, texts: &[&str]) -> Cond {
        let Conditioner::Text { tokenizer, encoder, .. } = &self.conditioner else {
            panic!("prompts given to a class-conditional model");
        };
        Cond::Tokens(encode_texts(tokenizer, encoder, texts, &self.device))
    }

    /// What the sampler produced, as images in [-1, 1] `[B, C, H, W]`.
    pub fn to_images(&self, x: burn::tensor::Tensor<4>) -> burn::tensor::Tensor<4> {
        match &self.first_stage {
            None => x.clamp(-1.0, 1.0),
            Some(vae) => vae.decode(x / vae.scaling_factor).clamp(-1.0, 1.0),
        }
    }

    /// `[C, H, W]` of the images [`Family::to_images`] returns.
    pub fn image_shape(&self) -> [usize; 3] {
        let [c, h, w] = self.sample_shape;
        match &self.first_stage {
            None => [c, h, w],
            Some(vae) => {
                let f = 1 << (vae.decoder.up_blocks.len() - 1);
                [vae.decoder.conv_out.weight.dims()[0], h * f, w * f]
            }
        }
    }
}

/// CLIP's last hidden state `[n, MAX_LEN, D]` of `n` texts.
fn encode_texts(
    tokenizer: &ClipTokenizer,
    encoder: &ClipTextModel,
    texts: &[&str],
    device: &Device,
) -> Tensor<3> {
    let vocab = encoder.text_model.embeddings.token_embedding.weight.dims()[0] as i64;
    let ids: Vec<i64> = texts
        .iter()
        // A test-size encoder has a smaller vocabulary: ids are folded into it.
        .flat_map(|t| tokenizer.encode(t, MAX_LEN).into_iter().map(|id| id as i64 % vocab))
        .collect();
    encoder.forward(Tensor::<2, Int>::from_data(TensorData::new(ids, [texts.len(), MAX_LEN]), device))
}

/// Prompts, one per line; blank lines and `#` comments skipped.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::usage(format!("{}: cannot read the prompts file ({e}); set model.sd.prompts", path.display()))
    })?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if prompts.is_empty() {
        usage!("{}: no prompts in the file (one per line)", path.display());
    }
    Ok(prompts)
}
