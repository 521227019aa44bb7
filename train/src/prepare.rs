//! Turning a recipe's data section into shard directories and a tokenizer.
//!
//! Shard directories (`data.train`) are used as they are. Plain text (`data.text`, or the embedded
//! demo corpus) is split into documents at blank lines, every `holdout_every`-th document held out
//! for validation, and tokenized into `<out>/data/{train,val}` shards (each document followed by
//! `<|im_end|>`, as step 3 does), with the given tokenizer or a byte-level BPE learned from the
//! training documents into `<out>/tokenizer`. The preparation is keyed by a hash of its inputs
//! and reused when nothing changed, so a resumed run finds the very files its data state names.

use crate::recipe::{Recipe, DEMO_CORPUS};
use crate::sft::SftExample;
use crate::{Result, TrainError};
use std::path::{Path, PathBuf};
use steel_data::bpe::train_bpe;
use steel_data::dataset::DataSpec;
use steel_data::shard::{ShardWriter, TokenDType};
use steel_data::tokenizer::{Tokenizer, PAD_ID};

/// What training reads.
#[derive(Clone, Debug)]
pub struct PreparedData {
    pub train: Vec<DataSpec>,
    pub val: Vec<DataSpec>,
    /// The tokenizer directory (saved into checkpoints and exports), if any.
    pub tokenizer: Option<PathBuf>,
    /// Tokens of the tokenizer's vocabulary, if there is a tokenizer.
    pub vocab: Option<usize>,
    pub ignore_index: i64,
    /// `<|endoftext|>` and `<|im_end|>` of the tokenizer, if there is one.
    pub special_ids: Option<(u32, u32)>,
    /// Fine-tuning examples (with `data.sft`).
    pub sft: Option<SftData>,
    /// Whether this preparation learned the tokenizer (and already announced it).
    pub tokenizer_learned: bool,
}

/// Rendered fine-tuning examples and the hashes of their files.
#[derive(Clone, Debug)]
pub struct SftData {
    pub examples: std::sync::Arc<Vec<SftExample>>,
    pub hashes: Vec<String>,
    pub report: crate::sft::LoadReport,
}

fn data_err(e: steel_data::DataError) -> TrainError {
    TrainError::Invalid(e.to_string())
}

fn io(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Invalid(format!("{}: {e}", path.display()))
}

/// Documents of a text: paragraphs separated by blank lines, trimmed, empty ones dropped.
pub fn documents(text: &str) -> Vec<String> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.trim().is_empty() {
                docs.push(cur.trim().to_string());
            }
            cur.clear();
        } else {
            if !cur.is_empty() {
                cur.push('\n');
            }
            cur.push_str(line);
        }
    }
    if !cur.trim().is_empty() {
        docs.push(cur.trim().to_string());
    }
    docs
}

fn write_shards(
    tok: &Tokenizer,
    docs: &[&str],
    dir: &Path,
    prefix: &str,
    block: usize,
) -> Result<u64> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    let sep = tok.im_end_id();
    let mut ids = Vec::new();
    for d in docs {
        ids.extend(tok.encode(d).map_err(data_err)?);
        ids.push(sep);
    }
    let blocks = ids.len().div_ceil(block).max(1);
    let mut w = ShardWriter::new(
        dir,
        prefix,
        blocks * block,
        TokenDType::for_vocab(tok.vocab_size()),
        tok.pad_id(),
    )
    .map_err(data_err)?;
    w.add(&ids).map_err(data_err)?;
    w.finish().map_err(data_err)?;
    Ok(ids.len() as u64)
}

