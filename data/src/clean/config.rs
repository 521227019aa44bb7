//! The cleaning configuration: a JSON list of ops with their parameters, data-juicer's op
//! and parameter names, and the two built-in presets in the same structure.
//!
//! ```json
//! {"ops": [
//!   {"op": "chinese_convert_mapper", "mode": "t2s"},
//!   {"op": "alphanumeric_filter", "min_ratio": 0.0, "max_ratio": 0.9},
//!   {"op": "document_simhash_deduplicator", "window_size": 6, "hamming_distance": 4}
//! ]}
//! ```
//!
//! Every parameter is optional and defaults to data-juicer's default; `null` (or leaving out a
//! bound whose default is open) means unbounded. Unknown ops and parameters are errors.

use super::dedup::Tokenization;
use crate::{DataError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A whole configuration: the ops in the order they run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanConfig {
    pub ops: Vec<OpConfig>,
}

/// Parameters of ops that take none.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// `chinese_convert_mapper`: only `t2s` (Traditional → Simplified) is built in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChineseConvert {
    pub mode: String,
}

impl Default for ChineseConvert {
    fn default() -> Self {
        ChineseConvert { mode: "t2s".into() }
    }
}

/// `clean_email_mapper`, `clean_ip_mapper`, `clean_links_mapper`: an optional custom regex
/// (Rust `regex` syntax; default: data-juicer's pattern) and the replacement (default empty).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegexParams {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    pub repl: String,
}

/// `remove_repeat_sentences_mapper`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RepeatSentences {
    pub lowercase: bool,
    pub ignore_special_character: bool,
    pub min_repeat_sentence_length: usize,
}

impl Default for RepeatSentences {
    fn default() -> Self {
        RepeatSentences {
            lowercase: false,
            ignore_special_character: true,
            min_repeat_sentence_length: 2,
        }
    }
}

/// `remove_specific_chars_mapper`: every char of `chars_to_remove` is removed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpecificChars {
    pub chars_to_remove: String,
}

impl Default for SpecificChars {
    fn default() -> Self {
        SpecificChars { chars_to_remove: super::mappers::DEFAULT_CHARS_TO_REMOVE.into() }
    }
}

/// `alphanumeric_filter` (defaults: min 0.25, no max). `tokenization = true` (ratio to
/// tokenizer tokens) is not available.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlnumParams {
    pub tokenization: bool,
    pub min_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ratio: Option<f64>,
}

impl Default for AlnumParams {
    fn default() -> Self {
        AlnumParams { tokenization: false, min_ratio: Some(0.25), max_ratio: None }
    }
}

/// `average_line_length_filter`, `maximum_line_length_filter`, `text_length_filter`, in chars
/// (defaults: min 10, no max).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LenParams {
    pub min_len: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_len: Option<f64>,
}

impl Default for LenParams {
    fn default() -> Self {
        LenParams { min_len: Some(10.0), max_len: None }
    }
}

/// `character_repetition_filter` (defaults: rep_len 10, min 0, max 0.5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CharRepParams {
    pub rep_len: usize,
    pub min_ratio: Option<f64>,
    pub max_ratio: Option<f64>,
}

impl Default for CharRepParams {
    fn default() -> Self {
        CharRepParams { rep_len: 10, min_ratio: Some(0.0), max_ratio: Some(0.5) }
    }
}

/// `special_characters_filter` (defaults: min 0, max 0.25).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpecialParams {
    pub min_ratio: Option<f64>,
    pub max_ratio: Option<f64>,
}

impl Default for SpecialParams {
    fn default() -> Self {
        SpecialParams { min_ratio: Some(0.0), max_ratio: Some(0.25) }
    }
}

/// `words_num_filter` (defaults: lang en, min 10, no max). `lang` has no effect with
/// `tokenization = false`, the only mode available.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WordsNumParams {
    pub lang: String,
    pub tokenization: bool,
    pub min_num: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_num: Option<f64>,
}

impl Default for WordsNumParams {
    fn default() -> Self {
        WordsNumParams {
            lang: "en".into(),
            tokenization: false,
            min_num: Some(10.0),
            max_num: None,
        }
    }
}

/// `word_repetition_filter` (defaults: lang en, rep_len 10, min 0, max 0.5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WordRepParams {
    pub lang: String,
    pub tokenization: bool,
    pub rep_len: usize,
    pub min_ratio: Option<f64>,
    pub max_ratio: Option<f64>,
}

impl Default for WordRepParams {
    fn default() -> Self {
        WordRepParams {
            lang: "en".into(),
            tokenization: false,
            rep_len: 10,
            min_ratio: Some(0.0),
            max_ratio: Some(0.5),
        }
    }
}

/// `document_deduplicator`: exact duplicates by content hash.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExactDedupParams {
    pub lowercase: bool,
    pub ignore_non_character: bool,
}

/// `document_simhash_deduplicator` (defaults: space, window 6, lowercase, no ignore pattern,
/// 6 blocks, distance 4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimhashParams {
    pub tokenization: Tokenization,
    pub window_size: usize,
    pub lowercase: bool,
    pub ignore_pattern: Option<String>,
    pub num_blocks: usize,
    pub hamming_distance: u32,
}

