//! DiT weights as published, in either layout, mapped onto [`Dit`]'s parameter names:
//!
//! - facebookresearch/DiT's `DiT-XL-2-256x256.pt`: a plain pickled state dict (read without
//!   executing pickle code; a `.safetensors` with the same names works too): `x_embedder.proj`,
//!   `t_embedder.mlp.{0,2}`, `y_embedder.embedding_table`, `blocks.N.{attn.qkv, attn.proj,
//!   mlp.fc1, mlp.fc2, adaLN_modulation.1}`, `final_layer.{adaLN_modulation.1, linear}` and the
//!   fixed `pos_embed` (checked for its shape, then recomputed by the model).
//! - a diffusers `DiTTransformer2DModel` directory (`transformer/` of a pipeline, or the folder
//!   itself): `attn1.to_q/k/v` (fused here into `qkv`), `ff.net.{0.proj,2}`, `norm1.linear`,
//!   `proj_out_{1,2}`, and a copy of the timestep and class embedders in every block, which must
//!   all equal block 0's (msfp's DiT has one). diffusers computes the timestep frequencies with
//!   `downscale_freq_shift = 1`, so its weights need `model.dit.freq_shift = 1`.

use std::path::Path;

use burn::tensor::Device;

use super::dit::Dit;
use super::dit::DitConfig;
use crate::base::params::{self, HostTensor, NamedTensors};
use crate::error::{Error, Result};
use crate::io::Checkpoint;
use crate::models::sd::weights::{DIFFUSERS_MODEL_FILES, pick_file};
use crate::rng::SeededRng;

/// Whether `path` holds a published DiT (a directory, a pickle, or a `.safetensors` with
/// facebookresearch's names) rather than msfp's own safetensors.
pub fn is_published(path: &Path) -> bool {
    if path.is_dir() {
        return true;
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("pt" | "pth" | "bin") => true,
        Some("safetensors") => {
            Checkpoint::open(path).is_ok_and(|c| c.info("x_embedder.proj.weight").is_some())
        }
        _ => false,
    }
}

/// A DiT of `cfg` with the published weights at `path`.
pub fn load_published(cfg: &DitConfig, path: &Path, device: &Device) -> Result<Dit> {
    let (tensors, origin) = if path.is_dir() {
        let dir =
            if path.join("transformer").is_dir() { path.join("transformer") } else { path.to_path_buf() };
        if cfg.freq_shift != 1 {
            return Err(Error::usage(format!(
                "{}: diffusers' DiTTransformer2DModel computes timestep frequencies with downscale_freq_shift = 1; \
                 set model.dit.freq_shift = 1 for these weights",
                dir.display()
            )));
        }
        let file = pick_file(&dir, DIFFUSERS_MODEL_FILES, "a diffusers DiT directory")?;
        (from_diffusers(read_all(&file)?, cfg.depth, &file)?, file)
    } else if path.exists() {
        if cfg.freq_shift != 0 {
            return Err(Error::usage(format!(
                "{}: facebookresearch's DiT computes timestep frequencies over 128 (model.dit.freq_shift = 0); \
                 freq_shift = 1 is for diffusers' DiTTransformer2DModel",
                path.display()
            )));
        }
        let grid = cfg.input_size / cfg.patch_size;
        (from_facebook(read_all(path)?, grid * grid, cfg.hidden, path)?, path.to_path_buf())
    } else {
        return Err(Error::usage(format!(
            "{}: not found; pass facebookresearch's DiT-XL-2-256x256.pt or a diffusers DiT directory",
            path.display()
        )));
    };
    let model = Dit::new(cfg, &mut SeededRng::new(0), device);
    params::load_into(model, &tensors, &origin).map_err(|e| Error::usage(e.message))
}

fn read_all(path: &Path) -> Result<NamedTensors> {
    let ckpt = Checkpoint::open(path)?;
    ckpt.names().map(|name| Ok((name.to_string(), ckpt.read_f32(name)?))).collect()
}

