//! Loading Stable Diffusion v1.x weights as published, into host tensors named by diffusers'
//! keys (see `keymap` for the names): a diffusers directory, or a CompVis single file (a
//! Lightning `.ckpt`, or a `.safetensors` with the same keys). Tensors are read one at a time and
//! converted to f32 as they are read, so loading needs about the f32 size of the weights, not
//! twice the file. Shapes are checked against the models by the code that applies these maps.

use std::path::{Path, PathBuf};

use crate::base::params::NamedTensors;
use crate::error::{Error, Result};
use crate::io::Checkpoint;

use super::keymap::{self, Component};

/// The three networks' weights, each keyed by diffusers' parameter names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SdWeights {
    pub unet: NamedTensors,
    pub vae: NamedTensors,
    pub text_encoder: NamedTensors,
}

/// Which UNet weights a CompVis file with EMA copies (`model_ema.*`) gives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EmaChoice {
    /// The EMA weights if the file has them, else the trained ones.
    #[default]
    Auto,
    /// The EMA weights; an error if the file has none.
    Ema,
    /// The trained (non-EMA) weights.
    NonEma,
}

/// Which networks to read: a job builds the UNet (teacher, student) and the conditioning (text
/// encoder, VAE) separately, and reading a 4 GB checkpoint's other half each time would double
/// the I/O. Unread parts are left empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    pub unet: bool,
    pub conditioning: bool,
}

impl Parts {
    pub const ALL: Parts = Parts { unet: true, conditioning: true };
    pub const UNET: Parts = Parts { unet: true, conditioning: false };
    pub const CONDITIONING: Parts = Parts { unet: false, conditioning: true };

    fn wants(self, c: Component) -> bool {
        match c {
            Component::Unet => self.unet,
            Component::Vae | Component::TextEncoder => self.conditioning,
        }
    }
}

/// Loads SD v1.x weights from `path`: a diffusers directory (`unet/`, `vae/`, `text_encoder/`)
/// or a CompVis single file (`.ckpt` or `.safetensors`). `layers_per_block` is the UNet
/// config's (SD: 2); the CompVis UNet map depends on it. A diffusers directory holds one set of
/// UNet weights, so there only [`EmaChoice::Auto`] is accepted.
pub fn load_sd_weights(path: &Path, layers_per_block: usize, ema: EmaChoice) -> Result<SdWeights> {
    load_sd_parts(path, layers_per_block, ema, Parts::ALL)
}

/// [`load_sd_weights`] reading only `parts` (the file is still checked for all three networks).
pub fn load_sd_parts(
    path: &Path,
    layers_per_block: usize,
    ema: EmaChoice,
    parts: Parts,
) -> Result<SdWeights> {
    if path.is_dir() {
        if ema != EmaChoice::Auto {
            return Err(Error::usage(format!(
                "{}: a diffusers directory holds one set of UNet weights; choosing EMA or non-EMA \
                 weights applies only to CompVis single files (.ckpt/.safetensors)",
                path.display()
            )));
        }
        load_diffusers_dir(path, parts)
    } else if path.exists() {
        load_compvis_file(path, layers_per_block, ema, parts)
    } else {
        Err(Error::usage(format!(
            "{}: not found; pass a diffusers directory (with unet/, vae/, text_encoder/) or a CompVis \
             .ckpt/.safetensors file",
            path.display()
        )))
    }
}

/// The first of `names` present in `dir`, or a usage error listing what was looked for and
/// asking whether `dir` is `what` (e.g. "a diffusers Stable Diffusion directory").
pub fn pick_file(dir: &Path, names: &[&str], what: &str) -> Result<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file()).ok_or_else(|| {
        Error::usage(format!("{}: none of {} found; is this {what}?", dir.display(), names.join(", ")))
    })
}

/// Weight files of a diffusers UNet or VAE folder, in order of preference (fp32 first).
pub const DIFFUSERS_MODEL_FILES: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
];

/// Weight files of a diffusers text-encoder folder, in order of preference (fp32 first).
pub const DIFFUSERS_TEXT_ENCODER_FILES: &[&str] =
    &["model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"];

