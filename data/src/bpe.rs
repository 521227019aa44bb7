//! A small byte-level BPE tokenizer built from text: the demo's tokenizer when no tokenizer
//! directory is given (the Qwen one has 151,936 tokens, far too many for a model trained in
//! minutes).
//!
//! The result is an ordinary HF `tokenizer.json` (GPT-2 byte-level pre-tokenizer and decoder, a
//! BPE model) plus a `tokenizer_config.json` carrying Qwen's ChatML chat template, with the same
//! three special tokens as Qwen (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`), placed after the
//! learned tokens. Ids 0–255 are the 256 bytes, then one id per merge in the order learned.
//!
//! Training is the textbook algorithm: words are split exactly as the byte-level pre-tokenizer
//! splits them at encode time, every round merges the most frequent adjacent pair (ties go to the
//! pair whose symbols come first in the vocabulary, so the result depends only on the text), until
//! the vocabulary is full or no pair occurs twice.

use crate::{DataError, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

/// The special tokens, in id order after the learned vocabulary.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Qwen's ChatML template (the `chat_template` of Qwen1.5's `tokenizer_config.json`).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// GPT-2's reversible map of bytes to printable characters (what byte-level BPE vocabularies
/// are written in).
pub fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('\0')
        };
    }
    out
}

/// A trained byte-level BPE vocabulary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BpeVocab {
    /// Token strings (byte-level characters) by id, specials last.
    pub tokens: Vec<String>,
    /// Merges in the order learned, as pairs of token ids.
    pub merges: Vec<(u32, u32)>,
}

impl BpeVocab {
    /// Vocabulary size including the special tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The id of a special token.
    pub fn special_id(&self, token: &str) -> Option<u32> {
        let base = (self.tokens.len() - SPECIAL_TOKENS.len()) as u32;
        SPECIAL_TOKENS.iter().position(|t| *t == token).map(|i| base + i as u32)
    }

    /// The HF `tokenizer.json` document.
    pub fn tokenizer_json(&self) -> Value {
        let learned = self.tokens.len() - SPECIAL_TOKENS.len();
        let vocab: serde_json::Map<String, Value> =
            self.tokens[..learned].iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        let merges: Vec<String> = self
            .merges
            .iter()
            .map(|&(a, b)| format!("{} {}", self.tokens[a as usize], self.tokens[b as usize]))
            .collect();
        let added: Vec<Value> = SPECIAL_TOKENS
            .iter()
            .enumerate()
            .map(|(i, t)| {
                json!({"id": learned + i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                                "trim_offsets": true, "use_regex": true});
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": byte_level,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": false,
                               "trim_offsets": false, "use_regex": true},
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges}
        })
    }

    /// The `tokenizer_config.json` document (Qwen's fields and chat template).
    pub fn tokenizer_config_json(&self) -> Value {
        let learned = self.tokens.len() - SPECIAL_TOKENS.len();
        let decoder: serde_json::Map<String, Value> = SPECIAL_TOKENS
            .iter()
            .enumerate()
            .map(|(i, t)| {
                (
                    (learned + i).to_string(),
                    json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false,
                        "single_word": false, "special": true}),
                )
            })
            .collect();
        json!({
            "add_prefix_space": false,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": null,
            "chat_template": CHATML_TEMPLATE,
            "clean_up_tokenization_spaces": false,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": false,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": null
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (created if needed).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        for (name, doc) in [
            ("tokenizer.json", self.tokenizer_json()),
            ("tokenizer_config.json", self.tokenizer_config_json()),
        ] {
            let path = dir.join(name);
            let text = serde_json::to_string_pretty(&doc)
                .map_err(|e| DataError::Invalid(e.to_string()))?;
            std::fs::write(&path, text).map_err(|e| DataError::io(&path, e))?;
        }
        Ok(())
    }
}

/// The words of `text` as the byte-level pre-tokenizer splits them, in byte-level characters.
fn words_of(text: &str) -> Result<Vec<String>> {
    let mut s = PreTokenizedString::from(text);
    ByteLevel::new(false, true, true)
        .pre_tokenize(&mut s)
        .map_err(|e| DataError::Tokenizer(e.to_string()))?;
    Ok(s.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(w, _, _)| w.to_string())
        .collect())
}

/// Learns a byte-level BPE of at most `vocab_size` tokens (including the 256 bytes and the three
/// special tokens) from `texts` (see the module docs).
pub fn train_bpe(texts: &[&str], vocab_size: usize) -> Result<BpeVocab> {
    let min = 256 + SPECIAL_TOKENS.len();
    if vocab_size < min {
        return Err(DataError::Invalid(format!(
            "a byte-level BPE needs a vocabulary of at least {min} tokens, got {vocab_size}"
        )));
    }
    let chars = byte_chars();
    let index: HashMap<char, u32> = chars.iter().enumerate().map(|(i, &c)| (c, i as u32)).collect();
    let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    // Distinct words with their counts, in a deterministic order.
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for text in texts {
        for w in words_of(text)? {
            *counts.entry(w).or_default() += 1;
        }
    }
    let mut words: Vec<(Vec<u32>, u64)> = counts
        .into_iter()
        .map(|(w, n)| {
            let ids = w
                .chars()
                .map(|c| {
                    index.get(&c).copied().ok_or_else(|| {
                        DataError::Tokenizer(format!("pre-tokenizer produced non-byte char {c:?}"))
                    })
                })
                .collect::<Result<Vec<u32>>>()?;
            Ok((ids, n))
        })
        .collect::<Result<_>>()?;
    let mut by_string: HashMap<String, u32> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut merges = Vec::new();
    while tokens.len() + SPECIAL_TOKENS.len() < vocab_size {
        let mut pairs: HashMap<(u32, u32), u64> = HashMap::new();
        for (w, n) in &words {
            for p in w.windows(2) {
                *pairs.entry((p[0], p[1])).or_default() += n;
            }
        }
        // Most frequent; ties to the smallest pair, so the order never depends on hashing.
        let best = pairs
            .into_iter()
            .filter(|&(_, n)| n >= 2)
            .max_by(|(pa, na), (pb, nb)| na.cmp(nb).then(pb.cmp(pa)));
        let Some(((a, b), _)) = best else { break };
        // Two merge paths can spell the same string ("ab"+"c", "a"+"bc"): one id for both.
        let merged = format!("{}{}", tokens[a as usize], tokens[b as usize]);
        let id = match by_string.get(&merged) {
            Some(&id) => id,
            None => {
                let id = tokens.len() as u32;
                by_string.insert(merged.clone(), id);
                tokens.push(merged);
                id
            }
        };
        merges.push((a, b));
        for (w, _) in &mut words {
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                    out.push(id);
                    i += 2;
                } else {
                    out.push(w[i]);
                    i += 1;
                }
            }
            *w = out;
        }
    }
    tokens.extend(SPECIAL_TOKENS.iter().map(|s| s.to_string()));
    Ok(BpeVocab { tokens, merges })
}
