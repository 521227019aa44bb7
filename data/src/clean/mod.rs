//! Step 2: native, parallel re-implementations of the reference's data-juicer cleaning
//! (spec §2; the definitions of every op are in `docs/data-cleaning.md`).
//!
//! A [`Pipeline`] is compiled from a [`CleanConfig`] (a built-in [`Preset`] or a JSON file):
//! mappers and filters run per document in configuration order — a document leaves at the
//! first filter that rejects it — and the de-duplicators run afterwards over the survivors in
//! input order. [`clean`] streams `{"text": …}` jsonl through it: batches of documents are
//! processed in parallel (rayon, the pool the call runs in), results are consumed in input
//! order, so the output bytes never depend on the thread count. Malformed lines are counted
//! and reported, never fatal; the output is written to a temporary file renamed at the end.
//!
//! - [`mappers`], [`html`], [`unicode`]: the text → text ops.
//! - [`filters`]: the statistics of the filters and the keep rule `min ≤ stat ≤ max`.
//! - [`dedup`]: exact (content hash) and SimHash near-duplicate removal.
//! - [`config`]: the op list format and the presets.

pub mod config;
pub mod dedup;
pub mod filters;
pub mod html;
pub mod mappers;
pub mod unicode;

pub use config::{CleanConfig, OpConfig, OpKind, Preset};

use crate::tokenize::BadLine;
use crate::{DataError, Result};
use dedup::SimhashSpec;
use rayon::prelude::*;
use std::collections::HashSet;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

type MapFn = Box<dyn Fn(&str) -> String + Send + Sync>;
type StatFn = Box<dyn Fn(&str) -> f64 + Send + Sync>;

enum StepKind {
    Map(MapFn),
    Filter { stat: StatFn, min: Option<f64>, max: Option<f64> },
}

struct Step {
    name: &'static str,
    kind: StepKind,
}

struct ExactDedup {
    op: usize,
    lowercase: bool,
    ignore_non_character: bool,
}

struct NearDedup {
    op: usize,
    spec: SimhashSpec,
    num_blocks: usize,
    hamming_distance: u32,
}

/// A compiled configuration.
pub struct Pipeline {
    config: CleanConfig,
    steps: Vec<Step>,
    exact: Option<ExactDedup>,
    near: Option<NearDedup>,
}

/// What the per-document ops did to one document.
#[derive(Clone, Debug, PartialEq)]
pub struct DocOutcome {
    /// The text after the mappers that ran.
    pub text: String,
    /// Index (in the configuration) of the filter that removed the document.
    pub removed_by: Option<usize>,
    /// Indices of the mappers that changed the text.
    pub changed_by: Vec<usize>,
}

fn filter(name: &'static str, stat: StatFn, min: Option<f64>, max: Option<f64>) -> Step {
    Step { name, kind: StepKind::Filter { stat, min, max } }
}

fn mapper(name: &'static str, f: MapFn) -> Step {
    Step { name, kind: StepKind::Map(f) }
}

fn no_tokenization(name: &str, tokenization: bool) -> Result<()> {
    if tokenization {
        return Err(DataError::Invalid(format!(
            "{name} with tokenization = true needs a HuggingFace tokenizer (data-juicer uses \
             EleutherAI/pythia-6.9b-deduped) and is not available; use tokenization = false"
        )));
    }
    Ok(())
}

/// The n-gram length of a repetition filter, which must be at least 1.
fn rep_len(name: &str, n: usize) -> Result<usize> {
    if n == 0 {
        return Err(DataError::Invalid(format!("{name}: rep_len must be at least 1")));
    }
    Ok(n)
}

