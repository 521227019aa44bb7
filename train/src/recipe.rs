//! Training recipes: TOML files in `configs/`, every field overridable (`--set key=value`).
//!
//! Four tables: `[model]` (the HF config.json, by path or inline, and the init seed), `[data]`
//! (shard directories with mixture weights, held-out directories, or plain text files tokenized
//! at start; the tokenizer), `[optim]` (AdamW, clipping, the schedule in optimizer steps) and
//! `[train]` (batch shape, cadences, device, ranks). Unknown keys are errors that name the key,
//! so a typo never silently falls back to a default. Relative paths are relative to the recipe
//! file.

use crate::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The demo recipe (`configs/demo.toml`), embedded so `steel-train` without arguments runs it
/// from any directory.
pub const DEMO_RECIPE: &str = include_str!("../../configs/demo.toml");

/// The demo's text, written for Steel (English and Chinese prose), embedded likewise.
pub const DEMO_CORPUS: &str = include_str!("../demo/corpus.txt");

/// A training recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub optim: OptimSection,
    pub train: TrainSection,
}

/// Where the model config comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ConfigSource {
    /// A path to a HF `config.json`.
    Path(PathBuf),
    /// The config's keys inline (a TOML table).
    Inline(serde_json::Map<String, serde_json::Value>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The model config; may be omitted with `init_from` (its config.json is used).
    #[serde(default)]
    pub config: Option<ConfigSource>,
    /// Start from these weights (a HF directory or a checkpoint) instead of a fresh init, e.g.
    /// a pretrained model for fine-tuning.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Seed of the parameter initialisation.
    #[serde(default = "default_seed")]
    pub init_seed: u64,
}

/// One training data directory and its mixture weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataDir {
    pub path: PathBuf,
    #[serde(default = "default_weight")]
    pub weight: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Directories of packed `.bin` shards (searched recursively).
    #[serde(default)]
    pub train: Vec<DataDir>,
    /// Held-out shard directories for validation.
    #[serde(default)]
    pub val: Vec<PathBuf>,
    /// Use the embedded demo text (tokenized at start into `<out>/data`).
    #[serde(default)]
    pub demo_corpus: bool,
    /// Plain text files (documents separated by blank lines), tokenized at start into
    /// `<out>/data`.
    #[serde(default)]
    pub text: Vec<PathBuf>,
    /// Fine-tuning chat data (jsonl: Alpaca instruction/input/output or ShareGPT conversations),
    /// one example per sequence, loss on the assistant turns only; cut after `seq_len` tokens.
    #[serde(default)]
    pub sft: Vec<PathBuf>,
    /// The system message of fine-tuning examples that have none.
    #[serde(default = "default_system")]
    pub system: String,
    /// With `text`/`demo_corpus`: every n-th document is held out for validation (0: none).
    #[serde(default)]
    pub holdout_every: usize,
    /// A tokenizer directory (tokenizer.json, tokenizer_config.json); without one, text input
    /// gets a byte-level BPE learned from it.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of the learned BPE.
    #[serde(default = "default_bpe_vocab")]
    pub bpe_vocab: usize,
    /// Tokens per training sequence (blocks are seq_len + 1); for fine-tuning, the cut of each
    /// example (default 768, the reference's cutoff_len).
    #[serde(default)]
    pub seq_len: usize,
    /// Targets equal to this id are not counted (default: the tokenizer's `<|endoftext|>`, or
    /// 151643 for shard directories without a tokenizer).
    #[serde(default)]
    pub ignore_index: Option<i64>,
    /// Seed of the data order.
    #[serde(default = "default_seed")]
    pub seed: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    /// The optimizer step at which the cosine reaches min_lr (0: the last step).
    pub decay_steps: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Global-norm clipping threshold (0: off).
    pub clip: f64,
}