/// Loads a diffusers directory: `unet/` and `vae/` (`diffusion_pytorch_model[.fp16].safetensors`)
/// and `text_encoder/` (`model[.fp16].safetensors`); fp32 files are preferred, fp16 ones read as
/// f32. Old VAE attention names are renamed, the text encoder's names get their `text_model.`
/// prefix if the file lacks it, and its integer `position_ids` is dropped.
pub fn load_diffusers_dir(dir: &Path, parts: Parts) -> Result<SdWeights> {
    let sd = "a diffusers Stable Diffusion directory";
    let unet = pick_file(&dir.join("unet"), DIFFUSERS_MODEL_FILES, sd)?;
    let vae = pick_file(&dir.join("vae"), DIFFUSERS_MODEL_FILES, sd)?;
    let text_encoder = pick_file(&dir.join("text_encoder"), DIFFUSERS_TEXT_ENCODER_FILES, sd)?;
    let read = |path: &Path, c: Component| {
        if parts.wants(c) { load_diffusers_file(path, c) } else { Ok(NamedTensors::new()) }
    };
    Ok(SdWeights {
        unet: read(&unet, Component::Unet)?,
        vae: read(&vae, Component::Vae)?,
        text_encoder: read(&text_encoder, Component::TextEncoder)?,
    })
}

/// Loads one diffusers weight file of `component`, normalising the names as
/// [`load_diffusers_dir`] says.
pub fn load_diffusers_file(path: &Path, component: Component) -> Result<NamedTensors> {
    let ckpt = Checkpoint::open(path)?;
    let mut out = NamedTensors::new();
    for info in ckpt.tensors() {
        let name = info.name.as_str();
        let target = match component {
            Component::Unet => name.to_string(),
            Component::Vae => keymap::vae_diffusers_key(name),
            Component::TextEncoder => {
                let Some(t) = keymap::text_encoder_key(name) else {
                    return Err(Error::usage(format!(
                        "{}: tensor `{name}` is not part of a CLIP text encoder (`text_model.*`); is this SD's text_encoder?",
                        path.display()
                    )));
                };
                if t == keymap::TEXT_ENCODER_POSITION_IDS {
                    continue;
                }
                t
            }
        };
        let mut t = ckpt.read_f32(name)?;
        if component == Component::Vae {
            t.shape = keymap::vae_target_shape(&target, &t.shape);
        }
        if out.insert(target.clone(), t).is_some() {
            return Err(Error::usage(format!(
                "{}: two tensors map to `{target}` (old and new VAE attention names side by side?); re-export the file",
                path.display()
            )));
        }
    }
    Ok(out)
}

