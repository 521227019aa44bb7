//! The conversion engine: reads each file of a run by its [`Layout`], converts records in
//! parallel batches and accounts for them in input order (see the module conventions of
//! [`super`]).

use super::parquet::{ParquetColumns, Row};
use super::sources::Outcome;
use super::{
    text, Layout, MalformedLine, ObjectFn, Progress, RowFn, Source, Summary,
    MALFORMED_SHOWN_PER_FILE,
};
use crate::{DataError, Result};
use rayon::prelude::*;
use serde::de::{DeserializeSeed, Error as _, SeqAccess, Visitor};
use serde_json::Value;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

/// jsonl lines or array elements converted per parallel batch (also bounded by bytes).
const BATCH_RECORDS: usize = 4096;
const BATCH_BYTES: usize = 32 << 20;

/// Converts `files` into `tmp`, then renames it to `output`.
pub(super) fn convert_files(
    source: Source,
    files: &[PathBuf],
    tmp: &Path,
    output: &Path,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Summary> {
    let file = File::create(tmp).map_err(|e| DataError::io(tmp, e))?;
    let mut run = Run {
        out: BufWriter::with_capacity(8 << 20, file),
        out_path: tmp,
        summary: Summary { source: source.name().to_string(), ..Summary::default() },
        file_malformed: 0,
    };
    for (i, path) in files.iter().enumerate() {
        run.file_malformed = 0;
        run.summary.files.push(path.display().to_string());
        let mut report = |read: u64, written: u64, file_done: bool| {
            progress(&Progress {
                file: path,
                file_index: i,
                files: files.len(),
                read,
                written,
                file_done,
            })
        };
        match source.layout() {
            Layout::JsonLines(f) => run.json_lines(path, f, &mut report)?,
            Layout::JsonArray(f) => run.json_array(path, f, &mut report)?,
            Layout::Parquet(columns, f) => run.parquet(path, columns, f, &mut report)?,
        }
        report(run.summary.read, run.summary.written, true);
    }
    let file = run.out.into_inner().map_err(|e| DataError::io(tmp, e.into_error()))?;
    file.sync_all().map_err(|e| DataError::io(tmp, e))?;
    std::fs::rename(tmp, output).map_err(|e| DataError::io(output, e))?;
    Ok(run.summary)
}

/// A record's fate once converted (computed in parallel, accounted in order).
enum Done {
    Line(Vec<u8>),
    Drop(&'static str),
    Malformed(String),
}

fn done(r: std::result::Result<Outcome, String>) -> Done {
    match r {
        Ok(Outcome::Keep(text)) => Done::Line(text::json_line(&text)),
        Ok(Outcome::Drop(why)) => Done::Drop(why),
        Err(why) => Done::Malformed(why),
    }
}

fn object_record(v: &Value, f: ObjectFn) -> Done {
    match v.as_object() {
        Some(o) => done(f(o)),
        None => Done::Malformed("not a JSON object".to_string()),
    }
}

/// One jsonl line (without regard to its line ending) → its fate.
fn json_line_record(line: &[u8], f: ObjectFn) -> Done {
    let line = line.strip_prefix("\u{feff}".as_bytes()).unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Done::Malformed("not valid UTF-8".to_string());
    };
    match serde_json::from_str::<Value>(line) {
        Ok(v) => object_record(&v, f),
        Err(e) => Done::Malformed(format!("invalid JSON: {e}")),
    }
}

/// The state of a conversion run.
struct Run<'a> {
    out: BufWriter<File>,
    out_path: &'a Path,
    summary: Summary,
    /// Malformed records of the current file so far.
    file_malformed: usize,
}

