//! `steel-chat`: a multi-turn conversation with a Steel model in the terminal.

use anyhow::Context;
use clap::Parser;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use steel_cli::generation::{Loaded, SamplingArgs, Streamer};
use steel_data::chat::Message;

#[derive(Parser)]
#[command(
    name = "steel-chat",
    version,
    about = "Chat with a Steel model: a multi-turn REPL over the tokenizer's chat template",
    after_help = "Type a message and press Enter. Commands:\n  /reset          forget the conversation\n  \
        /system TEXT    set the system message (and reset)\n  /quit           leave (also Ctrl-D)\n\n\
        Example (from the clone; after `cargo install --path bin`, bare `steel-chat …` too):\n  cargo run --release --bin steel-chat -- --model runs/demo/export --temperature 0.7 --top-p 0.9"
)]
struct Args {
    /// A HF model directory or a training checkpoint.
    #[arg(long)]
    model: PathBuf,
    /// Tokenizer directory (default: the model folder).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The system message.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    device: steel_cli::DeviceArgs,
}

fn main() -> ExitCode {
    steel_cli::run("steel-chat", || {
        let a = Args::parse();
        let run = a.device.open(true)?;
        let lm = Loaded::load(&a.model, a.tokenizer.as_deref(), true, run.backend())?;
        let tok = lm.tokenizer.as_ref().context("steel-chat needs a tokenizer")?;
        let tmpl = tok
            .chat_template()
            .context("the tokenizer's tokenizer_config.json has no chat_template")?;
        let mut opts = lm.options(&a.sampling);
        if !opts.eos.contains(&tok.im_end_id()) {
            opts.eos.push(tok.im_end_id());
        }
        let max_pos = lm
            .model
            .config
            .extra
            .get("max_position_embeddings")
            .and_then(|v| v.as_u64())
            .unwrap_or(4096) as usize;
        let mut system = a.system.clone();
        let mut turns: Vec<Message> = Vec::new();
        let mut seed = opts.seed;
        eprintln!(
            "steel-chat: {} ({} parameters). /reset, /system TEXT, /quit",
            a.model.display(),
            lm.model.config.num_params()
        );
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        loop {
            eprint!("> ");
            std::io::stderr().flush()?;
            let Some(line) = lines.next() else { break };
            let line = line?;
            let text = line.trim();
            if text.is_empty() {
                continue;
            }
            match text {
                "/quit" | "/exit" => break,
                "/reset" => {
                    turns.clear();
                    eprintln!("(conversation reset)");
                    continue;
                }
                _ if text.starts_with("/system") => {
                    let s = text["/system".len()..].trim();
                    system = (!s.is_empty()).then(|| s.to_string());
                    turns.clear();
                    eprintln!(
                        "(system message {}; conversation reset)",
                        if system.is_some() { "set" } else { "cleared" }
                    );
                    continue;
                }
                _ if text.starts_with('/') => {
                    eprintln!("unknown command {text:?} (/reset, /system TEXT, /quit)");
                    continue;
                }
                _ => {}
            }
            turns.push(Message::new("user", text));
            // Render; drop the oldest exchanges while the conversation does not fit.
            let prompt = loop {
                let mut msgs = Vec::new();
                if let Some(s) = &system {
                    msgs.push(Message::new("system", s.clone()));
                }
                msgs.extend(turns.iter().cloned());
                let ids = tok.encode(&tmpl.render(&msgs, true)?)?;
                if ids.len() + opts.max_new_tokens <= max_pos || turns.len() <= 1 {
                    break ids;
                }
                turns.drain(..2.min(turns.len() - 1));
            };
            let mut streamer = Streamer::new(tok);
            let mut err = None;
            opts.seed = seed;
            seed = seed.wrapping_add(1);
            let out = lm.model.generate(&[prompt], &opts, &mut |_, id| {
                if let Err(e) = streamer.push(id) {
                    err.get_or_insert(e);
                }
            })?;
            if let Some(e) = err {
                return Err(e);
            }
            streamer.finish()?;
            println!();
            let reply: Vec<u32> =
                out[0].iter().copied().filter(|t| !opts.eos.contains(t)).collect();
            turns.push(Message::new("assistant", tok.decode(&reply, true)?));
        }
        Ok(())
    })
}