impl Pipeline {
    /// Compiles `config`: regexes, the OpenCC dictionaries, parameter checks. De-duplicators
    /// must come after every mapper and filter, at most one of each kind.
    pub fn new(config: &CleanConfig) -> Result<Pipeline> {
        use OpConfig::*;
        let mut steps = Vec::new();
        let mut exact = None;
        let mut near: Option<NearDedup> = None;
        for (i, op) in config.ops.iter().enumerate() {
            let name = op.name();
            if op.kind() != OpKind::Deduplicator && (exact.is_some() || near.is_some()) {
                return Err(DataError::Invalid(format!(
                    "{name} comes after a deduplicator; deduplicators must be the last ops"
                )));
            }
            let step = match op {
                ChineseConvertMapper(p) => {
                    if p.mode != "t2s" {
                        return Err(DataError::Invalid(format!(
                            "chinese_convert_mapper: mode {:?} is not available (only t2s)",
                            p.mode
                        )));
                    }
                    let t2s = mappers::T2s::shared()?;
                    mapper(name, Box::new(move |t| t2s.convert(t)))
                }
                CleanEmailMapper(p) | CleanIpMapper(p) | CleanLinksMapper(p) => {
                    let default = match op {
                        CleanEmailMapper(_) => mappers::EMAIL_PATTERN,
                        CleanIpMapper(_) => mappers::IP_PATTERN,
                        _ => mappers::LINKS_PATTERN,
                    };
                    let is_links = matches!(op, CleanLinksMapper(_));
                    let builtin = p.pattern.is_none();
                    let c = mappers::RegexCleaner::new(
                        p.pattern.as_deref().unwrap_or(default),
                        &p.repl,
                        name,
                    )?;
                    mapper(
                        name,
                        Box::new(move |t| {
                            if is_links && builtin && !t.contains([':', '/', '.']) {
                                t.to_string()
                            } else {
                                c.apply(t)
                            }
                        }),
                    )
                }
                CleanHtmlMapper(_) => mapper(name, Box::new(html::clean_html)),
                CleanCopyrightMapper(_) => mapper(name, Box::new(mappers::clean_copyright)),
                ExpandMacroMapper(_) => mapper(name, Box::new(mappers::expand_macro)),
                FixUnicodeMapper(_) => mapper(name, Box::new(unicode::fix_unicode)),
                PunctuationNormalizationMapper(_) => {
                    mapper(name, Box::new(mappers::punctuation_normalization))
                }
                RemoveRepeatSentencesMapper(p) => {
                    let p = p.clone();
                    mapper(
                        name,
                        Box::new(move |t| {
                            mappers::remove_repeat_sentences(
                                t,
                                p.lowercase,
                                p.ignore_special_character,
                                p.min_repeat_sentence_length,
                            )
                        }),
                    )
                }
                RemoveSpecificCharsMapper(p) => {
                    let chars: Vec<char> = p.chars_to_remove.chars().collect();
                    mapper(name, Box::new(move |t| mappers::remove_specific_chars(t, &chars)))
                }
                WhitespaceNormalizationMapper(_) => {
                    mapper(name, Box::new(mappers::whitespace_normalization))
                }
                AlphanumericFilter(p) => {
                    no_tokenization(name, p.tokenization)?;
                    filter(name, Box::new(filters::alnum_ratio), p.min_ratio, p.max_ratio)
                }
                AverageLineLengthFilter(p) => {
                    filter(name, Box::new(filters::average_line_length), p.min_len, p.max_len)
                }
                CharacterRepetitionFilter(p) => {
                    let n = rep_len(name, p.rep_len)?;
                    filter(
                        name,
                        Box::new(move |t| filters::character_repetition_ratio(t, n)),
                        p.min_ratio,
                        p.max_ratio,
                    )
                }
                MaximumLineLengthFilter(p) => filter(
                    name,
                    Box::new(|t| filters::maximum_line_length(t) as f64),
                    p.min_len,
                    p.max_len,
                ),
                SpecialCharactersFilter(p) => filter(
                    name,
                    Box::new(filters::special_characters_ratio),
                    p.min_ratio,
                    p.max_ratio,
                ),
                TextLengthFilter(p) => {
                    filter(name, Box::new(|t| filters::text_length(t) as f64), p.min_len, p.max_len)
                }
                WordsNumFilter(p) => {
                    no_tokenization(name, p.tokenization)?;
                    filter(name, Box::new(|t| filters::words_num(t) as f64), p.min_num, p.max_num)
                }
                WordRepetitionFilter(p) => {
                    no_tokenization(name, p.tokenization)?;
                    let n = rep_len(name, p.rep_len)?;
                    filter(
                        name,
                        Box::new(move |t| filters::word_repetition_ratio(t, n)),
                        p.min_ratio,
                        p.max_ratio,
                    )
                }
                DocumentDeduplicator(p) => {
                    if exact.is_some() || near.is_some() {
                        return Err(DataError::Invalid(
                            "document_deduplicator must come once, before document_simhash_deduplicator".into(),
                        ));
                    }
                    exact = Some(ExactDedup {
                        op: i,
                        lowercase: p.lowercase,
                        ignore_non_character: p.ignore_non_character,
                    });
                    continue;
                }
                DocumentSimhashDeduplicator(p) => {
                    if near.is_some() {
                        return Err(DataError::Invalid(
                            "document_simhash_deduplicator may come only once".into(),
                        ));
                    }
                    dedup::check_banding(p.num_blocks, p.hamming_distance)?;
                    let spec = SimhashSpec::new(
                        p.tokenization,
                        p.window_size,
                        p.lowercase,
                        p.ignore_pattern.as_deref(),
                    )?;
                    near = Some(NearDedup {
                        op: i,
                        spec,
                        num_blocks: p.num_blocks,
                        hamming_distance: p.hamming_distance,
                    });
                    continue;
                }
            };
            steps.push(step);
        }
        Ok(Pipeline { config: config.clone(), steps, exact, near })
    }