impl Default for SimhashParams {
    fn default() -> Self {
        SimhashParams {
            tokenization: Tokenization::Space,
            window_size: 6,
            lowercase: true,
            ignore_pattern: None,
            num_blocks: 6,
            hamming_distance: 4,
        }
    }
}

/// One op of the pipeline, named as in data-juicer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OpConfig {
    ChineseConvertMapper(ChineseConvert),
    CleanEmailMapper(RegexParams),
    CleanHtmlMapper(NoParams),
    CleanIpMapper(RegexParams),
    CleanLinksMapper(RegexParams),
    CleanCopyrightMapper(NoParams),
    ExpandMacroMapper(NoParams),
    FixUnicodeMapper(NoParams),
    PunctuationNormalizationMapper(NoParams),
    RemoveRepeatSentencesMapper(RepeatSentences),
    RemoveSpecificCharsMapper(SpecificChars),
    WhitespaceNormalizationMapper(NoParams),
    AlphanumericFilter(AlnumParams),
    AverageLineLengthFilter(LenParams),
    CharacterRepetitionFilter(CharRepParams),
    MaximumLineLengthFilter(LenParams),
    SpecialCharactersFilter(SpecialParams),
    TextLengthFilter(LenParams),
    WordsNumFilter(WordsNumParams),
    WordRepetitionFilter(WordRepParams),
    DocumentDeduplicator(ExactDedupParams),
    DocumentSimhashDeduplicator(SimhashParams),
}

/// What an op does to a document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Rewrites the text (the report counts the documents it changed).
    Mapper,
    /// Keeps or removes the document by a statistic of its text.
    Filter,
    /// Removes documents that duplicate an earlier one (runs after all mappers and filters).
    Deduplicator,
}

impl OpConfig {
    /// The op's data-juicer name.
    pub fn name(&self) -> &'static str {
        use OpConfig::*;
        match self {
            ChineseConvertMapper(_) => "chinese_convert_mapper",
            CleanEmailMapper(_) => "clean_email_mapper",
            CleanHtmlMapper(_) => "clean_html_mapper",
            CleanIpMapper(_) => "clean_ip_mapper",
            CleanLinksMapper(_) => "clean_links_mapper",
            CleanCopyrightMapper(_) => "clean_copyright_mapper",
            ExpandMacroMapper(_) => "expand_macro_mapper",
            FixUnicodeMapper(_) => "fix_unicode_mapper",
            PunctuationNormalizationMapper(_) => "punctuation_normalization_mapper",
            RemoveRepeatSentencesMapper(_) => "remove_repeat_sentences_mapper",
            RemoveSpecificCharsMapper(_) => "remove_specific_chars_mapper",
            WhitespaceNormalizationMapper(_) => "whitespace_normalization_mapper",
            AlphanumericFilter(_) => "alphanumeric_filter",
            AverageLineLengthFilter(_) => "average_line_length_filter",
            CharacterRepetitionFilter(_) => "character_repetition_filter",
            MaximumLineLengthFilter(_) => "maximum_line_length_filter",
            SpecialCharactersFilter(_) => "special_characters_filter",
            TextLengthFilter(_) => "text_length_filter",
            WordsNumFilter(_) => "words_num_filter",
            WordRepetitionFilter(_) => "word_repetition_filter",
            DocumentDeduplicator(_) => "document_deduplicator",
            DocumentSimhashDeduplicator(_) => "document_simhash_deduplicator",
        }
    }

    pub fn kind(&self) -> OpKind {
        use OpConfig::*;
        match self {
            DocumentDeduplicator(_) | DocumentSimhashDeduplicator(_) => OpKind::Deduplicator,
            AlphanumericFilter(_)
            | AverageLineLengthFilter(_)
            | CharacterRepetitionFilter(_)
            | MaximumLineLengthFilter(_)
            | SpecialCharactersFilter(_)
            | TextLengthFilter(_)
            | WordsNumFilter(_)
            | WordRepetitionFilter(_) => OpKind::Filter,
            _ => OpKind::Mapper,
        }
    }
}

/// data-juicer ops that are deliberately not implemented, with the reason given to the user.
pub const LEFT_OUT: &[(&str, &str)] = &[
    (
        "perplexity_filter",
        "it needs data-juicer's KenLM language model, which Steel does not ship; remove the op from the config",
    ),
];

/// The built-in presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The reference's text configuration (`steel_project_txt.yaml`, spec §2.1).
    Text,
    /// The reference's code configuration (`steel_project_starcode.yaml`, spec §2.2).
    Code,
}

impl Preset {
    pub fn parse(name: &str) -> Result<Preset> {
        match name {
            "text" => Ok(Preset::Text),
            "code" => Ok(Preset::Code),
            _ => {
                Err(DataError::Invalid(format!("unknown preset {name:?} (expected text or code)")))
            }
        }
    }

