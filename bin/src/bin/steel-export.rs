//! `steel-export`: a training checkpoint → a HuggingFace model directory.

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use steel_model::{load_hf_dir, save_hf_dir, ExportOptions, SaveDType};
use steel_runtime::{cpu::CpuBackend, DType};

#[derive(Parser)]
#[command(
    name = "steel-export",
    version,
    about = "Export a training checkpoint as a HuggingFace directory (config.json, safetensors, generation_config.json, tokenizer files)",
    after_help = "Example:\n  steel-export --checkpoint runs/demo/checkpoints/step-000300 --out runs/demo/export\n\n\
        The checkpoint's files are verified against its manifest first; a damaged file is named."
)]
struct Args {
    /// A checkpoint directory (…/checkpoints/step-NNNNNN).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The HF directory to write (created; existing model files are replaced).
    #[arg(long)]
    out: PathBuf,
    /// Weight dtype of the export.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32"])]
    dtype: String,
    /// Also copy the reference's remote code (configuration_steel.py, modeling_steel.py) from DIR
    /// and set auto_map, so `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` works.
    #[arg(long, value_name = "DIR")]
    remote_code: Option<PathBuf>,
}

fn main() -> ExitCode {
    steel_cli::run("steel-export", || {
        let args = Args::parse();
        steel_train::checkpoint::verify(&args.checkpoint)
            .with_context(|| format!("checkpoint {}", args.checkpoint.display()))?;
        let model = load_hf_dir(&args.checkpoint, Arc::new(CpuBackend::new()), DType::F32)?;
        let opts = ExportOptions {
            dtype: if args.dtype == "f32" { SaveDType::F32 } else { SaveDType::BF16 },
            remote_code: args.remote_code.clone(),
            ..ExportOptions::default()
        };
        save_hf_dir(&model, &args.out, &opts)?;
        let mut copied = Vec::new();
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            let src = args.checkpoint.join(name);
            if src.is_file() {
                let dst = args.out.join(name);
                std::fs::copy(&src, &dst)
                    .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
                copied.push(name);
            }
        }
        println!(
            "exported {} parameters ({}) to {}{}",
            model.config.num_params(),
            args.dtype,
            args.out.display(),
            if copied.is_empty() {
                " (the checkpoint has no tokenizer files)".to_string()
            } else {
                format!(" with {}", copied.join(", "))
            }
        );
        Ok(())
    })
}
