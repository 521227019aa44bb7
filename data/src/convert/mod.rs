//! Step 1: every raw source to `{"text": …}` jsonl (spec §1; WanJuan's text as §3.1).
//!
//! [`convert`] reads the input files of one [`Source`] in sorted order (the engine is `run`,
//! Parquet columns come from `parquet`), turns each record into a text ([`sources`], with the
//! transforms of [`text`]), and writes one `{"text": "…"}` line per kept record,
//! byte-compatible with the reference's `json.dumps(…, ensure_ascii=False)`.
//!
//! Conventions:
//! - A record is a jsonl line, an element of a wiki_cn file's array, or a Parquet row. Blank
//!   lines are not records; a UTF-8 byte-order mark is ignored. Every record read is either written, dropped for a named reason,
//!   or malformed: `read = written + Σ dropped + malformed`.
//! - Malformed (not valid UTF-8 or JSON, not an object, a used field missing or of the wrong
//!   type) is counted with its position — the 1-based line of a jsonl file, element of a
//!   wiki_cn array, or row of a Parquet file — and the run goes on. The reference aborted the
//!   rest of the file instead (spec §1.1).
//! - What stops a run (an error): an input that does not exist or holds no input file, a file
//!   that cannot be read or is not of its format as a whole (not Parquet, not a JSON array),
//!   an output that cannot be written.
//! - Records are converted in parallel batches and written in input order, so the output
//!   depends only on the input. It is written to a hidden temporary file next to the output
//!   and renamed into place at the end: an output file is always complete.

mod parquet;
mod run;
pub mod sources;
pub mod text;

use self::parquet::Row;
use self::sources::Outcome;
use crate::{DataError, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Malformed records listed per input file in [`Summary::malformed_lines`] (all are counted).
pub const MALFORMED_SHOWN_PER_FILE: usize = 5;

/// A raw source of spec §1.4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    BaiduBaike,
    BaiduQa,
    Belle2m,
    Belle3_5m,
    Firefly,
    Moss,
    Zhihu,
    WikiCn,
    Starcode,
    Wanjuan,
    Skypile,
}

type ObjectFn = fn(&Map<String, Value>) -> std::result::Result<Outcome, String>;
type RowFn = fn(&Row) -> std::result::Result<Outcome, String>;

/// How a source's files are laid out.
enum Layout {
    /// One JSON object per line.
    JsonLines(ObjectFn),
    /// One JSON array of objects per file.
    JsonArray(ObjectFn),
    /// Parquet with these string columns.
    Parquet(&'static [&'static str], RowFn),
}

impl Source {
    pub const ALL: [Source; 11] = [
        Source::BaiduBaike,
        Source::BaiduQa,
        Source::Belle2m,
        Source::Belle3_5m,
        Source::Firefly,
        Source::Moss,
        Source::Zhihu,
        Source::WikiCn,
        Source::Starcode,
        Source::Wanjuan,
        Source::Skypile,
    ];

