//! The `msfp` command line: parse, load the config, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use msfp::config::Config;
use msfp::error::{Error, Result};
use msfp::pipeline;

#[derive(Parser)]
#[command(name = "msfp", version, about = "W4A4 floating-point quantization of diffusion models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// TOML experiment file.
    #[arg(long)]
    config: PathBuf,
    /// Override a config key, e.g. `--set train.steps=100` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Backend device, overriding run.device: flex, wgpu, wgpu-cpu, cuda, cuda:N.
    #[arg(long)]
    device: Option<String>,
}

impl ConfigArgs {
    /// `--set` overrides, with `--device` as `run.device`.
    fn overrides(&self) -> Vec<String> {
        let mut overrides = self.set.clone();
        if let Some(d) = &self.device {
            overrides.push(format!("run.device={}", toml::Value::String(d.clone())));
        }
        overrides
    }

    fn load(&self) -> Result<Config> {
        Config::load(&self.config, &self.overrides())
    }
}

#[derive(Subcommand)]
enum Command {
    /// Train a tiny diffusion model in full precision (the teachers).
    Pretrain {
        #[command(flatten)]
        config: ConfigArgs,
        /// `auto` (continue from <out_dir>/checkpoints/latest if any) or a checkpoint directory.
        #[arg(long)]
        resume: Option<String>,
    },
    /// The MSFP job: calibrate a W4A4 student of the teacher (model.weights), fine-tune it with
    /// TALoRA + DFA along the teacher's trajectories, evaluate, and export the packed model.
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// `auto` (continue from <out_dir>/checkpoints/latest if any) or a checkpoint directory.
        #[arg(long)]
        resume: Option<String>,
    },
    /// MSFP's ablation table on one teacher: every (row, seed) trained and evaluated once,
    /// finished results kept and skipped on later runs.
    Ablation {
        #[command(flatten)]
        config: ConfigArgs,
        /// Directory of the experiment (results/, results.json, runs/).
        #[arg(long)]
        out: PathBuf,
        /// Which ablation: MSFP's rows or HQ-DiT's (base `configs/hqdit_tiny_dit.toml`).
        #[arg(long, value_enum, default_value = "msfp")]
        table: pipeline::ablation::Table,
        /// Rows to run (default: all of the table), e.g. `teacher,msfp_ptq`.
        #[arg(long, value_delimiter = ',')]
        rows: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "0,1")]
        seeds: Vec<u64>,
    },
    /// Write the packed low-bit model of a `train` run (its final student, or a checkpoint).
    Export {
        #[command(flatten)]
        config: ConfigArgs,
        /// A checkpoint directory of the run (default: the run's final student.safetensors).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print what a packed model holds, per quantized layer.
    Inspect {
        /// A packed model (`model.packed.safetensors`).
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Train the MNIST classifier whose features define FID.
    TrainClassifier {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Write a PNG grid of samples (one class or prompt per column).
    Sample {
        #[command(flatten)]
        config: ConfigArgs,
        /// Model weights (default: model.weights).
        #[arg(long, conflicts_with = "packed")]
        weights: Option<PathBuf>,
        /// Sample from a packed low-bit model (written by `train` or `export`) instead.
        #[arg(long)]
        packed: Option<PathBuf>,
        #[arg(long, default_value = "samples.png")]
        out: PathBuf,
        /// Number of samples.
        #[arg(long, default_value_t = 100)]
        n: usize,
        /// Text prompt (repeatable; text-conditioned models such as SD). Without it the
        /// config's prompts file is cycled.
        #[arg(long)]
        prompt: Vec<String>,
    },
    /// FID, classifier accuracy and (with --compare) PSNR between two models' samples.
    Eval {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Weights of a second model of the same config, sampled from identical noise.
        #[arg(long)]
        compare: Option<PathBuf>,
        /// Write the JSON report here as well as to stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Add this result as a row of a results list (JSON), replacing the row of the same --label.
        #[arg(long, requires = "label")]
        record: Option<PathBuf>,
        /// Row name for --record (e.g. tiny_unet).
        #[arg(long)]
        label: Option<String>,
    },
    /// Print a number format as JSON: its parameters and every representable value.
    Formats {
        /// e.g. e2m1, e4m3, ue2m2, int4, uint8.
        spec: String,
    },
    /// Fake-quantize a JSON array of numbers read from stdin; prints the quantized array.
    Quantize {
        /// Number format, e.g. e2m1.
        #[arg(long)]
        format: String,
        /// The value the grid's max maps to (scale = M / grid max); default: the grid's max.
        #[arg(long, value_name = "M", allow_hyphen_values = true)]
        max: Option<f64>,
        /// Zero point Z: q = Z + s * round((x - Z) / s). Default 0.
        #[arg(long, value_name = "Z", allow_hyphen_values = true)]
        zero_point: Option<f64>,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Pretrain { config, resume } => {
            let cfg = config.load()?;
            let summary =
                pipeline::pretrain::pretrain(&cfg, pipeline::pretrain::Resume::parse(resume.as_deref()))?;
            println!("{}", serde_json::to_string_pretty(&summary).expect("json"));
        }
        Command::Train { config, resume } => {
            let cfg = config.load()?;
            let out = pipeline::finetune::train(&cfg, pipeline::pretrain::Resume::parse(resume.as_deref()))?;
            println!("{}", serde_json::to_string_pretty(&out.summary).expect("json"));
        }
        Command::Ablation { config, out, table, rows, seeds } => {
            let table = pipeline::ablation::run(
                table,
                &config.config,
                &config.overrides(),
                &rows,
                &seeds,
                &out,
                &command_line(),
            )?;
            println!("{}", serde_json::to_string_pretty(&table).expect("json"));
        }
        Command::Export { config, checkpoint, out } => {
            let cfg = config.load()?;
            let device = msfp::device::make_device(&cfg.run.device)?;
            let bytes = pipeline::finetune::export_run(&cfg, checkpoint.as_deref(), &out, &device)?;
            println!("wrote {} ({bytes} bytes)", out.display());
        }
        Command::Inspect { file, json } => {
            let layers = pipeline::inspect::inspect(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&layers).expect("json"));
            } else {
                print!("{}", pipeline::inspect::render(&layers));
            }
        }
        Command::TrainClassifier { config } => {
            let cfg = config.load()?;
            let summary = pipeline::classifier::train_classifier(&cfg)?;
            println!("{}", serde_json::to_string_pretty(&summary).expect("json"));
        }
        Command::Sample { config, weights, packed, out, n, prompt } => {
            let cfg = config.load()?;
            if n == 0 {
                return Err(Error::usage("--n must be at least 1"));
            }
            let device = msfp::device::make_device(&cfg.run.device)?;
            let model = match packed {
                Some(p) => pipeline::export::load_packed_model(&p, &device)?,
                None => msfp::models::registry::load_denoiser(&cfg.model, weights.as_deref(), &device)?,
            };
            let mut family = pipeline::sample::load_family(&cfg, &device)?;
            if !prompt.is_empty() {
                family.set_prompts(prompt)?;
            }
            pipeline::sample::write_grid(&model, &family, &cfg, &out, n)?;
            println!("wrote {}", out.display());
        }
        Command::Eval { config, weights, compare, out, record, label } => {
            let cfg = config.load()?;
            if cfg.model.kind == msfp::config::ModelKind::Sd {
                return Err(Error::usage(
                    "msfp eval scores the MNIST models (FID in the classifier's space); for SD, `msfp train` reports PSNR and SSIM against the teacher",
                ));
            }
            let device = msfp::device::make_device(&cfg.run.device)?;
            let model = msfp::models::registry::load_denoiser(&cfg.model, weights.as_deref(), &device)?;
            let other = compare
                .as_deref()
                .map(|w| msfp::models::registry::load_denoiser(&cfg.model, Some(w), &device))
                .transpose()?;
            let report = pipeline::eval::evaluate(&cfg, &model, other.as_ref(), &device)?;
            println!("{}", serde_json::to_string_pretty(&report).expect("json"));
            if let Some(path) = out {
                pipeline::eval::write_report(&path, &report)?;
            }
            if let (Some(path), Some(label)) = (record, label) {
                let used = weights.or(cfg.model.weights.clone()).unwrap_or_default();
                pipeline::eval::record(&path, &label, &report, &used, &command_line())?;
            }
        }
        Command::Formats { spec } => println!("{}", msfp::quant::cli::formats(&spec)?),
        Command::Quantize { format, max, zero_point } => {
            let input = std::io::read_to_string(std::io::stdin())
                .map_err(|e| Error::runtime(format!("reading stdin: {e}")))?;
            let out = msfp::quant::cli::quantize(&format, max, zero_point, &input)?;
            println!("{out}");
        }
    }
    Ok(())
}

/// This invocation as a user would type it.
fn command_line() -> String {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.insert(0, "msfp".into());
    args.join(" ")
}

fn main() -> ExitCode {
    msfp::kernels::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // A bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("error: internal failure{at}: {}", msg.lines().next().unwrap_or(""));
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match std::panic::catch_unwind(|| msfp::kernels::on_pool(|| run(cli))) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
        Err(_) => ExitCode::from(1),
    }
}
