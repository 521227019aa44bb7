//! Shared pieces of `steel-generate` and `steel-chat`: loading a model with its tokenizer and
//! `generation_config.json`, the sampling flags, and streaming decoded text to the terminal.

use anyhow::Context;
use clap::Args;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use steel_data::tokenizer::Tokenizer;
use steel_model::{GenerationOptions, SteelModel, TokenIds};
use steel_runtime::Backend;

/// Sampling flags; each overrides the model's generation_config.json.
#[derive(Args, Clone, Debug, Default)]
pub struct SamplingArgs {
    /// Tokens to generate at most (default: generation_config's max_new_tokens, else 256).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// 0 is greedy (default: generation_config's, else 1.0; greedy when it says do_sample false).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Keep only the K most likely tokens (default: off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold in (0, 1] (default: generation_config's, else 1.0).
    #[arg(long)]
    pub top_p: Option<f64>,
    /// HF's repetition penalty (default: generation_config's, else 1.0).
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A model, its tokenizer (if any) and its generation defaults.
pub struct Loaded {
    pub model: SteelModel,
    pub tokenizer: Option<Tokenizer>,
    pub gen_config: Value,
}

fn ids_of(v: &Value) -> Vec<u32> {
    match v {
        Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Value::Array(a) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => Vec::new(),
    }
}

impl Loaded {
    /// Loads `model_dir` (a HF directory or a training checkpoint) and the tokenizer from
    /// `tokenizer` or the model folder. `need_tokenizer`: a missing one is an error.
    pub fn load(
        model_dir: &Path,
        tokenizer: Option<&Path>,
        need_tokenizer: bool,
        backend: Arc<dyn Backend>,
    ) -> anyhow::Result<Loaded> {
        let model = crate::load_model(model_dir, backend)
            .with_context(|| format!("loading the model {}", model_dir.display()))?;
        let tdir: PathBuf =
            tokenizer.map(Path::to_path_buf).unwrap_or_else(|| model_dir.to_path_buf());
        let tokenizer = if tdir.join("tokenizer.json").is_file() || tdir.is_file() {
            Some(Tokenizer::load(&tdir)?)
        } else if need_tokenizer || tokenizer.is_some() {
            anyhow::bail!(
                "no tokenizer.json in {}: pass --tokenizer DIR (or --prompt-ids, which needs none)",
                tdir.display()
            );
        } else {
            None
        };
        let gpath = model_dir.join("generation_config.json");
        let gen_config = if gpath.is_file() {
            serde_json::from_str(
                &std::fs::read_to_string(&gpath)
                    .with_context(|| format!("reading {}", gpath.display()))?,
            )
            .with_context(|| format!("{}: not valid JSON", gpath.display()))?
        } else {
            Value::Null
        };
        Ok(Loaded { model, tokenizer, gen_config })
    }

    /// The options: flags over generation_config.json over the documented defaults; eos ids from
    /// generation_config, else config.json, else the tokenizer's `<|im_end|>`.
    pub fn options(&self, a: &SamplingArgs) -> GenerationOptions {
        let g = &self.gen_config;
        let greedy_default = g["do_sample"] == Value::Bool(false);
        let mut eos = ids_of(&g["eos_token_id"]);
        if eos.is_empty() {
            eos = match &self.model.config.eos_token_id {
                Some(TokenIds::One(i)) => vec![*i as u32],
                Some(TokenIds::Many(v)) => v.iter().map(|&i| i as u32).collect(),
                None => Vec::new(),
            };
        }
        if let Some(t) = &self.tokenizer {
            if eos.is_empty() {
                eos.push(t.im_end_id());
            }
        }
        GenerationOptions {
            max_new_tokens: a
                .max_new_tokens
                .or(g["max_new_tokens"].as_u64().map(|x| x as usize))
                .unwrap_or(256),
            temperature: a.temperature.unwrap_or(if greedy_default {
                0.0
            } else {
                g["temperature"].as_f64().unwrap_or(1.0)
            }),
            top_k: a.top_k.or(g["top_k"].as_u64().map(|x| x as usize)).filter(|&k| k > 0),
            top_p: a.top_p.or(g["top_p"].as_f64()).unwrap_or(1.0),
            repetition_penalty: a
                .repetition_penalty
                .or(g["repetition_penalty"].as_f64())
                .unwrap_or(1.0),
            eos,
            seed: a.seed,
        }
    }
}

/// Prints the text of a growing list of ids as it grows, whole characters only: a token that
/// ends inside a multi-byte UTF-8 sequence is held back until the sequence completes (a
/// byte-level tokenizer splits a Chinese character over two or three tokens), so no broken
/// fragment is printed mid-stream. A sequence that proves invalid (the next byte cannot continue
/// it) is printed as U+FFFD once later text follows; [`finish`](Streamer::finish) prints what is
/// held back when generation ends.
pub struct Streamer<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    printed: usize,
    out: Box<dyn Write + 'a>,
}