    /// The name `--source` takes.
    pub fn name(self) -> &'static str {
        match self {
            Source::BaiduBaike => "baidu_baike",
            Source::BaiduQa => "baidu_qa",
            Source::Belle2m => "belle_2m",
            Source::Belle3_5m => "belle_3_5m",
            Source::Firefly => "firefly",
            Source::Moss => "moss",
            Source::Zhihu => "zhihu",
            Source::WikiCn => "wiki_cn",
            Source::Starcode => "starcode",
            Source::Wanjuan => "wanjuan",
            Source::Skypile => "skypile",
        }
    }

    /// One line on the input and the conversion (for `--help`).
    pub fn describe(self) -> &'static str {
        match self {
            Source::BaiduBaike => {
                "jsonl {title, summary, sections[{title, content}]} → \"title：summary\" + \
                 \"title：content\" per section; NFKC; drops empty/null title or summary, < 20 chars"
            }
            Source::BaiduQa => {
                "jsonl {title, answer} → single-turn ChatML (desc unused); NFKC; drops < 20 chars"
            }
            Source::Belle2m => {
                "jsonl {instruction, output} → \"instruction⏎output\"; NFKC; drops lines without \
                 instruction, < 20 chars"
            }
            Source::Belle3_5m => {
                "jsonl {conversations[{from, value}]} → multi-turn ChatML (human on even, assistant \
                 on odd turns); NFKC; drops lines without conversations or any complete pair"
            }
            Source::Firefly => {
                "jsonl {input, target} → single-turn ChatML (kind unused); NFKC; drops < 20 chars"
            }
            Source::Moss => {
                "jsonl {conversation[{human, assistant}]} → multi-turn ChatML; NFKC; drops records \
                 without turns"
            }
            Source::Zhihu => {
                "parquet (INSTRUCTION, RESPONSE, METADATA) → single-turn ChatML; NFKC; keeps \
                 answers with ≥ 100 upvotes (\"赞同 1.2 万\" = 12000), drops unparsable counts"
            }
            Source::WikiCn => {
                "one JSON array [{completion}] per file → completion; NFKC; drops < 20 chars"
            }
            Source::Starcode => {
                "parquet (content) in cpp/, java/, python/ subfolders → content, raw (no NFKC, no \
                 \\r removal, no length gate)"
            }
            Source::Wanjuan => {
                "jsonl {content} or exam {q_main, option_a..e, std_ans, answer_detail} → content, or \
                 the exam fields concatenated with 标准答案：/解析：; unchanged"
            }
            Source::Skypile => "jsonl {text} → text, unchanged",
        }
    }

    /// Whether the source's files are Parquet (the others are JSON lines or JSON arrays).
    pub fn reads_parquet(self) -> bool {
        matches!(self.layout(), Layout::Parquet(..))
    }

    fn layout(self) -> Layout {
        match self {
            Source::BaiduBaike => Layout::JsonLines(sources::baidu_baike),
            Source::BaiduQa => Layout::JsonLines(sources::baidu_qa),
            Source::Belle2m => Layout::JsonLines(sources::belle_2m),
            Source::Belle3_5m => Layout::JsonLines(sources::belle_3_5m),
            Source::Firefly => Layout::JsonLines(sources::firefly),
            Source::Moss => Layout::JsonLines(sources::moss),
            Source::Zhihu => Layout::Parquet(&sources::ZHIHU_COLUMNS, sources::zhihu),
            Source::WikiCn => Layout::JsonArray(sources::wiki_cn),
            Source::Starcode => Layout::Parquet(&sources::STARCODE_COLUMNS, sources::starcode),
            Source::Wanjuan => Layout::JsonLines(sources::wanjuan),
            Source::Skypile => Layout::JsonLines(sources::skypile),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Source {
    type Err = DataError;

    /// The names of [`Source::name`], ASCII case-insensitive (so the reference's `baidu_QA`,
    /// `BELLE_2M` and `BELLE_3_5M` are accepted too).
    fn from_str(s: &str) -> Result<Self> {
        Source::ALL.into_iter().find(|x| x.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            let names: Vec<&str> = Source::ALL.iter().map(|x| x.name()).collect();
            DataError::Invalid(format!("unknown source {s:?} (one of: {})", names.join(", ")))
        })
    }
}

/// A malformed record: its file, its 1-based position (line of a jsonl file, element of a
/// wiki_cn array, row of a Parquet file) and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MalformedLine {
    pub file: String,
    pub line: u64,
    pub reason: String,
}

/// What a conversion did. `read = written + Σ dropped + malformed`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub source: String,
    /// Input files converted, in order.
    pub files: Vec<String>,
    pub read: u64,
    pub written: u64,
    /// Records dropped by the conversion's rules, by reason.
    pub dropped: BTreeMap<String, u64>,
    pub malformed: u64,
    /// The first [`MALFORMED_SHOWN_PER_FILE`] malformed records of each file.
    pub malformed_lines: Vec<MalformedLine>,
}

impl Summary {
    /// Records dropped for any reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }
}

