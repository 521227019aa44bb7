//! `steel-generate`: text (or token ids) from a Steel model with a KV cache.

use anyhow::{bail, Context};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use steel_cli::generation::{Loaded, SamplingArgs, Streamer};
use steel_data::chat::Message;

#[derive(Parser)]
#[command(
    name = "steel-generate",
    version,
    about = "Generate from a Steel model (HF directory or training checkpoint) with a KV cache",
    long_about = "Generate from a Steel model with a KV cache: the prompt is processed in one \
        call, each new token in its own call (the soft-MoE sees only the tokens of the current \
        call, as the reference model does with its cache). Tokens stream to the terminal as they \
        are produced. Flags override the model's generation_config.json; without one the \
        defaults are temperature 1.0, top-k off, top-p 1.0, repetition penalty 1.0; temperature \
        0 is greedy.",
    after_help = "Examples (from the clone; after `cargo install --path bin`, bare `steel-generate …` too):\n  cargo run --release --bin steel-generate -- --model runs/demo/export --prompt \"The river\" --temperature 0\n  \
        cargo run --release --bin steel-generate -- --model runs/demo/export --chat --prompt \"Tell me about steel.\"\n  \
        cargo run --release --bin steel-generate -- --model DIR --prompt-ids 3,17,5 --json"
)]
struct Args {
    /// A HF model directory or a training checkpoint.
    #[arg(long)]
    model: PathBuf,
    /// Tokenizer directory (default: the model folder).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// The prompt as comma-separated token ids (needs no tokenizer).
    #[arg(long)]
    prompt_ids: Option<String>,
    /// Wrap the prompt in the chat template (a user turn, then the assistant's turn).
    #[arg(long)]
    chat: bool,
    /// The system message of --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    device: steel_cli::DeviceArgs,
    /// Print only one JSON line: {"ids": [generated ids], "text": text or null}.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    steel_cli::run("steel-generate", || {
        let a = Args::parse();
        let run = a.device.open(true)?;
        let need_tok = a.prompt.is_some() || a.chat;
        let lm = Loaded::load(&a.model, a.tokenizer.as_deref(), need_tok, run.backend())?;
        let prompt: Vec<u32> = match (&a.prompt, &a.prompt_ids) {
            (Some(text), _) => {
                let tok = lm.tokenizer.as_ref().context("--prompt needs a tokenizer")?;
                let text = if a.chat {
                    let tmpl = tok.chat_template().context(
                        "--chat: the tokenizer's tokenizer_config.json has no chat_template",
                    )?;
                    let mut msgs = Vec::new();
                    if let Some(s) = &a.system {
                        msgs.push(Message::new("system", s.clone()));
                    }
                    msgs.push(Message::new("user", text.clone()));
                    tmpl.render(&msgs, true)?
                } else {
                    text.clone()
                };
                tok.encode(&text)?
            }
            (None, Some(ids)) => {
                if a.chat {
                    bail!("--chat renders text: use --prompt");
                }
                steel_cli::parse_ids(ids)?
                    .into_iter()
                    .map(|i| {
                        u32::try_from(i).map_err(|_| anyhow::anyhow!("token id {i} is negative"))
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            (None, None) => bail!("give --prompt or --prompt-ids"),
        };
        if prompt.is_empty() {
            bail!("the prompt encodes to no tokens");
        }
        let opts = lm.options(&a.sampling);
        let max_pos = lm.model.config.extra.get("max_position_embeddings").and_then(|v| v.as_u64());
        if let Some(max_pos) = max_pos.filter(|&m| (prompt.len() + opts.max_new_tokens) as u64 > m)
        {
            eprintln!(
                "steel-generate: warning: the prompt ({} tokens) plus --max-new-tokens {} goes \
                 past the model's max_position_embeddings ({max_pos}): it was not trained on \
                 positions that far, so expect the text to degrade",
                prompt.len(),
                opts.max_new_tokens
            );
        }
        let mut streamer = lm.tokenizer.as_ref().filter(|_| !a.json).map(Streamer::new);
        let t0 = std::time::Instant::now();
        let mut err = None;
        let out = lm.model.generate(&[prompt], &opts, &mut |_, id| {
            if let Some(s) = streamer.as_mut() {
                if let Err(e) = s.push(id) {
                    err.get_or_insert(e);
                }
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        let ids = &out[0];
        let secs = t0.elapsed().as_secs_f64();
        if a.json {
            let text = match &lm.tokenizer {
                Some(t) => serde_json::Value::String(t.decode(ids, true)?),
                None => serde_json::Value::Null,
            };
            println!("{}", serde_json::json!({ "ids": ids, "text": text }));
        } else if let Some(s) = streamer.as_mut() {
            s.finish()?;
            println!();
        } else {
            println!("{}", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
        }
        if !a.json {
            eprintln!(
                "[{} tokens in {:.2} s, {:.1} tokens/s]",
                ids.len(),
                secs,
                ids.len() as f64 / secs.max(1e-9)
            );
        }
        Ok(())
    })
}
