//! Steel's data pipeline (DESIGN §5, specs/reference-pipeline.md §1–§4, §7.1).
//!
//! - [`tokenizer`]: the Qwen byte-level BPE tokenizer (`tokenizers`), special ids, and
//!   [`chat`], the chat template rendered from `tokenizer_config.json`'s own Jinja text.
//! - [`bpe`]: a small byte-level BPE learned from text (the demo's tokenizer).
//! - [`convert`]: step 1, every raw source to `{"text": …}` jsonl.
//! - [`clean`]: step 2, native rule-based filters and mappers, exact and SimHash de-duplication.
//! - [`shard`] and [`tokenize`]: step 3, TinyLlama-compatible packed `.bin` shards.
//! - [`dataset`]: the resumable, appendable iterator over the blocks of those shards.
//!
//! This crate depends on no other crate of Steel's: it owns text and tokens.

pub mod bpe;
pub mod chat;
pub mod clean;
pub mod convert;
pub mod dataset;
pub mod shard;
pub mod tokenize;
pub mod tokenizer;

use std::path::{Path, PathBuf};

/// Errors of the data pipeline, each naming the file (and line) a user can fix.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// (The I/O error is part of the message, not a `source`, so chains print it once.)
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    pub fn io(path: &Path, err: std::io::Error) -> Self {
        DataError::Io { path: path.to_path_buf(), err }
    }
    pub fn format(path: &Path, msg: impl Into<String>) -> Self {
        DataError::Format { path: path.to_path_buf(), msg: msg.into() }
    }
}

pub type Result<T> = std::result::Result<T, DataError>;

/// The `"text"` of one `{"text": …}` jsonl line, or why the line is malformed (not UTF-8, not
/// JSON, not an object, no string `text`). Shared by every step that reads step-1 output.
pub fn text_of_jsonl_line(line: &[u8]) -> std::result::Result<String, String> {
    let line = std::str::from_utf8(line).map_err(|_| "not valid UTF-8".to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    match v {
        serde_json::Value::Object(mut o) => match o.remove("text") {
            Some(serde_json::Value::String(s)) => Ok(s),
            Some(_) => Err("\"text\" is not a string".into()),
            None => Err("no \"text\" key".into()),
        },
        _ => Err("not a JSON object".into()),
    }
}

/// The message of a caught panic (a `&str` or `String` payload), for errors that report a
/// third-party parser's panic.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