impl Run<'_> {
    /// Converts `items` (each with its 1-based position in `path`) in parallel with `f`, then
    /// writes and counts them in order.
    fn batch<T: Send>(
        &mut self,
        path: &Path,
        items: Vec<(u64, T)>,
        f: impl Fn(T) -> Done + Sync,
    ) -> Result<()> {
        let done: Vec<(u64, Done)> = items.into_par_iter().map(|(pos, t)| (pos, f(t))).collect();
        for (pos, d) in done {
            self.summary.read += 1;
            match d {
                Done::Line(line) => {
                    self.out.write_all(&line).map_err(|e| DataError::io(self.out_path, e))?;
                    self.summary.written += 1;
                }
                Done::Drop(why) => *self.summary.dropped.entry(why.to_string()).or_default() += 1,
                Done::Malformed(reason) => {
                    self.summary.malformed += 1;
                    if self.file_malformed < MALFORMED_SHOWN_PER_FILE {
                        let file = path.display().to_string();
                        self.summary.malformed_lines.push(MalformedLine {
                            file,
                            line: pos,
                            reason,
                        });
                    }
                    self.file_malformed += 1;
                }
            }
        }
        Ok(())
    }

    fn json_lines(
        &mut self,
        path: &Path,
        f: ObjectFn,
        report: &mut dyn FnMut(u64, u64, bool),
    ) -> Result<()> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let (mut line_no, mut batch, mut bytes) = (0u64, Vec::new(), 0usize);
        loop {
            let mut line = Vec::new();
            let n = reader.read_until(b'\n', &mut line).map_err(|e| DataError::io(path, e))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            bytes += line.len();
            batch.push((line_no, line));
            if batch.len() >= BATCH_RECORDS || bytes >= BATCH_BYTES {
                self.batch(path, std::mem::take(&mut batch), |l| json_line_record(&l, f))?;
                bytes = 0;
                report(self.summary.read, self.summary.written, false);
            }
        }
        self.batch(path, batch, |l| json_line_record(&l, f))
    }

    /// A file holding one JSON array, streamed element by element (never held whole).
    fn json_array(
        &mut self,
        path: &Path,
        f: ObjectFn,
        report: &mut dyn FnMut(u64, u64, bool),
    ) -> Result<()> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        // Skip a UTF-8 byte-order mark.
        let head = reader.fill_buf().map_err(|e| DataError::io(path, e))?;
        if head.starts_with("\u{feff}".as_bytes()) {
            reader.consume(3);
        }
        let mut failed: Option<DataError> = None;
        let mut elements = ArrayElements {
            on_batch: &mut |batch: Vec<(u64, Value)>| {
                self.batch(path, batch, |v| object_record(&v, f))?;
                report(self.summary.read, self.summary.written, false);
                Ok(())
            },
            failed: &mut failed,
        };
        let mut de = serde_json::Deserializer::from_reader(reader);
        let parsed = (&mut elements).deserialize(&mut de).and_then(|()| de.end());
        match (failed, parsed) {
            (Some(e), _) => Err(e),
            (None, Err(e)) => {
                Err(DataError::format(path, format!("not a JSON array of records: {e}")))
            }
            (None, Ok(())) => Ok(()),
        }
    }

    fn parquet(
        &mut self,
        path: &Path,
        columns: &[&str],
        f: RowFn,
        report: &mut dyn FnMut(u64, u64, bool),
    ) -> Result<()> {
        let reader = ParquetColumns::open(path, columns)?;
        let mut row_no = 0u64;
        let total = reader.num_rows();
        reader.for_each_batch(|rows| {
            let items: Vec<(u64, Row)> = rows
                .into_iter()
                .map(|r| {
                    row_no += 1;
                    (row_no, r)
                })
                .collect();
            self.batch(path, items, |r| done(f(&r)))?;
            report(self.summary.read, self.summary.written, false);
            Ok(())
        })?;
        if row_no != total {
            return Err(DataError::format(
                path,
                format!("read {row_no} rows, metadata says {total}"),
            ));
        }
        Ok(())
    }
}

/// Streams the elements of a JSON array to `on_batch` in batches of [`BATCH_RECORDS`], each
/// with its 1-based index. An error of `on_batch` is kept in `failed` (the parser only sees
/// that it should stop).
struct ArrayElements<'f> {
    on_batch: &'f mut dyn FnMut(Vec<(u64, Value)>) -> Result<()>,
    failed: &'f mut Option<DataError>,
}

impl<'de> DeserializeSeed<'de> for &mut ArrayElements<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for &mut ArrayElements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        let (mut index, mut batch) = (0u64, Vec::new());
        while let Some(v) = seq.next_element::<Value>()? {
            index += 1;
            batch.push((index, v));
            if batch.len() >= BATCH_RECORDS {
                self.flush(&mut batch).map_err(A::Error::custom)?;
            }
        }
        self.flush(&mut batch).map_err(A::Error::custom)
    }
}

impl ArrayElements<'_> {
    fn flush(&mut self, batch: &mut Vec<(u64, Value)>) -> std::result::Result<(), &'static str> {
        if batch.is_empty() {
            return Ok(());
        }
        (self.on_batch)(std::mem::take(batch)).map_err(|e| {
            *self.failed = Some(e);
            "conversion stopped"
        })
    }
}