    /// The configuration this pipeline was compiled from.
    pub fn config(&self) -> &CleanConfig {
        &self.config
    }

    /// Runs the mappers and filters on one document.
    pub fn process(&self, text: &str) -> DocOutcome {
        let mut text = text.to_string();
        let mut changed_by = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            match &step.kind {
                StepKind::Map(f) => {
                    let t = f(&text);
                    if t != text {
                        changed_by.push(i);
                        text = t;
                    }
                }
                StepKind::Filter { stat, min, max } => {
                    if !filters::in_range(stat(&text), *min, *max) {
                        return DocOutcome { text, removed_by: Some(i), changed_by };
                    }
                }
            }
        }
        DocOutcome { text, removed_by: None, changed_by }
    }

    /// The statistic of every filter on `text` (name, value, kept), for inspection.
    pub fn filter_stats(&self, text: &str) -> Vec<(&'static str, f64, bool)> {
        self.steps
            .iter()
            .filter_map(|s| match &s.kind {
                StepKind::Filter { stat, min, max } => {
                    let v = stat(text);
                    Some((s.name, v, filters::in_range(v, *min, *max)))
                }
                StepKind::Map(_) => None,
            })
            .collect()
    }
}

/// One op's line of the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpReport {
    pub op: String,
    pub kind: OpKind,
    /// Documents whose text a mapper changed.
    pub changed: u64,
    /// Documents a filter or deduplicator removed.
    pub removed: u64,
}

/// What a clean run did. `documents = kept + Σ removed`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CleanReport {
    pub input_files: usize,
    /// Well-formed documents read.
    pub documents: u64,
    pub malformed: u64,
    /// The first malformed lines (at most 20).
    pub malformed_lines: Vec<BadLine>,
    /// Documents written.
    pub kept: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// One entry per op, in configuration order.
    pub ops: Vec<OpReport>,
}

impl CleanReport {
    /// Documents removed by all filters and deduplicators together.
    pub fn removed(&self) -> u64 {
        self.ops.iter().map(|o| o.removed).sum()
    }

    /// The per-op table printed by `steel-data clean`.
    pub fn table(&self) -> String {
        let w = self.ops.iter().map(|o| o.op.len()).max().unwrap_or(2).max(2);
        let mut s =
            format!("  {:<w$}  {:<12}  {:>10}  {:>10}\n", "op", "kind", "changed", "removed");
        for o in &self.ops {
            let kind = match o.kind {
                OpKind::Mapper => "mapper",
                OpKind::Filter => "filter",
                OpKind::Deduplicator => "deduplicator",
            };
            let changed = if o.kind == OpKind::Mapper { o.changed.to_string() } else { "-".into() };
            let removed = if o.kind == OpKind::Mapper { "-".into() } else { o.removed.to_string() };
            s += &format!("  {:<w$}  {kind:<12}  {changed:>10}  {removed:>10}\n", o.op);
        }
        s += &format!(
            "  {:<w$}  {:<12}  {:>10}  {:>10}\n",
            "documents in / kept", "", self.documents, self.kept
        );
        s
    }
}