/// Our name of each facebookresearch tensor.
fn facebook_key(key: &str) -> Option<String> {
    let direct = [
        ("x_embedder.proj.", "patch_embed."),
        ("t_embedder.mlp.0.", "t_embed_1."),
        ("t_embedder.mlp.2.", "t_embed_2."),
        ("y_embedder.embedding_table.", "class_embed."),
        ("final_layer.adaLN_modulation.1.", "final_ada_ln."),
        ("final_layer.linear.", "final_linear."),
    ];
    for (from, to) in direct {
        if let Some(rest) = key.strip_prefix(from) {
            return Some(format!("{to}{rest}"));
        }
    }
    let rest = key.strip_prefix("blocks.")?;
    let (i, sub) = rest.split_once('.')?;
    let sub = match sub {
        s if s.starts_with("attn.") || s.starts_with("mlp.") => s.to_string(),
        s => format!("ada_ln.{}", s.strip_prefix("adaLN_modulation.1.")?),
    };
    Some(format!("blocks.{i}.{sub}"))
}

fn from_facebook(tensors: NamedTensors, tokens: usize, hidden: usize, origin: &Path) -> Result<NamedTensors> {
    let mut out = NamedTensors::new();
    for (key, t) in tensors {
        if key == "pos_embed" {
            if t.shape != [1, tokens, hidden] {
                return Err(Error::usage(format!(
                    "{}: `pos_embed` has shape {:?}, this config needs [1, {tokens}, {hidden}] (model.dit.input_size / patch_size / hidden)",
                    origin.display(),
                    t.shape
                )));
            }
            continue;
        }
        let name = facebook_key(&key).ok_or_else(|| {
            Error::usage(format!(
                "{}: tensor `{key}` is not part of a DiT; is this facebookresearch's DiT checkpoint?",
                origin.display()
            ))
        })?;
        out.insert(name, t);
    }
    Ok(out)
}