    /// The preset's configuration: the reference's ops in the reference's order, without
    /// `perplexity_filter` (text) and the tokenizer-based `alphanumeric_filter` (code), with
    /// `document_deduplicator` (exact) before the SimHash deduplicator.
    pub fn config(self) -> CleanConfig {
        use OpConfig::*;
        let ops = match self {
            Preset::Text => vec![
                ChineseConvertMapper(ChineseConvert::default()),
                CleanEmailMapper(RegexParams::default()),
                CleanHtmlMapper(NoParams {}),
                CleanIpMapper(RegexParams::default()),
                CleanLinksMapper(RegexParams::default()),
                CleanCopyrightMapper(NoParams {}),
                ExpandMacroMapper(NoParams {}),
                FixUnicodeMapper(NoParams {}),
                PunctuationNormalizationMapper(NoParams {}),
                RemoveRepeatSentencesMapper(RepeatSentences {
                    lowercase: false,
                    ignore_special_character: true,
                    min_repeat_sentence_length: 2,
                }),
                RemoveSpecificCharsMapper(SpecificChars::default()),
                WhitespaceNormalizationMapper(NoParams {}),
                AlphanumericFilter(AlnumParams {
                    tokenization: false,
                    min_ratio: Some(0.0),
                    max_ratio: Some(0.9),
                }),
                AverageLineLengthFilter(LenParams { min_len: Some(10.0), max_len: Some(150.0) }),
                CharacterRepetitionFilter(CharRepParams {
                    rep_len: 10,
                    min_ratio: Some(0.0),
                    max_ratio: Some(0.4),
                }),
                MaximumLineLengthFilter(LenParams { min_len: Some(10.0), max_len: Some(1000.0) }),
                SpecialCharactersFilter(SpecialParams {
                    min_ratio: Some(0.0),
                    max_ratio: Some(0.25),
                }),
                TextLengthFilter(LenParams { min_len: Some(10.0), max_len: Some(100000.0) }),
                WordsNumFilter(WordsNumParams {
                    lang: "zh".into(),
                    tokenization: false,
                    min_num: Some(10.0),
                    max_num: Some(10000.0),
                }),
                WordRepetitionFilter(WordRepParams {
                    lang: "zh".into(),
                    tokenization: false,
                    rep_len: 10,
                    min_ratio: Some(0.0),
                    max_ratio: Some(0.5),
                }),
                DocumentDeduplicator(ExactDedupParams::default()),
                DocumentSimhashDeduplicator(SimhashParams::default()),
            ],
            Preset::Code => vec![
                CleanEmailMapper(RegexParams::default()),
                CleanLinksMapper(RegexParams::default()),
                FixUnicodeMapper(NoParams {}),
                PunctuationNormalizationMapper(NoParams {}),
                WhitespaceNormalizationMapper(NoParams {}),
                CleanCopyrightMapper(NoParams {}),
                AlphanumericFilter(AlnumParams {
                    tokenization: false,
                    min_ratio: Some(0.2),
                    max_ratio: Some(0.9163),
                }),
                AverageLineLengthFilter(LenParams { min_len: Some(10.0), max_len: Some(150.0) }),
                CharacterRepetitionFilter(CharRepParams {
                    rep_len: 10,
                    min_ratio: Some(0.0),
                    max_ratio: Some(0.36),
                }),
                MaximumLineLengthFilter(LenParams { min_len: Some(10.0), max_len: Some(1000.0) }),
                TextLengthFilter(LenParams { min_len: Some(10.0), max_len: Some(96714.0) }),
                WordsNumFilter(WordsNumParams {
                    lang: "en".into(),
                    tokenization: false,
                    min_num: Some(20.0),
                    max_num: Some(6640.0),
                }),
                WordRepetitionFilter(WordRepParams {
                    lang: "en".into(),
                    tokenization: false,
                    rep_len: 10,
                    min_ratio: Some(0.0),
                    max_ratio: Some(0.357),
                }),
                DocumentDeduplicator(ExactDedupParams::default()),
                DocumentSimhashDeduplicator(SimhashParams {
                    ignore_pattern: Some(r"\p{P}".into()),
                    ..SimhashParams::default()
                }),
            ],
        };
        CleanConfig { ops }
    }
}

impl CleanConfig {
    /// Parses a JSON configuration; `what` names its source in errors.
    pub fn from_json(json: &str, what: &Path) -> Result<CleanConfig> {
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| DataError::format(what, format!("invalid JSON: {e}")))?;
        if let Some(ops) = value.get("ops").and_then(|o| o.as_array()) {
            for (i, op) in ops.iter().enumerate() {
                let name = op.get("op").and_then(|n| n.as_str()).unwrap_or_default();
                if let Some((_, why)) = LEFT_OUT.iter().find(|(n, _)| *n == name) {
                    return Err(DataError::format(
                        what,
                        format!("ops[{i}]: {name} is not available: {why}"),
                    ));
                }
            }
        }
        let config: CleanConfig =
            serde_json::from_value(value).map_err(|e| DataError::format(what, e.to_string()))?;
        Ok(config)
    }

    /// Reads a JSON configuration file.
    pub fn load(path: &Path) -> Result<CleanConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// The configuration as pretty JSON (what `--print-config` shows).
    pub fn to_json(&self) -> String {
        // A tree of strings, numbers and booleans always serialises.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}
