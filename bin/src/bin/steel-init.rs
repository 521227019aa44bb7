//! `steel-init`: writes a freshly initialised Steel model as a HuggingFace directory.

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use steel_model::{save_hf_dir, ExportOptions, SaveDType, SteelConfig, SteelModel};
use steel_runtime::cpu::CpuBackend;
use steel_runtime::DType;

#[derive(Parser)]
#[command(
    name = "steel-init",
    version,
    about = "Write a freshly initialised Steel model as a HuggingFace directory",
    long_about = "Initialises every parameter as the reference pretraining did (Linear and embedding \
                  N(0, initializer_range), biases 0, norms 1, phi N(0, 1/sqrt(hidden)), scale 1), \
                  seeded, and writes config.json, model.safetensors (sharded above 5 GB) and \
                  generation_config.json. --dry-run only prints the model's size and cost."
)]
struct Args {
    /// Model config in HF config.json form (e.g. configs/steel-1.1b/config.json).
    #[arg(long)]
    config: PathBuf,
    /// Output directory (created if missing).
    #[arg(long, required_unless_present = "dry_run")]
    out: Option<PathBuf>,
    /// Seed of the initialisation.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// dtype of the saved weights.
    #[arg(long, value_parser = ["bf16", "f32"], default_value = "f32")]
    dtype: String,
    /// Print parameter count, tensor count, bytes in bf16 and fp32 and training FLOPs per token
    /// at sequence length 2048, then exit.
    #[arg(long)]
    dry_run: bool,
    /// Initialise even when the model exceeds this machine's available memory.
    #[arg(long)]
    no_memory_check: bool,
}

fn main() -> ExitCode {
    steel_cli::run("steel-init", || {
        let args = Args::parse();
        body(args)
    })
}

fn body(args: Args) -> Result<()> {
    let config = SteelConfig::from_file(&args.config)?;
    if args.dry_run {
        let n = config.num_params() as f64;
        println!("config:            {}", args.config.display());
        println!("parameters:        {}", config.num_params());
        println!("tensors:           {}", config.param_shapes().len());
        println!("bytes (bf16):      {} ({})", 2.0 * n, steel_cli::gib(2.0 * n));
        println!("bytes (fp32):      {} ({})", 4.0 * n, steel_cli::gib(4.0 * n));
        println!(
            "training FLOPs/token @ seq 2048: {:.4e} ({:.3} GFLOP)",
            config.training_flops_per_token(2048),
            config.training_flops_per_token(2048) / 1e9
        );
        return Ok(());
    }
    let out = args.out.context("--out is required without --dry-run")?;
    if !args.no_memory_check {
        // The fp32 weights, plus the saved copy's buffer while writing.
        let saved = if args.dtype == "bf16" { 2 } else { 4 };
        let needed = (config.param_count_u128() * (4 + saved)).min(u64::MAX as u128) as u64;
        steel_train::memory::check_host_memory(
            needed,
            &format!("initialising {} parameters", config.num_params()),
            "--no-memory-check",
        )?;
    }
    let backend = Arc::new(CpuBackend::new());
    eprintln!("steel-init: initialising {} parameters (seed {})", config.num_params(), args.seed);
    let model = SteelModel::init(config, backend, DType::F32, args.seed)?;
    let dtype = if args.dtype == "bf16" { SaveDType::BF16 } else { SaveDType::F32 };
    save_hf_dir(&model, &out, &ExportOptions { dtype, ..ExportOptions::default() })
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("steel-init: wrote {}", out.display());
    Ok(())
}
