//! The Qwen byte-level BPE tokenizer (HF `tokenizers`), loaded from a `tokenizer.json`.
//!
//! `encode` adds no BOS/EOS (Qwen's post-processor adds nothing) and matches the special-token
//! strings in text as special tokens, exactly as HF's `tokenizer.encode` does.

use crate::chat::ChatTemplate;
use crate::{DataError, Result};
use std::path::{Path, PathBuf};

/// `<|endoftext|>`: the pad token, and the filler of a partial shard.
pub const PAD_ID: u32 = 151643;
/// `<|im_start|>`.
pub const IM_START_ID: u32 = 151644;
/// `<|im_end|>`: the eos token and the document separator of packed shards.
pub const IM_END_ID: u32 = 151645;

/// Runs one call into the `tokenizers` crate with its error, or a panic (it asserts on some
/// malformed tokenizer files), as a message.
fn guarded<T>(f: impl FnOnce() -> tokenizers::Result<T>) -> std::result::Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(panic) => {
            Err(format!("the tokenizer library failed ({})", crate::panic_message(&panic)))
        }
    }
}

/// A loaded tokenizer plus the chat template of its `tokenizer_config.json`, if any.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat: Option<ChatTemplate>,
    source: PathBuf,
}

impl Tokenizer {
    /// Loads `tokenizer.json` (and `tokenizer_config.json`, when present, for the chat template)
    /// from a tokenizer or model directory, or from a `tokenizer.json` path.
    pub fn load(path: &Path) -> Result<Tokenizer> {
        let (file, dir) = if path.is_dir() {
            (path.join("tokenizer.json"), path.to_path_buf())
        } else {
            (path.to_path_buf(), path.parent().map(Path::to_path_buf).unwrap_or_default())
        };
        if !file.is_file() {
            return Err(DataError::format(
                &file,
                "no tokenizer.json here: point --tokenizer at a directory holding tokenizer.json (e.g. ../shared/data/qwen-tokenizer)",
            ));
        }
        let inner = guarded(|| tokenizers::Tokenizer::from_file(&file))
            .map_err(|e| DataError::format(&file, format!("cannot load the tokenizer: {e}")))?;
        let config = dir.join("tokenizer_config.json");
        let chat =
            if config.is_file() { ChatTemplate::from_tokenizer_config(&config)? } else { None };
        Ok(Tokenizer { inner, chat, source: file })
    }

    /// The id of `<|im_end|>` (the document separator and eos), 151645 in Qwen's vocabulary.
    pub fn im_end_id(&self) -> u32 {
        self.token_to_id("<|im_end|>").unwrap_or(IM_END_ID)
    }

    /// The id of `<|endoftext|>` (pad, shard filler and ignored target), 151643 in Qwen's.
    pub fn pad_id(&self) -> u32 {
        self.token_to_id("<|endoftext|>").unwrap_or(PAD_ID)
    }

    /// The `tokenizer.json` this was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Token ids of `text` (special-token strings become their ids; no BOS/EOS added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = guarded(|| self.inner.encode(text, true)).map_err(DataError::Tokenizer)?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`; with `skip_special`, special tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        guarded(|| self.inner.decode(ids, skip_special)).map_err(DataError::Tokenizer)
    }

    /// The number of ids the tokenizer can produce, added tokens included (151,646 for Qwen).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The chat template of `tokenizer_config.json`, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// The underlying HF tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