impl<'a> Streamer<'a> {
    /// A streamer to standard output.
    pub fn new(tok: &'a Tokenizer) -> Self {
        Self::to(tok, Box::new(std::io::stdout()))
    }

    /// A streamer to `out`.
    pub fn to(tok: &'a Tokenizer, out: Box<dyn Write + 'a>) -> Self {
        Streamer { tok, ids: Vec::new(), printed: 0, out }
    }

    pub fn push(&mut self, id: u32) -> anyhow::Result<()> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, true)?;
        // The held-back tail: replacement characters at the end may still become a character.
        let ready = text.trim_end_matches('\u{FFFD}').len();
        self.emit(&text, ready)
    }

    /// Prints whatever is still held back (an incomplete sequence at the very end shows as
    /// U+FFFD): call it when generation ends.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        let text = self.tok.decode(&self.ids, true)?;
        let end = text.len();
        self.emit(&text, end)
    }

    /// Writes `text[printed..upto]` when that is a clean continuation of what was printed.
    fn emit(&mut self, text: &str, upto: usize) -> anyhow::Result<()> {
        if upto <= self.printed || !text.is_char_boundary(self.printed) {
            return Ok(());
        }
        self.out.write_all(&text.as_bytes()[self.printed..upto])?;
        self.out.flush()?;
        self.printed = upto;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Rc<RefCell<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The Qwen tokenizer's single-byte token of `b` (byte-level BPE spells bytes as characters).
    fn byte_id(tok: &Tokenizer, b: u8) -> u32 {
        let c = steel_data::bpe::byte_chars()[b as usize];
        tok.token_to_id(&c.to_string()).expect("every byte has a token")
    }

    /// A character split over byte tokens is printed only once whole; a sequence the next byte
    /// breaks is printed as U+FFFD; an incomplete tail is printed by `finish`.
    #[test]
    fn streaming_holds_back_incomplete_characters() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data/qwen-tokenizer");
        let tok = Tokenizer::load(&dir).unwrap();
        let seen = Shared::default();
        let mut s = Streamer::to(&tok, Box::new(seen.clone()));
        let text = || String::from_utf8(seen.0.borrow().clone()).unwrap();
        let ni = "你".as_bytes(); // E4 BD A0
        s.push(byte_id(&tok, ni[0])).unwrap();
        assert_eq!(text(), "", "a lead byte alone waits");
        s.push(byte_id(&tok, ni[1])).unwrap();
        assert_eq!(text(), "");
        s.push(byte_id(&tok, ni[2])).unwrap();
        assert_eq!(text(), "你");
        s.push(byte_id(&tok, ni[0])).unwrap();
        s.push(byte_id(&tok, b'a')).unwrap();
        assert_eq!(text(), "你\u{FFFD}a", "a broken sequence shows once it proves invalid");
        s.push(byte_id(&tok, ni[0])).unwrap();
        s.push(byte_id(&tok, ni[1])).unwrap();
        assert_eq!(text(), "你\u{FFFD}a");
        s.finish().unwrap();
        assert!(text().starts_with("你\u{FFFD}a\u{FFFD}"), "the tail at the end: {:?}", text());
    }
}
