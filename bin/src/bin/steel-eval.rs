//! `steel-eval`: scoring text with a Steel model.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use steel_runtime::Tensor;

#[derive(Parser)]
#[command(name = "steel-eval", version, about = "Evaluate a Steel model")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Perplexity of one token sequence: the model sees all T tokens; the loss is the mean NLL
    /// of tokens 2..T predicted from their prefixes (HF's shifted loss). Prints one JSON line
    /// {"loss": …, "tokens": <scored tokens, T−1>, "ppl": …}.
    Ppl(PplArgs),
    /// Multiple-choice accuracy on C-Eval or CMMLU CSVs (logits of the option letters, or the
    /// reference's generation protocols); per subject, per category and overall.
    Mc(steel_cli::eval_mc::McArgs),
}

#[derive(Parser)]
struct PplArgs {
    /// A HuggingFace model directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long, conflicts_with = "text", required_unless_present = "text")]
    ids: Option<String>,
    /// Text to score, encoded with the tokenizer (no BOS/EOS added).
    #[arg(long)]
    text: Option<String>,
    /// Tokenizer directory for --text (default: the model directory).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Also write the f32 logits [T, vocab] as the tensor `logits` of a safetensors file.
    #[arg(long)]
    dump_logits: Option<PathBuf>,
    #[command(flatten)]
    device: steel_cli::DeviceArgs,
}

fn main() -> ExitCode {
    steel_cli::run("steel-eval", || match Cli::parse().command {
        Command::Ppl(a) => ppl(a),
        Command::Mc(a) => steel_cli::eval_mc::run(a),
    })
}

fn ppl(args: PplArgs) -> Result<()> {
    let ids = match (&args.ids, &args.text) {
        (Some(ids), _) => steel_cli::parse_ids(ids)?,
        (None, Some(text)) => {
            let dir = args.tokenizer.clone().unwrap_or_else(|| args.model.clone());
            let tok = steel_data::tokenizer::Tokenizer::load(&dir).with_context(|| {
                format!(
                    "--text needs a tokenizer: none in {} (pass --tokenizer DIR)",
                    dir.display()
                )
            })?;
            tok.encode(text)?.into_iter().map(i64::from).collect()
        }
        (None, None) => bail!("give --ids or --text"),
    };
    if ids.len() < 2 {
        bail!("need at least 2 tokens to score (got {})", ids.len());
    }
    let run = args.device.open(true)?;
    let model = steel_cli::load_model(&args.model, run.backend())
        .with_context(|| format!("loading {}", args.model.display()))?;
    let (loss, tokens) = model.shifted_loss(&ids)?;
    if !loss.is_finite() {
        // JSON has no NaN: never print `"loss": null` as if it were a result.
        anyhow::bail!(
            "the loss is {loss} (not finite): the model's weights or activations overflow on \
             these tokens"
        );
    }
    if let Some(path) = &args.dump_logits {
        let input = Tensor::from_vec(ids.iter().map(|&x| x as i32).collect(), &[1, ids.len()])?;
        let logits = model.logits(&input)?;
        let v = model.config.vocab_size;
        let bytes = logits.to_bytes()?;
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![ids.len(), v],
            &bytes,
        )
        .context("building the logits tensor")?;
        let data: HashMap<String, _> = [("logits".to_string(), view)].into_iter().collect();
        safetensors::tensor::serialize_to_file(data, None, path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let out = serde_json::json!({ "loss": loss, "tokens": tokens, "ppl": loss.exp() });
    println!("{out}");
    Ok(())
}