/// Loads a CompVis single file (`.ckpt` Lightning checkpoint or `.safetensors`): every tensor is
/// placed by `keymap::plan_compvis` (an unplaceable key is an error naming it); Lightning's
/// training state outside `state_dict`, the noise-schedule buffers and (unless chosen) the EMA
/// copies are skipped.
pub fn load_compvis_file(
    path: &Path,
    layers_per_block: usize,
    ema: EmaChoice,
    parts: Parts,
) -> Result<SdWeights> {
    let ckpt = Checkpoint::open(path)?;
    let names = || ckpt.names();
    if ckpt.tensors().is_empty() {
        return Err(Error::usage(format!(
            "{}: holds no tensors; expected a Stable Diffusion checkpoint (a `state_dict` of tensors)",
            path.display()
        )));
    }
    let use_ema = match ema {
        EmaChoice::Auto => keymap::has_ema(names()),
        EmaChoice::Ema => true,
        EmaChoice::NonEma => false,
    };
    let plan =
        keymap::plan_compvis(names(), layers_per_block, use_ema).map_err(|e| e.context(path.display()))?;
    for (what, c) in
        [("UNet", Component::Unet), ("VAE", Component::Vae), ("text encoder", Component::TextEncoder)]
    {
        if !plan.iter().any(|m| m.component == c) {
            return Err(Error::usage(format!(
                "{}: has no {what} weights; a Stable Diffusion single file holds UNet, VAE and text encoder",
                path.display()
            )));
        }
    }
    let mut out = SdWeights::default();
    for m in plan.into_iter().filter(|m| parts.wants(m.component)) {
        let mut t = ckpt.read_f32(&m.source)?;
        let dest = match m.component {
            Component::Unet => &mut out.unet,
            Component::Vae => {
                t.shape = keymap::vae_target_shape(&m.target, &t.shape);
                &mut out.vae
            }
            Component::TextEncoder => &mut out.text_encoder,
        };
        dest.insert(m.target, t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::error::ErrorKind;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd")
    }

    fn assert_bit_identical(what: &str, a: &NamedTensors, b: &NamedTensors) {
        let (ka, kb): (Vec<_>, Vec<_>) = (a.keys().collect(), b.keys().collect());
        assert_eq!(ka, kb, "{what}: names differ");
        for (name, t) in a {
            let u = &b[name];
            assert_eq!(t.shape, u.shape, "{what}: {name}");
            assert!(
                t.data.iter().zip(&u.data).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{what}: {name} values differ"
            );
        }
    }

    fn assert_usage(err: Error, words: &[&str]) {
        assert_eq!(err.kind, ErrorKind::Usage, "{err}");
        assert!(!err.message.contains('\n'), "{err}");
        for w in words {
            assert!(err.message.contains(w), "`{w}` missing from: {err}");
        }
    }

    /// Reading only the UNet or only the conditioning gives exactly that half of a full read,
    /// from both layouts.
    #[test]
    fn parts_read_only_their_networks() {
        let root = fixtures().join("tiny");
        for path in [root.join("diffusers"), root.join("compvis").join("sd-tiny.ckpt")] {
            let ema = EmaChoice::Auto;
            let all = load_sd_weights(&path, 2, ema).unwrap();
            let unet = load_sd_parts(&path, 2, ema, Parts::UNET).unwrap();
            let cond = load_sd_parts(&path, 2, ema, Parts::CONDITIONING).unwrap();
            assert_eq!(
                unet,
                SdWeights { unet: all.unet.clone(), ..Default::default() },
                "{}",
                path.display()
            );
            assert_eq!(cond, SdWeights { unet: NamedTensors::new(), ..all }, "{}", path.display());
        }
    }

    #[test]
    fn tiny_diffusers_dir_and_compvis_files_agree() {
        let root = fixtures().join("tiny");
        let diffusers = load_sd_weights(&root.join("diffusers"), 2, EmaChoice::Auto).unwrap();
        assert!(diffusers.text_encoder.contains_key("text_model.encoder.layers.0.self_attn.q_proj.weight"));
        assert!(!diffusers.text_encoder.contains_key(keymap::TEXT_ENCODER_POSITION_IDS));
        assert_eq!(diffusers.vae["encoder.mid_block.attentions.0.to_q.weight"].shape.len(), 2);

        // pytorch-lightning 1.4 (a class as a dict key) and 1.9 shapes, torch.save's legacy
        // container, and objects that would run a command placed outside `state_dict`: all read
        // the same tensors (tools/gen_lightning_fixtures.py).
        let marker = Path::new(HOSTILE_MARKER);
        for file in [
            "sd-tiny.ckpt",
            "sd-tiny-pl19.ckpt",
            "sd-tiny-legacy.ckpt",
            "hostile-outside.ckpt",
            "sd-tiny.safetensors",
        ] {
            let path = root.join("compvis").join(file);
            let plain = load_sd_weights(&path, 2, EmaChoice::NonEma).unwrap();
            assert!(!marker.exists(), "{file}: reading it ran its pickle's command");
            assert_bit_identical(&format!("{file} unet"), &plain.unet, &diffusers.unet);
            assert_bit_identical(&format!("{file} vae"), &plain.vae, &diffusers.vae);
            assert_bit_identical(
                &format!("{file} text encoder"),
                &plain.text_encoder,
                &diffusers.text_encoder,
            );

            // The file has EMA copies (the UNet weights + 0.001): Auto picks them.
            let ema = load_sd_weights(&path, 2, EmaChoice::Auto).unwrap();
            assert_eq!(ema, load_sd_weights(&path, 2, EmaChoice::Ema).unwrap());
            assert_bit_identical(&format!("{file} ema vae"), &ema.vae, &diffusers.vae);
            assert_bit_identical(
                &format!("{file} ema text encoder"),
                &ema.text_encoder,
                &diffusers.text_encoder,
            );
            let shifted: NamedTensors = diffusers
                .unet
                .iter()
                .map(|(k, t)| {
                    let mut t = t.clone();
                    t.data.iter_mut().for_each(|v| *v += 0.001);
                    (k.clone(), t)
                })
                .collect();
            assert_bit_identical(&format!("{file} ema unet"), &ema.unet, &shifted);
        }

        // The fp16 variant is the f32 weights rounded to f16.
        let unet = root.join("diffusers/unet");
        let f16 =
            load_diffusers_file(&unet.join("diffusion_pytorch_model.fp16.safetensors"), Component::Unet)
                .unwrap();
        let rounded: NamedTensors = diffusers
            .unet
            .iter()
            .map(|(k, t)| {
                let mut t = t.clone();
                t.data.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32());
                (k.clone(), t)
            })
            .collect();
        assert_bit_identical("fp16 unet", &f16, &rounded);
        // A directory without the fp32 file falls back to the fp16 one.
        let dir = tempfile::tempdir().unwrap();
        for part in ["unet", "vae", "text_encoder"] {
            std::fs::create_dir(dir.path().join(part)).unwrap();
        }
        std::fs::copy(
            unet.join("diffusion_pytorch_model.fp16.safetensors"),
            dir.path().join("unet/diffusion_pytorch_model.fp16.safetensors"),
        )
        .unwrap();
        std::fs::copy(
            root.join("diffusers/vae/diffusion_pytorch_model.safetensors"),
            dir.path().join("vae/diffusion_pytorch_model.safetensors"),
        )
        .unwrap();
        std::fs::copy(
            root.join("diffusers/text_encoder/model.safetensors"),
            dir.path().join("text_encoder/model.fp16.safetensors"),
        )
        .unwrap();
        let fallback = load_sd_weights(dir.path(), 2, EmaChoice::Auto).unwrap();
        assert_bit_identical("fp16 fallback", &fallback.unet, &rounded);

        // Legacy VAE attention names (query/key/value/proj_attn) load under the current ones.
        let legacy = load_diffusers_file(
            &root.join("vae_legacy_attn/diffusion_pytorch_model.safetensors"),
            Component::Vae,
        )
        .unwrap();
        assert_bit_identical("legacy vae", &legacy, &diffusers.vae);

        // EMA choices only apply to CompVis files.
        let err = load_sd_weights(&root.join("diffusers"), 2, EmaChoice::Ema).unwrap_err();
        assert_usage(err, &["diffusers directory", "CompVis"]);
        let err = load_sd_weights(dir.path().join("text_encoder").as_path(), 2, EmaChoice::Auto).unwrap_err();
        assert_usage(err, &["unet", "diffusion_pytorch_model.safetensors"]);
    }

    /// `name<TAB>d0,d1,...` lines of a full-size SD1.4 key list.
    fn key_list(file: &str) -> BTreeMap<String, Vec<usize>> {
        let text = std::fs::read_to_string(fixtures().join("sd14_keys").join(file)).unwrap();
        text.lines()
            .map(|line| {
                let (name, dims) = line.split_once('\t').expect("name<TAB>shape");
                let shape = dims.split(',').filter(|d| !d.is_empty()).map(|d| d.parse().unwrap()).collect();
                (name.to_string(), shape)
            })
            .collect()
    }

    /// Maps a CompVis key list and compares the result, names and shapes, with the diffusers lists.
    fn check_full_size(names: &BTreeMap<String, Vec<usize>>, use_ema: bool) {
        let plan = keymap::plan_compvis(names.keys().map(String::as_str), 2, use_ema).unwrap();
        let mut got: BTreeMap<Component, BTreeMap<String, Vec<usize>>> = BTreeMap::new();
        for m in &plan {
            let shape = &names[&m.source];
            let shape = match m.component {
                Component::Vae => keymap::vae_target_shape(&m.target, shape),
                _ => shape.clone(),
            };
            assert_eq!(
                m.source.starts_with(keymap::EMA_PREFIX),
                use_ema && m.component == Component::Unet,
                "{m:?}"
            );
            assert!(got.entry(m.component).or_default().insert(m.target.clone(), shape).is_none());
        }
        let mut text_encoder = key_list("diffusers_text_encoder.txt");
        text_encoder.remove(keymap::TEXT_ENCODER_POSITION_IDS).expect("the list has position_ids");
        let want = [
            (Component::Unet, key_list("diffusers_unet.txt")),
            (Component::Vae, key_list("diffusers_vae.txt")),
            (Component::TextEncoder, text_encoder),
        ];
        for (component, want) in want {
            let got = &got[&component];
            let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
            let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "{component:?}: missing {missing:?}, extra {extra:?}"
            );
            assert_eq!(got, &want, "{component:?} shapes");
        }
        let used: BTreeSet<&str> = plan.iter().map(|m| m.source.as_str()).collect();
        for name in names.keys() {
            let ignored = keymap::IGNORED_COMPVIS_KEYS.contains(&name.as_str());
            let other_unet = !use_ema && name.starts_with(keymap::EMA_PREFIX)
                || use_ema && name.starts_with(keymap::UNET_PREFIX);
            assert_eq!(used.contains(name.as_str()), !ignored && !other_unet, "{name}");
        }
    }

    #[test]
    fn full_size_sd14_keys_map_onto_the_diffusers_keys() {
        let compvis = key_list("compvis.txt");
        assert!(!keymap::has_ema(compvis.keys().map(String::as_str)));
        check_full_size(&compvis, false);
        let mut with_ema = compvis.clone();
        with_ema.extend(key_list("compvis_ema.txt"));
        assert!(keymap::has_ema(with_ema.keys().map(String::as_str)));
        check_full_size(&with_ema, false);
        check_full_size(&with_ema, true);

        // The published SD1.4 vae file's legacy attention names map onto the current list.
        let legacy: BTreeMap<String, Vec<usize>> = key_list("diffusers_vae_legacy_attn.txt")
            .into_iter()
            .map(|(k, s)| (keymap::vae_diffusers_key(&k), s))
            .collect();
        assert_eq!(legacy, key_list("diffusers_vae.txt"));

        // EMA asked for but absent, or incomplete.
        let err = keymap::plan_compvis(compvis.keys().map(String::as_str), 2, true).unwrap_err();
        assert_usage(err, &["model_ema"]);
        let gone = "model_ema.diffusion_modelout0weight";
        let err = keymap::plan_compvis(with_ema.keys().map(String::as_str).filter(|k| *k != gone), 2, true)
            .unwrap_err();
        assert_usage(err, &[gone, "model.diffusion_model.out.0.weight"]);
        // A wrong layers_per_block does not place the keys.
        let err = keymap::plan_compvis(compvis.keys().map(String::as_str), 1, false).unwrap_err();
        assert_usage(err, &["model.diffusion_model.", "layers_per_block 1"]);
    }

    #[test]
    fn unknown_compvis_keys_are_reported_by_name() {
        let compvis = key_list("compvis.txt");
        let ema = key_list("compvis_ema.txt");
        for odd in [
            "model.diffusion_model.label_emb.0.0.weight",
            "first_stage_model.loss.logvar",
            "cond_stage_model.transformer.text_projection.weight",
            "something_else.weight",
            "model_ema.diffusion_modelextraweight",
        ] {
            let use_ema = odd.starts_with(keymap::EMA_PREFIX);
            let mut names: Vec<&str> = compvis.keys().map(String::as_str).chain([odd]).collect();
            if use_ema {
                names.extend(ema.keys().map(String::as_str));
            }
            let err = keymap::plan_compvis(names.iter().copied(), 2, use_ema).unwrap_err();
            assert_usage(err, &[odd]);
        }

        // Through the loader: the tiny CompVis file with one extra tensor names the file and key.
        let src = fixtures().join("tiny/compvis/sd-tiny.safetensors");
        let bytes = std::fs::read(&src).unwrap();
        let extra = [0u8; 8];
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut views: Vec<(String, safetensors::tensor::TensorView)> = st.tensors().into_iter().collect();
        views.push((
            "model.diffusion_model.extra.weight".into(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &extra).unwrap(),
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd.safetensors");
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let err = load_sd_weights(&path, 2, EmaChoice::Auto).unwrap_err();
        assert_usage(err, &[&path.display().to_string(), "model.diffusion_model.extra.weight"]);
    }

    /// What the hostile fixtures' command would create, were it ever run.
    const HOSTILE_MARKER: &str = "/tmp/msfp-pickle-was-executed";

    /// A command-running object where a tensor must be: one usage line naming the entry and
    /// what it is; nothing runs.
    #[test]
    fn an_object_in_place_of_a_tensor_is_named_and_never_run() {
        let path = fixtures().join("tiny/compvis/hostile-inside.ckpt");
        let err = load_sd_weights(&path, 2, EmaChoice::NonEma).unwrap_err();
        assert_usage(
            err,
            &[
                &path.display().to_string(),
                "model.diffusion_model.out.2.weight",
                "posix.system",
                "not a tensor",
            ],
        );
        assert!(!Path::new(HOSTILE_MARKER).exists());
    }

    #[test]
    fn truncated_and_missing_checkpoints_are_usage_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for file in ["sd-tiny.ckpt", "sd-tiny-legacy.ckpt", "sd-tiny.safetensors"] {
            let bytes = std::fs::read(fixtures().join("tiny/compvis").join(file)).unwrap();
            let path = dir.path().join(file);
            std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
            let err = load_sd_weights(&path, 2, EmaChoice::Auto).unwrap_err();
            assert_usage(err, &[&path.display().to_string(), "truncated or corrupt"]);
        }
        let missing = dir.path().join("sd-v1-4.ckpt");
        let err = load_sd_weights(&missing, 2, EmaChoice::Auto).unwrap_err();
        assert_usage(err, &[&missing.display().to_string(), "not found"]);
    }
}
