//! End-to-end tests of the `msfp` binary and of resumable training on tiny shapes.
//! One file, so the suite links a single test binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_msfp");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tiny UNet experiment writing into `out`.
fn tiny_config(out: &Path, extra: &str) -> String {
    format!(
        r#"
[run]
name = "tiny"
out_dir = "{out}"
seed = 3

[model]
kind = "tiny_unet"

[model.unet]
base_channels = 8
channel_mult = [1, 2]
attention_heads = 2
groups = 4

[data]
dir = "{data}"
train_count = 256
heldout_count = 100

[train]
steps = 4
batch_size = 4
warmup_steps = 1
checkpoint_every = 2
log_every = 1

[sampler]
steps = 2

[eval]
samples = 20
batch_size = 20
{extra}
"#,
        out = out.display(),
        data = repo().join("data").display(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn msfp(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("RAYON_NUM_THREADS", "1").output().expect("run msfp")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Exit code and a one-line error that mentions every needle, with no panic output.
fn assert_fails(o: &Output, code: i32, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` missing from: {err}");
    }
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "panic output: {err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("error")).count(), 1, "one error line: {err}");
}

#[test]
fn config_errors_exit_2_and_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg = write(dir.path(), "bad_key.toml", &tiny_config(&out, "[sampler2]\nx = 1\n"));
    assert_fails(&msfp(&["pretrain", "--config", cfg.to_str().unwrap()]), 2, &["bad_key.toml", "sampler2"]);

    let cfg =
        write(dir.path(), "bad_type.toml", &tiny_config(&out, "").replace("steps = 4", "steps = \"four\""));
    assert_fails(&msfp(&["pretrain", "--config", cfg.to_str().unwrap()]), 2, &["bad_type.toml", "line"]);

    let cfg = write(dir.path(), "ok.toml", &tiny_config(&out, ""));
    let c = cfg.to_str().unwrap();
    assert_fails(&msfp(&["pretrain", "--config", c, "--set", "train.steps=0"]), 2, &["train.steps"]);
    assert_fails(&msfp(&["pretrain", "--config", c, "--set", "train.lr=-0.1"]), 2, &["train.lr"]);
    assert_fails(&msfp(&["pretrain", "--config", c, "--set", "run.device=tpu"]), 2, &["tpu", "flex"]);
    assert_fails(&msfp(&["pretrain", "--config", "/nonexistent/x.toml"]), 2, &["/nonexistent/x.toml"]);
    assert_fails(
        &msfp(&["pretrain", "--config", c, "--resume", "/nonexistent/ckpt"]),
        2,
        &["/nonexistent/ckpt"],
    );
    #[cfg(not(feature = "cuda-runtime"))]
    assert_fails(&msfp(&["pretrain", "--config", c, "--set", "run.device=cuda"]), 2, &["--features cuda"]);
}

#[test]
fn weights_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "c.toml", &tiny_config(&dir.path().join("run"), ""));
    let c = cfg.to_str().unwrap();
    let corrupt = write(dir.path(), "corrupt.safetensors", "this is not a safetensors file");
    assert_fails(
        &msfp(&["sample", "--config", c, "--weights", corrupt.to_str().unwrap()]),
        1,
        &["corrupt.safetensors"],
    );
    assert_fails(
        &msfp(&["sample", "--config", c, "--weights", "/nonexistent/w.safetensors"]),
        2,
        &["/nonexistent/w.safetensors"],
    );
    // The shipped DiT teacher does not fit the UNet config.
    let dit = repo().join("checkpoints/tiny_dit_mnist.safetensors");
    if dit.exists() {
        assert_fails(&msfp(&["sample", "--config", c, "--weights", dit.to_str().unwrap()]), 2, &["tiny_dit"]);
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn resume_is_bit_exact_and_refuses_other_configs() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    let c1 = write(dir.path(), "one.toml", &tiny_config(&one, ""));
    let c2 = write(dir.path(), "two.toml", &tiny_config(&two, ""));

    let o = msfp(&["pretrain", "--config", c1.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = msfp(&["pretrain", "--config", c2.to_str().unwrap(), "--set", "train.steps=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A config that changes the math is refused, naming the key.
    let o =
        msfp(&["pretrain", "--config", c2.to_str().unwrap(), "--resume", "auto", "--set", "train.lr=0.5"]);
    assert_fails(&o, 2, &["train.lr"]);
    // Raising train.steps is allowed; LR schedule depends on steps, so keep the same total here.
    let o = msfp(&["pretrain", "--config", c2.to_str().unwrap(), "--resume", "auto"]);
    assert!(o.status.success(), "{}", stderr(&o));

    for f in ["trainable.safetensors", "optimizer.safetensors", "ema.safetensors", "state.json"] {
        let a = read(&one.join("checkpoints/step-000004").join(f));
        let b = read(&two.join("checkpoints/step-000004").join(f));
        assert!(a == b, "{f} differs between 4 steps and 2 + resume 2");
    }
    assert_eq!(read(&one.join("model.safetensors")), read(&two.join("model.safetensors")));
    // Outputs a user reads.
    for f in ["metrics.jsonl", "summary.json", "loss.png", "samples.png"] {
        assert!(two.join(f).exists(), "{f} missing");
    }
    let metrics = std::fs::read_to_string(two.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4, "one line per logged step, none repeated: {metrics}");

    // A checkpoint of another model is refused.
    let dit = write(
        dir.path(),
        "dit.toml",
        &tiny_config(&dir.path().join("dit"), "").replace("kind = \"tiny_unet\"", "kind = \"tiny_dit\""),
    );
    let ckpt = two.join("checkpoints/step-000004");
    let o = msfp(&["pretrain", "--config", dit.to_str().unwrap(), "--resume", ckpt.to_str().unwrap()]);
    assert_fails(&o, 2, &["tiny_unet", "tiny_dit"]);

    // A corrupt checkpoint is a runtime error naming the file.
    std::fs::write(ckpt.join("trainable.safetensors"), b"garbage").unwrap();
    let o = msfp(&[
        "pretrain",
        "--config",
        c2.to_str().unwrap(),
        "--resume",
        ckpt.to_str().unwrap(),
        "--set",
        "train.steps=6",
    ]);
    assert_fails(&o, 1, &["trainable.safetensors"]);
}

#[test]
fn sigkill_at_any_moment_leaves_latest_complete() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg = tiny_config(&out, "")
        .replace("steps = 4", "steps = 100000")
        .replace("checkpoint_every = 2", "checkpoint_every = 1");
    let cfg = write(dir.path(), "k.toml", &cfg);
    let mut seen = 0;
    for delay_ms in [1500u64, 2300, 2950, 3700] {
        let mut child = Command::new(BIN)
            .args(["pretrain", "--config", cfg.to_str().unwrap(), "--resume", "auto"])
            .env("RAYON_NUM_THREADS", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let Some(latest) = msfp::train::checkpoint::latest(&out).unwrap() else {
            continue;
        };
        let ckpt = msfp::train::checkpoint::load(&latest)
            .unwrap_or_else(|e| panic!("latest incomplete after kill: {e}"));
        assert!(ckpt.state.step >= seen, "progress never goes back");
        seen = ckpt.state.step;
        assert!(!ckpt.trainable.is_empty() && !ckpt.optimizer.is_empty());
    }
    assert!(seen > 0, "no checkpoint was written before the kills");
}

#[test]
fn classifier_sample_and_eval_run_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let clf_out = dir.path().join("clf");
    let extra = format!("classifier = \"{}\"\n", clf_out.join("classifier.safetensors").display());
    let cfg = write(dir.path(), "e.toml", &tiny_config(&out, &extra));
    let c = cfg.to_str().unwrap();
    let o = msfp(&[
        "train-classifier",
        "--config",
        c,
        "--set",
        &format!("run.out_dir=\"{}\"", clf_out.display()),
        "--set",
        "train.steps=30",
        "--set",
        "train.batch_size=32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = msfp(&["pretrain", "--config", c, "--set", "train.steps=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let w = out.join("model.safetensors");
    let png = dir.path().join("grid.png");
    let o = msfp(&[
        "sample",
        "--config",
        c,
        "--weights",
        w.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
        "--n",
        "20",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let img = image::open(&png).unwrap();
    assert!(img.width() > 32 * 10 && img.height() > 32 * 2);

    let report = dir.path().join("eval.json");
    let o = msfp(&[
        "eval",
        "--config",
        c,
        "--weights",
        w.to_str().unwrap(),
        "--compare",
        w.to_str().unwrap(),
        "--out",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&read(&report)).unwrap();
    let fid = r["model"]["fid"].as_f64().unwrap();
    let real = r["fid_real_heldout"].as_f64().unwrap();
    assert!(fid.is_finite() && fid > real, "an untrained model is worse than real digits: {fid} vs {real}");
    // Same weights and same noise: identical samples, so PSNR is effectively infinite.
    assert!(r["psnr"].as_f64().unwrap() > 100.0, "{r}");
    assert_eq!(r["model"]["fid"], r["other"]["fid"]);
}

#[test]
fn config_reference_documents_every_key() {
    let doc = std::fs::read_to_string(repo().join("docs/config.md")).unwrap();
    let documented: std::collections::BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect();
    let mut keys: std::collections::BTreeSet<String> =
        msfp::Config::default().flattened().into_keys().collect();
    // Optional keys have no default value to flatten.
    keys.insert("model.weights".into());
    keys.insert("train.init_weights".into());
    keys.insert("model.dit.vae".into());
    assert_eq!(documented, keys, "docs/config.md and the config types disagree");
    // Defaults quoted in the doc are the real ones.
    let flat = msfp::Config::default().flattened();
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let key = cells[1].trim_matches('`');
        if let Some(v) = flat.get(key) {
            let v = v.replace(", ", ",");
            let quoted = cells[3].trim_matches('`').replace(", ", ",");
            assert_eq!(quoted, v, "default of {key}");
        }
    }
}

/// A 1-step tiny teacher in `dir/teacher/model.safetensors` and a `msfp train` experiment on it:
/// W4A4 FP4 with mixup-sign, 2 TALoRA adapters with a learned router, 3-step trajectories.
fn tiny_student(dir: &Path, out: &Path) -> PathBuf {
    let teacher_cfg = write(dir, "teacher.toml", &tiny_config(&dir.join("teacher"), ""));
    let o = msfp(&["pretrain", "--config", teacher_cfg.to_str().unwrap(), "--set", "train.steps=1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let extra = r#"
[quant]
weight = "fp4"
act = "fp4"
act_timestep_slots = 2
weight_group_size = 8
attention_matmuls = true

[calib]
clip_grid = 8
zero_point_grid = 4
sample_size = 2048

[lora]
rank = 2
adapters = 2
router = "learned"
router_hidden = 4

[finetune]
target = "step"
trajectory_steps = 3
calib_samples = 2
"#;
    let text = tiny_config(out, extra)
        .replace(
            "[model.unet]",
            &format!("weights = \"{}\"\n\n[model.unet]", dir.join("teacher/model.safetensors").display()),
        )
        .replace("batch_size = 4", "batch_size = 2")
        .replace("samples = 20\nbatch_size = 20", "samples = 4\nbatch_size = 4");
    write(dir, &format!("{}.toml", out.file_name().unwrap().to_str().unwrap()), &text)
}

#[test]
fn train_resumes_bit_exactly_and_exports_a_packed_model_that_samples_identically() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let cfg_a = tiny_student(dir.path(), &a);
    let cfg_b = tiny_student(dir.path(), &b);
    let ca = cfg_a.to_str().unwrap();
    let cb = cfg_b.to_str().unwrap();
    let o = msfp(&["train", "--config", ca]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Stop in the middle of the first trajectory (step 2 of 3), then resume to 4.
    let o = msfp(&["train", "--config", cb, "--set", "train.steps=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = msfp(&["train", "--config", cb, "--resume", "auto"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["student.safetensors", "checkpoints/step-000004/optimizer.safetensors", "ptq.safetensors"] {
        assert!(read(&a.join(f)) == read(&b.join(f)), "{f} differs after resume");
    }
    // A math change is refused.
    assert_fails(
        &msfp(&["train", "--config", cb, "--resume", "auto", "--set", "lora.rank=3"]),
        2,
        &["lora.rank"],
    );

    let summary: serde_json::Value = serde_json::from_slice(&read(&a.join("summary.json"))).unwrap();
    for stage in ["teacher", "ptq", "finetuned"] {
        assert!(summary[stage]["fid"].as_f64().unwrap().is_finite(), "{stage}");
    }
    assert!(summary["finetuned"]["psnr_vs_teacher"].as_f64().unwrap() > 0.0);
    assert_eq!(summary["router_usage"].as_array().unwrap().len(), 2);
    for png in ["samples.png", "loss.png", "router.png", "error_by_timestep.png", "drift_by_timestep.png"] {
        assert!(a.join(png).exists(), "{png}");
    }
    // The per-timestep report: both students, one value per sampler step, the mean in the summary.
    let errors: serde_json::Value = serde_json::from_slice(&read(&a.join("error_by_timestep.json"))).unwrap();
    let steps = errors["t"].as_array().unwrap().len();
    assert!(steps > 1);
    for (i, name) in ["ptq", "finetuned"].iter().enumerate() {
        let s = &errors["students"][i];
        assert_eq!(s["name"], *name);
        for key in ["mse", "bias", "drift"] {
            assert_eq!(s[key].as_array().unwrap().len(), steps, "{name} {key}");
        }
        let mse: Vec<f64> = s["mse"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert!(mse.iter().all(|e| e.is_finite() && *e > 0.0), "{name}: {mse:?}");
        let mean = mse.iter().sum::<f64>() / steps as f64;
        assert!((summary["eps_mse_vs_teacher"][name].as_f64().unwrap() - mean).abs() <= 1e-12 * mean);
    }

    // The packed model samples exactly like the fake-quant student.
    let cfg = msfp::Config::load(&cfg_a, &[]).unwrap();
    let device = burn::tensor::Device::flex();
    let plan = msfp::pipeline::student::StudentPlan::load(&a.join("student_plan.json")).unwrap();
    let student =
        msfp::pipeline::finetune::load_student(&cfg, &plan, &a.join("student.safetensors"), &device).unwrap();
    let packed =
        msfp::pipeline::export::load_packed_model(&a.join("model.packed.safetensors"), &device).unwrap();
    let family = msfp::pipeline::sample::load_family(&cfg, &device).unwrap();
    let (fake, _) = msfp::pipeline::sample::generate(&student, &family, &cfg, 4, 7, &device);
    let (real, _) = msfp::pipeline::sample::generate(&packed, &family, &cfg, 4, 7, &device);
    let differing = fake.iter().zip(&real).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differing, 0, "packed and fake-quant samples differ in {differing} of {} values", fake.len());
    let teacher = msfp::models::registry::load_denoiser(&cfg.model, None, &device).unwrap();
    let (fp, _) = msfp::pipeline::sample::generate(&teacher, &family, &cfg, 4, 7, &device);
    assert!(fp != fake, "the student is quantized");

    // sample --packed, export and inspect through the CLI.
    let png = dir.path().join("packed.png");
    let packed_path = a.join("model.packed.safetensors");
    let p = packed_path.to_str().unwrap();
    let o = msfp(&["sample", "--config", ca, "--packed", p, "--out", png.to_str().unwrap(), "--n", "4"]);
    assert!(o.status.success() && png.exists(), "{}", stderr(&o));
    let again = dir.path().join("again.safetensors");
    let o = msfp(&["export", "--config", ca, "--out", again.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    if read(&again) != read(&packed_path) {
        let keep = std::env::temp_dir().join("msfp_export_debug");
        let _ = std::fs::create_dir_all(&keep);
        std::fs::copy(&again, keep.join("again.safetensors")).unwrap();
        std::fs::copy(&packed_path, keep.join("train.safetensors")).unwrap();
        panic!("export of the final student differs from train's (copies in {})", keep.display());
    }
    let o = msfp(&["inspect", p]);
    let table = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(table.contains("AAL") && table.contains("NAL") && table.contains("(unsigned)"), "{table}");
    assert!(table.contains("k=2 r=2 merged (2 weight sets)"), "{table}");
    assert!(table.contains("g8") && table.contains(".attn.attn.probs_in"), "{table}");
    let o = msfp(&["inspect", p, "--json"]);
    let layers: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(layers.as_array().unwrap().len(), plan.sites.len());

    // The ablation: finished (row, seed) results are kept and skipped on a second run.
    let abl = dir.path().join("abl");
    let args = [
        "ablation",
        "--config",
        ca,
        "--out",
        abl.to_str().unwrap(),
        "--rows",
        "teacher,msfp_ptq",
        "--seeds",
        "0",
    ];
    let o = msfp(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let table: serde_json::Value = serde_json::from_slice(&read(&abl.join("results.json"))).unwrap();
    let rows: Vec<&str> = table.as_array().unwrap().iter().map(|r| r["row"].as_str().unwrap()).collect();
    assert_eq!(rows, ["teacher", "msfp_ptq"]);
    assert!(table[1]["psnr_vs_teacher"].as_f64().unwrap() > 0.0 && table[0]["psnr_vs_teacher"].is_null());
    let ssim = table[1]["ssim_vs_teacher"].as_f64().unwrap();
    assert!(ssim > 0.0 && ssim < 1.0 && table[0]["ssim_vs_teacher"].is_null(), "{table}");
    // No claim has both of its rows here: the claims table is its header and rule only.
    let claims = String::from_utf8(read(&abl.join("claims.md"))).unwrap();
    assert!(claims.starts_with("| claim | metric |") && !claims.contains("| PSNR |"), "{claims}");
    let command = table[1]["command"].as_str().unwrap();
    assert!(
        command.starts_with("msfp ablation --config") && command.ends_with("--rows msfp_ptq --seeds 0"),
        "{command}"
    );
    let md = String::from_utf8(read(&abl.join("results.md"))).unwrap();
    assert!(md.contains("| `teacher` | 32/32 |") && md.contains("| `msfp_ptq` | 4/4 |"), "{md}");
    let kept = abl.join("results/msfp_ptq-seed0.json");
    let before = std::fs::metadata(&kept).unwrap().modified().unwrap();
    let o = msfp(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::metadata(&kept).unwrap().modified().unwrap(),
        before,
        "a finished result is not redone"
    );
    // A result of another teacher is stale: left out of the table and measured again.
    let teacher = table[1]["teacher"].as_str().unwrap().to_string();
    assert_eq!(teacher.len(), 16, "{table}");
    let mut stale: serde_json::Value = serde_json::from_slice(&read(&kept)).unwrap();
    assert_eq!(stale["teacher"], teacher.as_str());
    stale["teacher"] = "0123456789abcdef".into();
    std::fs::write(&kept, serde_json::to_vec(&stale).unwrap()).unwrap();
    let o = msfp(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let redone: serde_json::Value = serde_json::from_slice(&read(&kept)).unwrap();
    assert_eq!(redone["teacher"], teacher.as_str(), "the stale result is measured again");
    assert_fails(
        &msfp(&["ablation", "--config", ca, "--out", abl.to_str().unwrap(), "--rows", "nope"]),
        2,
        &["nope", "msfp_full"],
    );

    // Bad input.
    assert_fails(&msfp(&["inspect", "/nonexistent/m.safetensors"]), 2, &["/nonexistent/m.safetensors"]);
    let corrupt = write(dir.path(), "bad.safetensors", "not a model");
    assert_fails(&msfp(&["inspect", corrupt.to_str().unwrap()]), 1, &["bad.safetensors"]);
    let plain = a.join("ptq.safetensors");
    assert_fails(&msfp(&["inspect", plain.to_str().unwrap()]), 1, &["ptq.safetensors", "msfp.packed"]);
    assert_fails(&msfp(&["train", "--config", ca, "--set", "lora.adapters=0"]), 2, &["lora.adapters"]);
    assert_fails(&msfp(&["train", "--config", ca, "--set", "loss.kind=\"l1\""]), 2, &["loss", "l1"]);
}

/// The whole MSFP job on the test-size Stable Diffusion (`configs/msfp_sd_tiny.toml`: UNet, VAE
/// and CLIP from diffusers at a tiny config): calibration, TALoRA + DFA along text-conditioned
/// trajectories, PSNR/SSIM against the teacher, export; resume is bit-exact, the packed model
/// samples exactly like the fake-quant student, and the CompVis single file gives the same
/// teacher as the diffusers directory.
#[test]
fn sd_job_runs_end_to_end_on_the_tiny_sd() {
    let dir = tempfile::tempdir().unwrap();
    let config = repo().join("configs/msfp_sd_tiny.toml");
    let c = config.to_str().unwrap();
    let run = |out: &Path, extra: &[&str], resume: bool| {
        let out_set = format!("run.out_dir={:?}", out.display().to_string());
        let mut args = vec!["train", "--config", c, "--set", &out_set];
        for e in extra {
            args.extend(["--set", e]);
        }
        if resume {
            args.extend(["--resume", "auto"]);
        }
        let o =
            Command::new(BIN).args(&args).current_dir(repo()).env("RAYON_NUM_THREADS", "1").output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    };
    // A constant learning rate, so that stopping at step 3 changes no math (the cosine schedule
    // depends on train.steps); the run stops inside the first 4-step trajectory.
    let constant = "train.lr_schedule=\"constant\"";
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    run(&a, &[constant], false);
    run(&b, &[constant, "train.steps=3"], false);
    run(&b, &[constant], true);
    for f in ["student.safetensors", "ptq.safetensors", "model.packed.safetensors"] {
        assert!(read(&a.join(f)) == read(&b.join(f)), "{f} differs after resume");
    }
    // One sample per pass (the conditional and the unconditional half apart): the same training
    // up to float summation order.
    let m = dir.path().join("m");
    run(&m, &[constant, "finetune.micro_batch=1"], false);
    let load = |d: &Path, f: &str| msfp::base::params::load_safetensors(&d.join(f)).unwrap().0;
    let (whole, micro, ptq) =
        (load(&a, "student.safetensors"), load(&m, "student.safetensors"), load(&a, "ptq.safetensors"));
    assert_eq!(load(&m, "ptq.safetensors"), ptq, "micro-batching leaves calibration alone");
    let (mut moved, mut off) = (0.0f32, 0.0f32);
    for (k, w) in &whole {
        for ((x, y), p) in w.data.iter().zip(&micro[k].data).zip(&ptq[k].data) {
            moved = moved.max((x - p).abs());
            off = off.max((x - y).abs());
        }
    }
    assert!(
        moved > 0.0 && off <= 1e-3 * moved,
        "micro-batched training strays {off} (training moved {moved})"
    );
    let summary: serde_json::Value = serde_json::from_slice(&read(&a.join("summary.json"))).unwrap();
    for stage in ["ptq", "finetuned"] {
        let (p, s) = (
            summary[stage]["psnr_vs_teacher"].as_f64().unwrap(),
            summary[stage]["ssim_vs_teacher"].as_f64().unwrap(),
        );
        assert!(p.is_finite() && p > 0.0 && (-1.0..=1.0).contains(&s), "{stage}: {p} dB, SSIM {s}");
    }
    assert!(summary["fid_real_heldout"].is_null(), "no FID for SD");

    // The packed model samples exactly like the fake-quant student (decoded images).
    let mut cfg =
        msfp::Config::load(&config, &[format!("run.out_dir={:?}", a.display().to_string())]).unwrap();
    cfg.model.weights = Some(repo().join("tests/fixtures/sd/tiny/diffusers"));
    cfg.model.sd.prompts = repo().join("configs/prompts/sd_prompts.txt");
    let device = burn::tensor::Device::flex();
    let family = msfp::pipeline::sample::load_family(&cfg, &device).unwrap();
    let plan = msfp::pipeline::student::StudentPlan::load(&a.join("student_plan.json")).unwrap();
    let student =
        msfp::pipeline::finetune::load_student(&cfg, &plan, &a.join("student.safetensors"), &device).unwrap();
    let packed =
        msfp::pipeline::export::load_packed_model(&a.join("model.packed.safetensors"), &device).unwrap();
    let (fake, _) = msfp::pipeline::sample::generate(&student, &family, &cfg, 2, 7, &device);
    let (real, _) = msfp::pipeline::sample::generate(&packed, &family, &cfg, 2, 7, &device);
    assert_eq!(fake.len(), 2 * 3 * 16 * 16, "decoded RGB images");
    assert!(
        fake.iter().zip(&real).all(|(x, y)| x.to_bits() == y.to_bits()),
        "packed and fake-quant samples differ"
    );

    // `msfp sample --prompt` from the diffusers directory and from the CompVis checkpoint
    // (non-EMA weights) write the same image.
    let sample = |weights: &str, ema: &str, out: &Path| {
        let o = Command::new(BIN)
            .args([
                "sample",
                "--config",
                c,
                "--prompt",
                "a red fox",
                "--n",
                "2",
                "--out",
                out.to_str().unwrap(),
            ])
            .args(["--set", &format!("model.weights={weights:?}"), "--set", &format!("model.sd.ema={ema:?}")])
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        read(out)
    };
    let from_dir = sample("tests/fixtures/sd/tiny/diffusers", "auto", &dir.path().join("dir.png"));
    let from_ckpt =
        sample("tests/fixtures/sd/tiny/compvis/sd-tiny.ckpt", "non_ema", &dir.path().join("ckpt.png"));
    let ema = sample("tests/fixtures/sd/tiny/compvis/sd-tiny.ckpt", "auto", &dir.path().join("ema.png"));
    assert!(from_dir == from_ckpt, "the CompVis checkpoint samples like the diffusers directory");
    // pytorch-lightning 1.9's shape, torch.save's legacy container and a file carrying objects
    // that would run a command outside `state_dict` sample the same image; nothing runs.
    for file in ["sd-tiny-pl19.ckpt", "sd-tiny-legacy.ckpt", "hostile-outside.ckpt"] {
        let png = sample(
            &format!("tests/fixtures/sd/tiny/compvis/{file}"),
            "non_ema",
            &dir.path().join("other.png"),
        );
        assert!(png == from_ckpt, "{file} samples like sd-tiny.ckpt");
    }
    assert!(!Path::new("/tmp/msfp-pickle-was-executed").exists(), "a fixture's pickle ran its command");
    // (the non-EMA UNet is the one whose `out.2.weight` was replaced; `auto` would read the
    // intact EMA copy and never ask for it)
    let hostile = repo().join("tests/fixtures/sd/tiny/compvis/hostile-inside.ckpt");
    assert_fails(
        &msfp(&[
            "sample",
            "--config",
            c,
            "--prompt",
            "a fox",
            "--n",
            "1",
            "--out",
            dir.path().join("x.png").to_str().unwrap(),
            "--set",
            &format!("model.weights={:?}", hostile.to_str().unwrap()),
            "--set",
            "model.sd.ema=\"non_ema\"",
        ]),
        2,
        &["hostile-inside.ckpt", "model.diffusion_model.out.2.weight", "not a tensor"],
    );
    assert!(ema != from_ckpt, "with EMA weights present, `auto` samples from them");
}

#[test]
fn sd_config_fails_only_for_want_of_weights() {
    let c = repo().join("configs/msfp_sd14.toml");
    let c = c.to_str().unwrap();
    assert_fails(&msfp(&["train", "--config", c]), 2, &["model.weights", "stable-diffusion-v1-4"]);
    assert_fails(
        &msfp(&["sample", "--config", c, "--set", "model.weights=\"/nonexistent/sd\""]),
        2,
        &["model.weights", "/nonexistent/sd", "not found"],
    );
    let tiny = repo().join("configs/msfp_sd_tiny.toml");
    assert_fails(
        &msfp(&["sample", "--config", tiny.to_str().unwrap(), "--set", "model.sd.resolution=20"]),
        2,
        &["model.sd.resolution"],
    );
    // The diffusers directory's scheduler_config.json is the model's schedule.
    let o = Command::new(BIN)
        .args(["sample", "--config", tiny.to_str().unwrap(), "--set", "diffusion.beta_end=0.02", "--n", "1"])
        .args(["--out", "/dev/null"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert_fails(&o, 2, &["scheduler_config.json", "beta_end", "diffusion.beta_end"]);
}

/// `tools/setup-cuda-build.sh` never touches a real LLVM bundle, and `--check` only reports.
#[test]
fn cuda_setup_script_leaves_a_real_bundle_alone() {
    let dir = tempfile::tempdir().unwrap();
    let script = repo().join("tools/setup-cuda-build.sh");
    let run = |args: &[&str]| {
        Command::new("bash").arg(&script).args(args).env("XDG_DATA_HOME", dir.path()).output().unwrap()
    };
    let o = run(&["--check"]);
    assert_eq!(o.status.code(), Some(1), "nothing set up: {}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).contains("not set up"));
    let prefix = dir.path().join("tracel/tracel-llvm-23.1.0-4");
    std::fs::create_dir_all(prefix.join("bin")).unwrap();
    let real = "#!/bin/sh\necho 23.1.0\n";
    std::fs::write(prefix.join("bin/llvm-config"), real).unwrap();
    std::fs::write(prefix.join(".tracel-llvm-installed"), "").unwrap();
    for _ in 0..2 {
        let o = run(&[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
        assert!(String::from_utf8_lossy(&o.stdout).contains("real LLVM bundle"));
        assert_eq!(std::fs::read_to_string(prefix.join("bin/llvm-config")).unwrap(), real, "untouched");
    }
}

/// `configs/hqdit_tiny_dit.toml` runs post-training only: the plan rotates the 24 attention and
/// MLP inputs, the summary has no fine-tuned stage, `inspect` shows the rotations and the packed
/// model samples.
#[test]
fn hqdit_tiny_dit_runs_post_training_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hq");
    let c = repo().join("configs/hqdit_tiny_dit.toml");
    let c = c.to_str().unwrap();
    let small =
        ["eval.samples=4", "finetune.calib_samples=2", "sampler.steps=4", "finetune.trajectory_steps=4"];
    let mut args = vec!["train".to_string(), "--config".into(), c.into()];
    for s in
        small.iter().map(|s| s.to_string()).chain([format!("run.out_dir={:?}", out.display().to_string())])
    {
        args.extend(["--set".into(), s]);
    }
    let o = Command::new(BIN).args(&args).current_dir(repo()).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&read(&out.join("summary.json"))).unwrap();
    assert!(summary["finetuned"].is_null() && summary["steps"] == 0, "no fine-tuning");
    assert!(summary["ptq"]["psnr_vs_teacher"].as_f64().unwrap() > 0.0);
    let plan = msfp::pipeline::student::StudentPlan::load(&out.join("student_plan.json")).unwrap();
    let rotated: Vec<&str> =
        plan.sites.iter().filter(|s| s.hadamard.is_some()).map(|s| s.path.as_str()).collect();
    assert_eq!(rotated.len(), 24, "{rotated:?}");
    assert!(
        plan.sites.iter().all(|s| s.act_format.as_deref().is_none_or(|f| !f.starts_with('u'))),
        "signed only"
    );
    assert!(
        !out.join("checkpoints").exists()
            || std::fs::read_dir(out.join("checkpoints")).unwrap().next().is_none()
    );
    let packed = out.join("model.packed.safetensors");
    let o = msfp(&["inspect", packed.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success()
            && table
                .lines()
                .filter(|l| l
                    .split_whitespace()
                    .any(|w| w.starts_with('H') && w[1..].parse::<usize>().is_ok()))
                .count()
                == 24,
        "{table}"
    );
    let png = dir.path().join("s.png");
    let o = Command::new(BIN)
        .args(["sample", "--config", c, "--packed", packed.to_str().unwrap(), "--set", "sampler.steps=2"])
        .args(["--n", "2", "--out", png.to_str().unwrap()])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(o.status.success() && png.exists(), "{}", stderr(&o));
}

/// `configs/hqdit_dit_xl2.toml` fails only for want of weights; with the tiny published-layout
/// fixtures (facebookresearch `.pt`, a tiny SD VAE) the whole post-training job runs: latents
/// decoded to RGB, scored by PSNR/SSIM against the teacher, exported, sampled from the packed file.
#[test]
fn hqdit_dit_xl2_config_runs_on_the_tiny_published_fixtures() {
    let c = repo().join("configs/hqdit_dit_xl2.toml");
    let c = c.to_str().unwrap();
    assert_fails(&msfp(&["train", "--config", c]), 2, &["model.weights", "DiT-XL-2-256x256.pt"]);
    let with_weights = ["--set", "model.weights=\"tests/fixtures/dit/tiny/DiT-tiny.pt\""];
    let o = Command::new(BIN)
        .args(["train", "--config", c])
        .args(with_weights)
        .current_dir(repo())
        .output()
        .unwrap();
    assert_fails(&o, 2, &["model.dit.vae", "sd-vae-ft-ema"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("xl");
    let sets = [
        "model.weights=\"tests/fixtures/dit/tiny/DiT-tiny.pt\"".to_string(),
        "model.dit.vae=\"tests/fixtures/sd/tiny/diffusers\"".into(),
        "model.dit.hidden=32".into(),
        "model.dit.depth=2".into(),
        "model.dit.heads=2".into(),
        "model.dit.input_size=8".into(),
        "eval.samples=2".into(),
        "eval.batch_size=2".into(),
        "finetune.calib_samples=1".into(),
        "finetune.trajectory_steps=2".into(),
        "sampler.steps=2".into(),
        format!("run.out_dir={:?}", out.display().to_string()),
    ];
    let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", s.as_str()]).collect();
    let o =
        Command::new(BIN).args(["train", "--config", c]).args(&args).current_dir(repo()).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&read(&out.join("summary.json"))).unwrap();
    assert!(summary["teacher"]["fid"].is_null(), "no MNIST scorer for ImageNet classes");
    let psnr = summary["ptq"]["psnr_vs_teacher"].as_f64().unwrap();
    assert!(psnr.is_finite() && psnr > 0.0, "{psnr}");
    let plan = msfp::pipeline::student::StudentPlan::load(&out.join("student_plan.json")).unwrap();
    assert_eq!(plan.sites.iter().filter(|s| s.hadamard.is_some()).count(), 8, "2 blocks x 4 rotated inputs");
    let png = dir.path().join("s.png");
    let packed = out.join("model.packed.safetensors");
    let o = Command::new(BIN)
        .args([
            "sample",
            "--config",
            c,
            "--packed",
            packed.to_str().unwrap(),
            "--n",
            "2",
            "--out",
            png.to_str().unwrap(),
        ])
        .args(&args)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(o.status.success() && png.exists(), "{}", stderr(&o));
}