/// Prepares the data of `recipe` under `out` (see the module docs); `notice` gets one line per
/// thing done.
pub fn prepare_data(
    recipe: &Recipe,
    out: &Path,
    notice: &mut dyn FnMut(String),
) -> Result<PreparedData> {
    let d = &recipe.data;
    let given_tok = match &d.tokenizer {
        Some(dir) => Some(Tokenizer::load(dir).map_err(data_err)?),
        None => None,
    };
    if !d.sft.is_empty() {
        let dir =
            d.tokenizer.clone().or_else(|| recipe.model.init_from.clone()).ok_or_else(|| {
                TrainError::Invalid(
                    "data.sft needs data.tokenizer (or model.init_from with one)".into(),
                )
            })?;
        let tok = Tokenizer::load(&dir).map_err(data_err)?;
        let (examples, report) = crate::sft::load(&d.sft, &tok, &d.system, d.seq_len)?;
        notice(format!(
            "sft: {} examples from {} file(s) ({} malformed, {} without assistant tokens after the cut at {})",
            report.examples,
            d.sft.len(),
            report.malformed,
            report.empty,
            d.seq_len
        ));
        for e in &report.first_errors {
            notice(format!("sft: skipped {e}"));
        }
        return Ok(PreparedData {
            train: Vec::new(),
            val: Vec::new(),
            tokenizer: Some(dir),
            vocab: Some(tok.vocab_size()),
            ignore_index: crate::sft::IGNORE,
            special_ids: Some((tok.pad_id(), tok.im_end_id())),
            sft: Some(SftData {
                examples: std::sync::Arc::new(examples),
                hashes: crate::sft::hash_files(&d.sft)?,
                report,
            }),
            tokenizer_learned: false,
        });
    }
    if !d.train.is_empty() {
        let pad = given_tok.as_ref().map_or(PAD_ID, Tokenizer::pad_id);
        return Ok(PreparedData {
            train: d
                .train
                .iter()
                .map(|t| DataSpec { dir: t.path.clone(), weight: t.weight })
                .collect(),
            val: d.val.iter().map(|p| DataSpec { dir: p.clone(), weight: 1.0 }).collect(),
            tokenizer: d.tokenizer.clone(),
            vocab: given_tok.as_ref().map(Tokenizer::vocab_size),
            ignore_index: d.ignore_index.unwrap_or(pad as i64),
            special_ids: given_tok.as_ref().map(|t| (t.pad_id(), t.im_end_id())),
            sft: None,
            tokenizer_learned: false,
        });
    }
    // Plain text.
    let mut text = String::new();
    if d.demo_corpus {
        text.push_str(DEMO_CORPUS);
    }
    for p in &d.text {
        let t = std::fs::read_to_string(p).map_err(|e| io(p, e))?;
        text.push_str("\n\n");
        text.push_str(&t);
    }
    let docs = documents(&text);
    let (mut train_docs, mut val_docs) = (Vec::new(), Vec::new());
    for (i, doc) in docs.iter().enumerate() {
        if d.holdout_every > 0 && (i + 1) % d.holdout_every == 0 {
            val_docs.push(doc.as_str());
        } else {
            train_docs.push(doc.as_str());
        }
    }
    if train_docs.is_empty() {
        return Err(TrainError::Invalid("data: the text holds no training documents".into()));
    }
    let data_dir = out.join("data");
    let tok_dir = match &d.tokenizer {
        Some(dir) => dir.clone(),
        None => out.join("tokenizer"),
    };
    let mut key = blake3::Hasher::new();
    key.update(text.as_bytes());
    key.update(
        format!(
            "steel-prepare-v1|{}|{}|{}|{:?}",
            d.seq_len, d.holdout_every, d.bpe_vocab, d.tokenizer
        )
        .as_bytes(),
    );
    let key = key.finalize().to_hex().to_string();
    let stamp = data_dir.join("prepared.json");
    let fresh = std::fs::read_to_string(&stamp)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .is_some_and(|v| v["key"] == key.as_str())
        && tok_dir.join("tokenizer.json").is_file();
    let mut learned = false;
    if !fresh {
        if d.tokenizer.is_none() {
            let vocab = train_bpe(&train_docs, d.bpe_vocab).map_err(data_err)?;
            vocab.save(&tok_dir).map_err(data_err)?;
            learned = true;
            notice(format!(
                "tokenizer: learned a byte-level BPE of {} tokens from {} documents → {}",
                vocab.len(),
                train_docs.len(),
                tok_dir.display()
            ));
        }
        let tok = Tokenizer::load(&tok_dir).map_err(data_err)?;
        let block = d.seq_len + 1;
        let n = write_shards(&tok, &train_docs, &data_dir.join("train"), "train", block)?;
        let v = if val_docs.is_empty() {
            0
        } else {
            write_shards(&tok, &val_docs, &data_dir.join("val"), "val", block)?
        };
        notice(format!(
            "data: {} training documents ({n} tokens), {} held out ({v} tokens) → {}",
            train_docs.len(),
            val_docs.len(),
            data_dir.display()
        ));
        let doc = serde_json::json!({"key": key, "train_tokens": n, "val_tokens": v});
        std::fs::write(&stamp, doc.to_string()).map_err(|e| io(&stamp, e))?;
    }
    let tok = Tokenizer::load(&tok_dir).map_err(data_err)?;
    Ok(PreparedData {
        train: vec![DataSpec { dir: data_dir.join("train"), weight: 1.0 }],
        val: if val_docs.is_empty() {
            Vec::new()
        } else {
            vec![DataSpec { dir: data_dir.join("val"), weight: 1.0 }]
        },
        tokenizer: Some(tok_dir),
        vocab: Some(tok.vocab_size()),
        ignore_index: d.ignore_index.unwrap_or(tok.pad_id() as i64),
        special_ids: Some((tok.pad_id(), tok.im_end_id())),
        sft: None,
        tokenizer_learned: learned,
    })
}