impl Default for OptimSection {
    fn default() -> Self {
        OptimSection {
            lr: 3e-4,
            min_lr: 0.0,
            warmup_steps: 1000,
            decay_steps: 1_080_000,
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            clip: 1.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Sequences per micro-batch per rank.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "default_one")]
    pub grad_accum: usize,
    /// Optimizer steps to train (the run ends there); with `epochs`, computed from the data,
    /// and a nonzero max_steps stops the run there if that is earlier.
    #[serde(default)]
    pub max_steps: u64,
    /// Fine-tuning: passes over the examples (sets max_steps).
    #[serde(default)]
    pub epochs: Option<f64>,
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Validation cadence in steps (0: never).
    #[serde(default)]
    pub eval_every: u64,
    /// Micro-batches per validation.
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// `bf16-mixed` (GPU) or `fp32`; the CPU always computes in f32.
    #[serde(default = "default_precision")]
    pub precision: String,
    /// `auto`, `cpu` or `cuda`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Data-parallel ranks (worker threads on the CPU).
    #[serde(default = "default_one")]
    pub ranks: usize,
    /// Tokens per chunk of the fused lm_head + cross entropy.
    #[serde(default = "default_chunk")]
    pub chunk_tokens: usize,
    /// Device peak in TFLOP/s for MFU (default: from the device table or a CPU estimate).
    #[serde(default)]
    pub peak_tflops: Option<f64>,
}

fn default_seed() -> u64 {
    3407
}
fn default_system() -> String {
    "You are a helpful assistant.".into()
}
fn default_weight() -> f64 {
    1.0
}
fn default_bpe_vocab() -> usize {
    1024
}
fn default_one() -> usize {
    1
}
fn default_log_every() -> u64 {
    10
}
fn default_checkpoint_every() -> u64 {
    1000
}
fn default_eval_batches() -> usize {
    100
}
fn default_keep() -> usize {
    3
}
fn default_precision() -> String {
    "bf16-mixed".into()
}
fn default_device() -> String {
    "auto".into()
}
fn default_chunk() -> usize {
    1024
}

fn invalid(msg: impl Into<String>) -> TrainError {
    TrainError::Invalid(msg.into())
}

/// Parses `value` of `--set key=value` as a TOML value (number, bool, array, inline table,
/// quoted string); anything else is taken as a bare string.
fn parse_value(value: &str) -> toml::Value {
    let doc = format!("v = {value}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(value.into())),
        Err(_) => toml::Value::String(value.into()),
    }
}

/// Sets the dotted `key` (e.g. `optim.lr`) of `table` to `value`.
fn set_key(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(invalid(format!("--set: {key:?} is not a dotted key like optim.lr")));
    }
    let mut t = table;
    for p in &parts[..parts.len() - 1] {
        let entry =
            t.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| invalid(format!("--set {key}: {p} is not a table")))?;
    }
    t.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// The `table.key` whose value keeps `table` from being a recipe (serde's type errors do not
/// name their key): the first one whose removal lets it deserialize or moves the error on (to
/// anything but that key now missing).
fn culprit_key(table: &toml::Table) -> Option<String> {
    let err = |t: &toml::Table| toml::Value::Table(t.clone()).try_into::<Recipe>().err();
    let base = err(table)?.message().to_string();
    for (sec, v) in table {
        let Some(inner) = v.as_table() else { continue };
        for k in inner.keys() {
            let mut t = table.clone();
            if let Some(toml::Value::Table(s)) = t.get_mut(sec) {
                s.remove(k);
            }
            // Removing a required key only proves that it is required.
            let just_missing = |m: &str| m.contains(&format!("missing field `{k}`"));
            if err(&t).is_none_or(|e| e.message() != base && !just_missing(e.message())) {
                return Some(format!("{sec}.{k}"));
            }
        }
    }
    None
}

/// Whether an override of `key` sets (part of) `field`: the same key, a table above it
/// (`data` for `data.train`) or a key inside it.
fn overlaps(key: &str, field: &str) -> bool {
    key == field
        || field.strip_prefix(key).is_some_and(|rest| rest.starts_with('.'))
        || key.strip_prefix(field).is_some_and(|rest| rest.starts_with('.'))
}