impl fmt::Display for Summary {
    /// The human-readable end-of-run report.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {} file(s)", self.source, self.files.len())?;
        writeln!(f, "  read      {}", self.read)?;
        writeln!(f, "  written   {}", self.written)?;
        writeln!(f, "  dropped   {}", self.dropped_total())?;
        for (reason, n) in &self.dropped {
            writeln!(f, "    {n:>9}  {reason}")?;
        }
        write!(f, "  malformed {}", self.malformed)?;
        for m in &self.malformed_lines {
            write!(f, "\n    {}:{}: {}", m.file, m.line, m.reason)?;
        }
        if self.malformed > self.malformed_lines.len() as u64 {
            write!(f, "\n    (first {MALFORMED_SHOWN_PER_FILE} per file shown)")?;
        }
        Ok(())
    }
}

/// Progress of a conversion, reported after every batch and once more when a file is done.
#[derive(Clone, Copy, Debug)]
pub struct Progress<'a> {
    pub file: &'a Path,
    /// 0-based index of `file` among `files`.
    pub file_index: usize,
    pub files: usize,
    /// Records read so far, all files together.
    pub read: u64,
    pub written: u64,
    /// True on the report that ends `file`.
    pub file_done: bool,
}

/// The input files of `source` under `input`, in the order they are converted. A file is taken
/// as it is. In a directory (not recursive, hidden names skipped, sorted by name — the
/// reference used the unsorted OS order): names containing `.json` for the jsonl sources and
/// wiki_cn, `.parquet` for zhihu, ending in `.jsonl` for wanjuan and skypile; for starcode the
/// `.parquet` files of the `cpp/`, `java/` and `python/` subfolders, in that order.
pub fn input_files(source: Source, input: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(input).map_err(|e| DataError::io(input, e))?;
    if !meta.is_dir() {
        return Ok(vec![input.to_path_buf()]);
    }
    let files = match source {
        Source::Starcode => {
            let langs: Vec<PathBuf> = ["cpp", "java", "python"]
                .iter()
                .map(|l| input.join(l))
                .filter(|d| d.is_dir())
                .collect();
            if langs.is_empty() {
                return Err(DataError::Invalid(format!(
                    "{}: starcode expects cpp/, java/ or python/ subfolders (or one .parquet file)",
                    input.display()
                )));
            }
            let mut files = Vec::new();
            for dir in langs {
                files.extend(list_dir(&dir, |n| n.contains(".parquet"))?);
            }
            files
        }
        Source::Zhihu => list_dir(input, |n| n.contains(".parquet"))?,
        Source::Wanjuan | Source::Skypile => list_dir(input, |n| n.ends_with(".jsonl"))?,
        _ => list_dir(input, |n| n.contains(".json"))?,
    };
    if files.is_empty() {
        return Err(DataError::Invalid(format!(
            "{}: no {source} input files in this directory",
            input.display()
        )));
    }
    Ok(files)
}

/// Regular files of `dir` whose (non-hidden) names pass `keep`, sorted by name.
fn list_dir(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let path = entry.map_err(|e| DataError::io(dir, e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if !name.starts_with('.') && keep(name) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Converts `source`'s files under `input` (see [`input_files`]) into `output`, reporting
/// `progress` as it goes. The output's parent directories are created; an existing output is
/// replaced only when the run succeeds, and is never read as an input.
pub fn convert(
    source: Source,
    input: &Path,
    output: &Path,
    mut progress: impl FnMut(&Progress),
) -> Result<Summary> {
    let mut files = input_files(source, input)?;
    if output.is_dir() {
        return Err(DataError::Invalid(format!("output {} is a directory", output.display())));
    }
    if let Ok(out) = output.canonicalize() {
        files.retain(|f| f.canonicalize().map_or(true, |f| f != out));
        if files.is_empty() {
            return Err(DataError::Invalid(format!(
                "{}: the only input file is the output",
                input.display()
            )));
        }
    }
    let Some(name) = output.file_name().and_then(|n| n.to_str()) else {
        return Err(DataError::Invalid(format!("output {} has no file name", output.display())));
    };
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| DataError::io(&parent, e))?;
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let result = run::convert_files(source, &files, &tmp, output, &mut progress);
    if result.is_err() {
        // Best effort: the error being returned is the one to report.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