/// Progress, reported after every batch.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub documents: u64,
    pub kept: u64,
    pub bytes_read: u64,
}

/// Options of a run.
#[derive(Clone, Debug)]
pub struct CleanOptions {
    /// Documents processed per parallel batch.
    pub batch_docs: usize,
    /// Bytes of input per parallel batch (whichever limit comes first).
    pub batch_bytes: usize,
}

impl Default for CleanOptions {
    fn default() -> Self {
        CleanOptions { batch_docs: 4096, batch_bytes: 32 << 20 }
    }
}

/// A file path with `suffix` appended to its name (the temporary files beside the output).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// Per-document result of a batch: the outcome and the dedup keys of kept documents.
struct Processed {
    outcome: DocOutcome,
    exact: Option<[u8; 16]>,
    simhash: u64,
    /// The output line of a document the filters kept.
    line: Vec<u8>,
}

/// One non-blank input line waiting in a batch.
struct RawLine {
    file: usize,
    line: u64,
    bytes: Vec<u8>,
}

/// The temporary files of a run, removed on drop unless renamed.
struct TempFiles(Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Cleans the `{"text": …}` jsonl `inputs` (files, or directories searched for `*.jsonl` /
/// `*.json`) into `output` (one `{"text": …}` line per kept document, input order). Runs in
/// the current rayon pool.
pub fn clean(
    pipeline: &Pipeline,
    inputs: &[PathBuf],
    output: &Path,
    opts: &CleanOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<CleanReport> {
    let files = crate::tokenize::input_files(inputs)?;
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    }
    let final_tmp = with_suffix(output, ".tmp");
    let stage =
        if pipeline.near.is_some() { with_suffix(output, ".stage.tmp") } else { final_tmp.clone() };
    let mut temps = TempFiles(vec![final_tmp.clone(), stage.clone()]);

    let mut report = CleanReport {
        input_files: files.len(),
        ops: pipeline
            .config
            .ops
            .iter()
            .map(|o| OpReport { op: o.name().to_string(), kind: o.kind(), changed: 0, removed: 0 })
            .collect(),
        ..CleanReport::default()
    };
    // Step index → configuration index (the dedup ops have no step).
    let step_op: Vec<usize> = pipeline
        .config
        .ops
        .iter()
        .enumerate()
        .filter(|(_, o)| o.kind() != OpKind::Deduplicator)
        .map(|(i, _)| i)
        .collect();

    let f = std::fs::File::create(&stage).map_err(|e| DataError::io(&stage, e))?;
    let mut writer = BufWriter::with_capacity(1 << 20, f);
    let mut seen: HashSet<[u8; 16]> = HashSet::new();
    let mut simhashes: Vec<u64> = Vec::new();
    let mut staged_bytes = 0u64;
    let mut batch: Vec<RawLine> = Vec::with_capacity(opts.batch_docs);
    let mut batch_bytes = 0usize;

    // Parsing and all per-document work run in parallel; the results are consumed in order.
    let mut flush = |batch: &mut Vec<RawLine>,
                     report: &mut CleanReport,
                     writer: &mut BufWriter<std::fs::File>|
     -> Result<()> {
        let results: Vec<std::result::Result<Processed, String>> = batch
            .par_iter()
            .map(|raw| {
                let text = crate::text_of_jsonl_line(&raw.bytes)?;
                let outcome = pipeline.process(&text);
                let kept = outcome.removed_by.is_none();
                let exact = match (&pipeline.exact, kept) {
                    (Some(e), true) => {
                        Some(dedup::exact_key(&outcome.text, e.lowercase, e.ignore_non_character))
                    }
                    _ => None,
                };
                let simhash = match (&pipeline.near, kept) {
                    (Some(n), true) => n.spec.simhash(&outcome.text),
                    _ => 0,
                };
                let line =
                    if kept { crate::convert::text::json_line(&outcome.text) } else { Vec::new() };
                Ok(Processed { outcome, exact, simhash, line })
            })
            .collect();
        for (raw, r) in batch.iter().zip(results) {
            let r = match r {
                Ok(r) => r,
                Err(reason) => {
                    report.malformed += 1;
                    if report.malformed_lines.len() < 20 {
                        report.malformed_lines.push(BadLine {
                            file: files[raw.file].clone(),
                            line: raw.line,
                            reason,
                        });
                    }
                    continue;
                }
            };
            report.documents += 1;
            for &s in &r.outcome.changed_by {
                report.ops[step_op[s]].changed += 1;
            }
            if let Some(s) = r.outcome.removed_by {
                report.ops[step_op[s]].removed += 1;
                continue;
            }
            if let (Some(e), Some(key)) = (&pipeline.exact, r.exact) {
                if !seen.insert(key) {
                    report.ops[e.op].removed += 1;
                    continue;
                }
            }
            writer.write_all(&r.line).map_err(|e| DataError::io(&stage, e))?;
            staged_bytes += r.line.len() as u64;
            if pipeline.near.is_some() {
                simhashes.push(r.simhash);
            }
            report.kept += 1;
        }
        batch.clear();
        Ok(())
    };

    for (fi, file) in files.iter().enumerate() {
        let fh = std::fs::File::open(file).map_err(|e| DataError::io(file, e))?;
        let reader = std::io::BufReader::with_capacity(1 << 20, fh);
        for (i, line) in reader.split(b'\n').enumerate() {
            let mut line = line.map_err(|e| DataError::io(file, e))?;
            report.bytes_read += line.len() as u64 + 1;
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            batch_bytes += line.len();
            batch.push(RawLine { file: fi, line: i as u64 + 1, bytes: line });
            if batch.len() >= opts.batch_docs.max(1) || batch_bytes >= opts.batch_bytes {
                flush(&mut batch, &mut report, &mut writer)?;
                batch_bytes = 0;
                progress(Progress {
                    documents: report.documents,
                    kept: report.kept,
                    bytes_read: report.bytes_read,
                });
            }
        }
    }
    if !batch.is_empty() {
        flush(&mut batch, &mut report, &mut writer)?;
        progress(Progress {
            documents: report.documents,
            kept: report.kept,
            bytes_read: report.bytes_read,
        });
    }
    writer
        .into_inner()
        .map_err(|e| DataError::io(&stage, e.into_error()))?
        .sync_all()
        .map_err(|e| DataError::io(&stage, e))?;
    report.bytes_written = staged_bytes;

    if let Some(near) = &pipeline.near {
        let dups = dedup::near_duplicates(&simhashes, near.num_blocks, near.hamming_distance)?;
        let removed = dups.iter().filter(|&&d| d).count() as u64;
        report.ops[near.op].removed = removed;
        report.kept -= removed;
        let src = std::io::BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(&stage).map_err(|e| DataError::io(&stage, e))?,
        );
        let dst = std::fs::File::create(&final_tmp).map_err(|e| DataError::io(&final_tmp, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, dst);
        let mut written = 0u64;
        let mut n = 0usize;
        for line in src.split(b'\n') {
            let mut line = line.map_err(|e| DataError::io(&stage, e))?;
            let dup = *dups
                .get(n)
                .ok_or_else(|| DataError::format(&stage, "more lines than documents staged"))?;
            n += 1;
            if !dup {
                line.push(b'\n');
                out.write_all(&line).map_err(|e| DataError::io(&final_tmp, e))?;
                written += line.len() as u64;
            }
        }
        if n != dups.len() {
            return Err(DataError::format(
                &stage,
                format!("{n} lines staged, {} documents expected", dups.len()),
            ));
        }
        out.into_inner()
            .map_err(|e| DataError::io(&final_tmp, e.into_error()))?
            .sync_all()
            .map_err(|e| DataError::io(&final_tmp, e))?;
        report.bytes_written = written;
    }
    std::fs::rename(&final_tmp, output).map_err(|e| DataError::io(output, e))?;
    temps.0.retain(|p| p != &final_tmp);
    Ok(report)
}