impl Recipe {
    /// Parses recipe text with overrides applied (`key=value` pairs). Relative paths written in
    /// the text are resolved against `base` (the recipe's folder); relative paths given in an
    /// override stay relative to the current directory. `origin` names the text in errors.
    pub fn parse(text: &str, origin: &str, base: &Path, overrides: &[String]) -> Result<Recipe> {
        let base_table: toml::Table =
            text.parse().map_err(|e: toml::de::Error| invalid(format!("{origin}: {e}")))?;
        let mut table = base_table.clone();
        for o in overrides {
            let (k, v) = o
                .split_once('=')
                .ok_or_else(|| invalid(format!("--set {o:?}: expected key=value")))?;
            set_key(&mut table, k.trim(), parse_value(v.trim()))?;
        }
        let mut r: Recipe =
            toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
                // Blame the first override that breaks a recipe the file alone makes (the type
                // error itself does not name its key).
                let mut t = base_table.clone();
                let culprit = overrides.iter().find(|o| {
                    let Some((k, v)) = o.split_once('=') else { return false };
                    if set_key(&mut t, k.trim(), parse_value(v.trim())).is_err() {
                        return true;
                    }
                    toml::Value::Table(t.clone()).try_into::<Recipe>().is_err()
                });
                match culprit {
                    Some(o)
                        if toml::Value::Table(base_table.clone()).try_into::<Recipe>().is_ok() =>
                    {
                        invalid(format!("--set {o} (or the flag that sets it): {}", e.message()))
                    }
                    _ => {
                        // From the text, the error carries its line, column and snippet.
                        let located = toml::from_str::<Recipe>(text)
                            .err()
                            .map_or_else(|| e.message().to_string(), |t| t.to_string());
                        match culprit_key(&base_table) {
                            Some(key) => invalid(format!("{origin}: {key}: {located}")),
                            None => invalid(format!("{origin}: {located}")),
                        }
                    }
                }
            })?;
        // Paths written in the file are relative to the file; paths given on the command line
        // (`--set`, or a flag that sets one) to the current directory, as a shell user expects.
        let keys: Vec<&str> =
            overrides.iter().filter_map(|o| o.split_once('=')).map(|(k, _)| k.trim()).collect();
        r.resolve_paths(base, |field| !keys.iter().any(|k| overlaps(k, field)));
        if r.data.seq_len == 0 && !r.data.sft.is_empty() {
            r.data.seq_len = 768;
        }
        r.validate().map_err(|e| {
            // A bad value that came from the command line is blamed on it, not on the file.
            let from_flag = overrides
                .iter()
                .rev()
                .find(|o| o.split_once('=').is_some_and(|(k, _)| e.contains(k.trim())));
            match from_flag {
                Some(o) => invalid(format!("--set {o} (or the flag that sets it): {e}")),
                None => invalid(format!("{origin}: {e}")),
            }
        })?;
        Ok(r)
    }

    /// Loads a recipe file with overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Recipe::parse(&text, &path.display().to_string(), base, overrides)
    }

    /// The embedded demo recipe with overrides.
    pub fn demo(overrides: &[String]) -> Result<Recipe> {
        Recipe::parse(DEMO_RECIPE, "configs/demo.toml (embedded)", Path::new("."), overrides)
    }

    /// Resolves the relative paths of the fields `from_file` says came from the recipe file
    /// against `base` (its folder); the others stay relative to the current directory.
    fn resolve_paths(&mut self, base: &Path, from_file: impl Fn(&str) -> bool) {
        let abs = |field: &str, p: &mut PathBuf| {
            if p.is_relative() && from_file(field) {
                *p = base.join(&*p);
            }
        };
        if let Some(ConfigSource::Path(p)) = &mut self.model.config {
            abs("model.config", p);
        }
        if let Some(p) = &mut self.model.init_from {
            abs("model.init_from", p);
        }
        self.data.sft.iter_mut().for_each(|p| abs("data.sft", p));
        self.data.train.iter_mut().for_each(|d| abs("data.train", &mut d.path));
        self.data.val.iter_mut().for_each(|p| abs("data.val", p));
        self.data.text.iter_mut().for_each(|p| abs("data.text", p));
        if let Some(t) = &mut self.data.tokenizer {
            abs("data.tokenizer", t);
        }
    }

    /// Checks values a run cannot start with; the message names the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let d = &self.data;
        let sources = usize::from(!d.train.is_empty())
            + usize::from(d.demo_corpus)
            + usize::from(!d.text.is_empty())
            + usize::from(!d.sft.is_empty());
        if sources != 1 {
            return Err(
                "exactly one of data.train, data.text, data.sft and data.demo_corpus must be given"
                    .into(),
            );
        }
        if self.model.config.is_none() && self.model.init_from.is_none() {
            return Err("model.config or model.init_from must be given".into());
        }
        if self.train.epochs.is_some() && d.sft.is_empty() {
            return Err(
                "train.epochs applies to fine-tuning data (data.sft); use train.max_steps".into()
            );
        }
        if let Some(e) = self.train.epochs {
            if e.is_nan() || e <= 0.0 {
                return Err(format!("train.epochs must be positive, got {e}"));
            }
        } else if self.train.max_steps == 0 {
            return Err("train.max_steps must be at least 1".into());
        }
        if d.seq_len == 0 {
            return Err("data.seq_len must be at least 1".into());
        }
        let t = &self.train;
        for (k, v) in [
            ("train.micro_batch", t.micro_batch),
            ("train.grad_accum", t.grad_accum),
            ("train.ranks", t.ranks),
            ("train.chunk_tokens", t.chunk_tokens),
        ] {
            if v == 0 {
                return Err(format!("{k} must be at least 1"));
            }
        }
        if t.log_every == 0 || t.checkpoint_every == 0 {
            return Err("train.log_every and train.checkpoint_every must be at least 1".into());
        }
        if !matches!(t.precision.as_str(), "bf16-mixed" | "fp32") {
            return Err(format!(
                "train.precision must be bf16-mixed or fp32, got {:?}",
                t.precision
            ));
        }
        t.device
            .parse::<steel_runtime::DeviceRequest>()
            .map_err(|e| format!("train.device: {e}"))?;
        let o = &self.optim;
        if !(o.lr.is_finite() && o.lr >= 0.0 && o.min_lr >= 0.0 && o.min_lr <= o.lr) {
            return Err(format!("optim: need 0 ≤ min_lr ({}) ≤ lr ({})", o.min_lr, o.lr));
        }
        if o.decay_steps != 0 && o.decay_steps < o.warmup_steps {
            return Err(format!(
                "optim.decay_steps ({}) must not be fewer than optim.warmup_steps ({})",
                o.decay_steps, o.warmup_steps
            ));
        }
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) {
            return Err("optim.beta1 and optim.beta2 must be in [0, 1)".into());
        }
        if o.clip.is_nan()
            || o.clip < 0.0
            || o.eps.is_nan()
            || o.eps <= 0.0
            || o.weight_decay.is_nan()
            || o.weight_decay < 0.0
        {
            return Err("optim.clip and optim.weight_decay must be ≥ 0 and optim.eps > 0".into());
        }
        if let Some(p) = t.peak_tflops {
            if p.is_nan() || p <= 0.0 {
                return Err(format!("train.peak_tflops must be positive, got {p}"));
            }
        }
        Ok(())
    }

    /// The recipe as TOML (saved into every checkpoint).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| invalid(format!("recipe: {e}")))
    }

    /// Sequences per optimizer step across all ranks.
    pub fn global_batch(&self) -> usize {
        self.train.micro_batch * self.train.grad_accum * self.train.ranks
    }

    /// Tokens per optimizer step across all ranks.
    pub fn tokens_per_step(&self) -> usize {
        self.global_batch() * self.data.seq_len
    }
}
