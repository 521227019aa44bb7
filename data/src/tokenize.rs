//! Step 3: `{"text": …}` jsonl → packed shards (spec §3.1–§3.3).
//!
//! Every document is encoded and followed by `<|im_end|>` (151645), the document separator, and
//! the ids of all documents, in input order, form one stream written by a [`ShardWriter`] as
//! `{prefix}_{counter:010d}.bin`. Documents are encoded in parallel batches and appended in
//! order, so the bytes depend only on the inputs and the options, never on the thread count.
//! Malformed lines (not JSON, not an object, no string `text`) are counted and reported with
//! their line numbers; they never abort the run.

use crate::shard::{ShardWriter, TokenDType, WriterSummary};
use crate::tokenizer::Tokenizer;
use crate::{DataError, Result};
use rayon::prelude::*;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// Options of a tokenize run.
#[derive(Clone, Debug)]
pub struct TokenizeOptions {
    /// Tokens per training block (sequence length + 1).
    pub block_size: usize,
    /// Blocks per shard; a shard holds `block_size × blocks_per_shard` tokens.
    pub blocks_per_shard: usize,
    /// Size the last shard to the input (whole blocks, always written) instead of the
    /// reference's full, padded shard that is dropped when at most 5 % full.
    pub fit_last: bool,
    /// File name prefix of the shards.
    pub prefix: String,
    /// Documents encoded per parallel batch.
    pub batch_docs: usize,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions {
            block_size: 2049,
            blocks_per_shard: 204800,
            fit_last: false,
            prefix: "data".into(),
            batch_docs: 2048,
        }
    }
}

/// A malformed input line.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BadLine {
    pub file: PathBuf,
    pub line: u64,
    pub reason: String,
}

/// What a tokenize run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TokenizeSummary {
    pub input_files: usize,
    pub documents: u64,
    pub malformed: u64,
    /// The first malformed lines (at most 20).
    pub malformed_lines: Vec<BadLine>,
    /// Document tokens plus one separator per document.
    pub tokens: u64,
    pub shards: WriterSummary,
}

/// Progress of a run, reported after every batch.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub documents: u64,
    pub tokens: u64,
    pub bytes_read: u64,
}

/// The jsonl files named by `inputs`: files as given, directories searched recursively for
/// `*.jsonl` and `*.json` (hidden entries skipped), each directory's files sorted by path.
pub fn input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| DataError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if p.extension().is_some_and(|x| x == "jsonl" || x == "json") {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            return Err(DataError::format(p, "no such file or directory"));
        }
    }
    if out.is_empty() {
        return Err(DataError::Invalid(format!("no .jsonl/.json files found in {inputs:?}")));
    }
    Ok(out)
}

/// Tokenizes `inputs` into shards in `out_dir` (see the module docs). Parallelism comes from the
/// rayon pool the call runs in.
pub fn tokenize(
    tokenizer: &Tokenizer,
    inputs: &[PathBuf],
    out_dir: &Path,
    opts: &TokenizeOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<TokenizeSummary> {
    if opts.block_size == 0 || opts.blocks_per_shard == 0 {
        return Err(DataError::Invalid(
            "--block-size and --blocks-per-shard must be at least 1".into(),
        ));
    }
    let files = input_files(inputs)?;
    let dtype = TokenDType::for_vocab(tokenizer.vocab_size());
    let chunk = opts
        .block_size
        .checked_mul(opts.blocks_per_shard)
        .ok_or_else(|| DataError::Invalid("--block-size × --blocks-per-shard overflows".into()))?;
    let mut writer = if opts.fit_last {
        ShardWriter::fitted(
            out_dir,
            &opts.prefix,
            chunk,
            opts.block_size,
            dtype,
            tokenizer.pad_id(),
        )?
    } else {
        ShardWriter::new(out_dir, &opts.prefix, chunk, dtype, tokenizer.pad_id())?
    };
    let separator = tokenizer.im_end_id();
    let mut summary = TokenizeSummary { input_files: files.len(), ..TokenizeSummary::default() };
    let mut bytes_read = 0u64;
    let mut batch: Vec<String> = Vec::with_capacity(opts.batch_docs);
    let mut flush = |batch: &mut Vec<String>,
                     writer: &mut ShardWriter,
                     summary: &mut TokenizeSummary,
                     bytes: u64|
     -> Result<()> {
        let encoded: Vec<Result<Vec<u32>>> =
            batch.par_iter().map(|t| tokenizer.encode(t)).collect();
        for ids in encoded {
            let mut ids = ids?;
            ids.push(separator);
            summary.tokens += ids.len() as u64;
            writer.add(&ids)?;
        }
        summary.documents += batch.len() as u64;
        batch.clear();
        progress(Progress {
            documents: summary.documents,
            tokens: summary.tokens,
            bytes_read: bytes,
        });
        Ok(())
    };
    for file in &files {
        let f = std::fs::File::open(file).map_err(|e| DataError::io(file, e))?;
        let reader = std::io::BufReader::with_capacity(1 << 20, f);
        for (i, line) in reader.split(b'\n').enumerate() {
            let line = line.map_err(|e| DataError::io(file, e))?;
            bytes_read += line.len() as u64 + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let text = crate::text_of_jsonl_line(line);
            match text {
                Ok(t) => batch.push(t),
                Err(reason) => {
                    summary.malformed += 1;
                    if summary.malformed_lines.len() < 20 {
                        summary.malformed_lines.push(BadLine {
                            file: file.clone(),
                            line: i as u64 + 1,
                            reason,
                        });
                    }
                }
            }
            if batch.len() >= opts.batch_docs {
                flush(&mut batch, &mut writer, &mut summary, bytes_read)?;
            }
        }
    }
    if !batch.is_empty() {
        flush(&mut batch, &mut writer, &mut summary, bytes_read)?;
    }
    summary.shards = writer.finish()?;
    write_sidecar(out_dir, opts, tokenizer)?;
    Ok(summary)
}

/// The file `tokenize` writes beside its shards: the LITPKDS header has no block size, so this
/// records it (and the tokenizer's vocabulary) for `steel-data inspect` and for users.
pub const SIDECAR: &str = "steel-shards.json";

fn write_sidecar(out_dir: &Path, opts: &TokenizeOptions, tokenizer: &Tokenizer) -> Result<()> {
    let path = out_dir.join(SIDECAR);
    let doc = serde_json::json!({
        "format": "steel-shards-v1",
        "block_size": opts.block_size,
        "blocks_per_shard": opts.blocks_per_shard,
        "last_shard": if opts.fit_last { "fitted" } else { "reference" },
        "vocab_size": tokenizer.vocab_size(),
        "tokenizer": tokenizer.source(),
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| DataError::Invalid(e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(|e| DataError::io(&path, e))
}

/// The block size recorded by the sidecar in `dir`, if there is a readable one.
pub fn sidecar_block_size(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join(SIDECAR)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    (v["format"] == "steel-shards-v1").then(|| v["block_size"].as_u64())??.try_into().ok()
}