/// The diffusers tensors under our names. Every tensor is used once (moved, q/k/v fused), the
/// per-block embedder copies are checked against block 0's and dropped, and anything left over
/// (a block beyond `depth`, a foreign tensor) is an error.
fn from_diffusers(mut tensors: NamedTensors, depth: usize, origin: &Path) -> Result<NamedTensors> {
    let emb = "transformer_blocks.0.norm1.emb.";
    // Every block's copy of the embedders must be block 0's: msfp's DiT has one.
    let copies: Vec<String> = tensors
        .keys()
        .filter(|k| k.contains(".norm1.emb.") && !k.starts_with("transformer_blocks.0."))
        .cloned()
        .collect();
    for key in copies {
        let t = tensors.remove(&key).expect("listed key");
        let e = key.split_once(".norm1.emb.").expect("embedder key").1;
        if tensors.get(&format!("{emb}{e}")) != Some(&t) {
            return Err(Error::usage(format!(
                "{}: `{key}` differs from block 0's copy; msfp's DiT shares one timestep/class embedder \
                 (a converted facebookresearch checkpoint has identical copies)",
                origin.display()
            )));
        }
    }
    let mut take = |k: &str| -> Result<HostTensor> {
        tensors.remove(k).ok_or_else(|| {
            Error::usage(format!(
                "{}: tensor `{k}` is missing; is this a diffusers DiTTransformer2DModel?",
                origin.display()
            ))
        })
    };
    let mut out = NamedTensors::new();
    for p in ["weight", "bias"] {
        out.insert(format!("patch_embed.{p}"), take(&format!("pos_embed.proj.{p}"))?);
        out.insert(format!("t_embed_1.{p}"), take(&format!("{emb}timestep_embedder.linear_1.{p}"))?);
        out.insert(format!("t_embed_2.{p}"), take(&format!("{emb}timestep_embedder.linear_2.{p}"))?);
        out.insert(format!("final_ada_ln.{p}"), take(&format!("proj_out_1.{p}"))?);
        out.insert(format!("final_linear.{p}"), take(&format!("proj_out_2.{p}"))?);
    }
    out.insert("class_embed.weight".into(), take(&format!("{emb}class_embedder.embedding_table.weight"))?);
    for i in 0..depth {
        let b = format!("transformer_blocks.{i}.");
        for p in ["weight", "bias"] {
            out.insert(format!("blocks.{i}.attn.proj.{p}"), take(&format!("{b}attn1.to_out.0.{p}"))?);
            out.insert(format!("blocks.{i}.mlp.fc1.{p}"), take(&format!("{b}ff.net.0.proj.{p}"))?);
            out.insert(format!("blocks.{i}.mlp.fc2.{p}"), take(&format!("{b}ff.net.2.{p}"))?);
            out.insert(format!("blocks.{i}.ada_ln.{p}"), take(&format!("{b}norm1.linear.{p}"))?);
            let [q, k, v] = ["q", "k", "v"].map(|n| take(&format!("{b}attn1.to_{n}.{p}")));
            let (q, k, v) = (q?, k?, v?);
            let mut shape = q.shape.clone();
            shape[0] *= 3;
            let data = [q.data, k.data, v.data].concat();
            out.insert(format!("blocks.{i}.attn.qkv.{p}"), HostTensor { shape, data });
        }
    }
    if let Some(k) = tensors.keys().next() {
        return Err(Error::usage(format!("{}: unexpected tensor `{k}` for a DiT", origin.display())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use burn::tensor::{Int, Tensor, TensorData};

    use super::*;
    use crate::base::params::load_safetensors;
    use crate::nn::StepCtx;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dit/tiny")
    }

    /// The fixtures' config (`tools/gen_dit_fixtures.py`): DiT-XL/2's shape at width 32, depth 2.
    fn tiny(freq_shift: usize) -> DitConfig {
        DitConfig {
            hidden: 32,
            depth: 2,
            heads: 2,
            freq_shift,
            ..DitConfig::published("DiT-XL/2", 64).unwrap()
        }
    }

    /// Our full output (eps and variance halves) on the fixture's inputs against `reference`.
    fn assert_matches(model: &Dit, reference: &str) {
        let device = Device::flex();
        let (io, _) = load_safetensors(&fixtures().join("io.safetensors")).unwrap();
        let t = |k: &str| TensorData::new(io[k].data.clone(), io[k].shape.clone());
        let x = Tensor::<4>::from_data(t("x"), &device);
        let ts = Tensor::<1>::from_data(t("t"), &device);
        let y = Tensor::<1, Int>::from_data(TensorData::new(vec![3i64, 1000], [2]), &device);
        let out = crate::base::params::host_values(model.forward(x, ts, y, &StepCtx::default()));
        let want = &io[reference].data;
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = out.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-4 * scale, "{reference}: max |ours - reference| = {diff} (scale {scale})");
    }

    #[test]
    fn facebook_checkpoint_matches_dits_own_forward() {
        let m = load_published(&tiny(0), &fixtures().join("DiT-tiny.pt"), &Device::flex()).unwrap();
        assert_matches(&m, "out_facebook");
    }

    #[test]
    fn diffusers_directory_matches_diffusers() {
        let m = load_published(&tiny(1), &fixtures().join("diffusers"), &Device::flex()).unwrap();
        assert_matches(&m, "out_diffusers");
    }

    #[test]
    fn both_layouts_load_the_same_tensors() {
        let device = Device::flex();
        let a = load_published(&tiny(0), &fixtures().join("DiT-tiny.pt"), &device).unwrap();
        let b = load_published(&tiny(1), &fixtures().join("diffusers"), &device).unwrap();
        let (a, b) = (params::collect(&a), params::collect(&b));
        assert_eq!(a.len(), b.len());
        assert_eq!(a, b);
    }

    #[test]
    fn mistakes_are_one_usage_error_naming_file_and_cause() {
        let device = Device::flex();
        let err = load_published(&tiny(0), &fixtures().join("diffusers"), &device).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.message.contains("model.dit.freq_shift = 1"), "{err}");
        let err = load_published(&tiny(1), &fixtures().join("DiT-tiny.pt"), &device).unwrap_err();
        assert!(err.message.contains("freq_shift = 0"), "{err}");
        // A config of another width: the file and a tensor with its shape are named.
        let wide = DitConfig { hidden: 64, ..tiny(0) };
        let err = load_published(&wide, &fixtures().join("DiT-tiny.pt"), &device).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.message.contains("DiT-tiny.pt") && err.message.contains("pos_embed"), "{err}");
        // A checkpoint deeper than the config: its extra blocks are not silently dropped.
        let shallow = DitConfig { depth: 1, ..tiny(1) };
        let err = load_published(&shallow, &fixtures().join("diffusers"), &device).unwrap_err();
        assert!(err.message.contains("unexpected tensor `transformer_blocks.1."), "{err}");
        // A diffusers file whose blocks carry different embedders.
        let dir = tempfile::tempdir().unwrap();
        let src = fixtures().join("diffusers/transformer/diffusion_pytorch_model.safetensors");
        let (mut tensors, _) = load_safetensors(&src).unwrap();
        let key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias";
        tensors.get_mut(key).unwrap().data[0] += 1.0;
        let out = dir.path().join("diffusion_pytorch_model.safetensors");
        params::save_safetensors(&out, &tensors, &Default::default()).unwrap();
        let err = load_published(&tiny(1), dir.path(), &device).unwrap_err();
        assert!(err.message.contains(key) && err.message.contains("block 0"), "{err}");
        assert!(is_published(&fixtures().join("DiT-tiny.pt")) && is_published(&fixtures().join("diffusers")));
        let ours = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("checkpoints/tiny_dit_mnist.safetensors");
        assert!(!is_published(&ours), "msfp's own safetensors");
    }

    /// `name -> shape` of a committed DiT-XL/2 key list, as tensors without values.
    fn key_list(file: &str) -> NamedTensors {
        let text = std::fs::read_to_string(fixtures().join("../xl2_keys").join(file)).unwrap();
        text.lines()
            .map(|l| {
                let (name, shape) = l.split_once('\t').unwrap();
                let shape = shape.split(',').map(|d| d.parse().unwrap()).collect();
                (name.to_string(), HostTensor { shape, data: Vec::new() })
            })
            .collect()
    }

    /// Every tensor of the real DiT-XL/2 files (facebookresearch's 292, diffusers' 538) maps onto
    /// exactly the parameters `DitConfig::published("DiT-XL/2", 256)` builds, with their shapes;
    /// the model has the published 675,129,632 values less the fixed position embedding.
    #[test]
    fn full_size_xl2_keys_map_onto_the_model() {
        let cfg = DitConfig::published("DiT-XL/2", 256).unwrap();
        let model = Dit::new(&cfg, &mut SeededRng::new(0), &Device::flex());
        let mut ours = std::collections::BTreeMap::new();
        params::for_each_param(&model, |path, _, dims| {
            ours.insert(path.to_string(), dims.to_vec());
        });
        let origin = Path::new("xl2_keys");
        let facebook = key_list("facebook.txt");
        let total: usize = facebook.values().map(|t| t.shape.iter().product::<usize>()).sum();
        assert_eq!(total, 675_129_632);
        let shapes = |t: NamedTensors| {
            t.into_iter().map(|(k, v)| (k, v.shape)).collect::<std::collections::BTreeMap<_, _>>()
        };
        assert_eq!(shapes(from_facebook(facebook, 256, 1152, origin).unwrap()), ours);
        assert_eq!(shapes(from_diffusers(key_list("diffusers.txt"), 28, origin).unwrap()), ours);
        assert_eq!(
            ours.values().map(|s| s.iter().product::<usize>()).sum::<usize>(),
            675_129_632 - 256 * 1152
        );
    }
}
