//! Reading named string columns of a Parquet file, row batch by row batch, through the
//! `parquet` crate's column readers (no arrow).
//!
//! Conventions: only flat (non-repeated) `BYTE_ARRAY` columns are read; a null is `None`; a
//! batch holds the same rows of every requested column, in file order, so row `i` of the
//! file is the `i`-th row handed out (counting from 0 across row groups).

use crate::{DataError, Result};
use parquet::basic::Type as PhysicalType;
use parquet::column::reader::ColumnReader;
use parquet::data_type::ByteArray;
use parquet::file::reader::{ChunkReader, FileReader, Length, SerializedFileReader};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Runs one call into the `parquet` crate with a panic (its decoders assert on some malformed
/// input) mapped to an error naming the file, like the crate's own errors.
fn guard<T>(
    path: &Path,
    f: impl FnOnce() -> std::result::Result<T, parquet::errors::ParquetError>,
) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => {
            r.map_err(|e| DataError::format(path, format!("not a readable Parquet file: {e}")))
        }
        Err(panic) => Err(DataError::format(
            path,
            format!(
                "not a readable Parquet file: the Parquet reader failed on it ({})",
                crate::panic_message(&panic)
            ),
        )),
    }
}

/// A file for the Parquet reader that refuses to read past its end: a read at the end of the
/// file is an error instead of 0 bytes, and a byte range beyond the file is refused before it is
/// allocated. The reader's Thrift decoder otherwise loops on a list of 2^31 elements a crafted
/// footer declares, reading 0 bytes each time (a hang the Parquet fuzz target found).
struct StrictFile(File);

/// A reader of [`StrictFile`]: the end of the file mid-structure is `UnexpectedEof`.
struct StrictEof<R>(R);

impl<R: Read> Read for StrictEof<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        if n == 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the Parquet file ends inside a structure",
            ));
        }
        Ok(n)
    }
}

impl Length for StrictFile {
    fn len(&self) -> u64 {
        self.0.len()
    }
}

impl ChunkReader for StrictFile {
    type T = StrictEof<<File as ChunkReader>::T>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(StrictEof(self.0.get_read(start)?))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        let end = start.checked_add(length as u64);
        if end.is_none_or(|end| end > self.len()) {
            return Err(parquet::errors::ParquetError::EOF(format!(
                "{length} bytes at offset {start} are past the end of the file ({} bytes)",
                self.len()
            )));
        }
        self.0.get_bytes(start, length)
    }
}

/// Rows read per batch and column.
const BATCH_ROWS: usize = 1024;

/// One row: the requested columns' values in the order they were named.
pub(crate) type Row = Vec<Option<ByteArray>>;

/// An open Parquet file and the leaf indices of the requested columns.
pub(crate) struct ParquetColumns {
    path: PathBuf,
    reader: SerializedFileReader<StrictFile>,
    /// (leaf column index, max definition level) per requested column.
    columns: Vec<(usize, i16)>,
}

impl ParquetColumns {
    /// Opens `path` and finds the top-level string columns `names`; a missing, nested,
    /// repeated or non-`BYTE_ARRAY` column is an error naming the file.
    pub(crate) fn open(path: &Path, names: &[&str]) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let reader = guard(path, || SerializedFileReader::new(StrictFile(file)))?;
        let schema = reader.metadata().file_metadata().schema_descr_ptr();
        let mut columns = Vec::with_capacity(names.len());
        for name in names {
            let found =
                schema.columns().iter().position(|c| c.path().parts() == [name.to_string()]);
            let Some(i) = found else {
                return Err(DataError::format(path, format!("no top-level column `{name}`")));
            };
            let c = schema.column(i);
            if c.physical_type() != PhysicalType::BYTE_ARRAY || c.max_rep_level() != 0 {
                return Err(DataError::format(
                    path,
                    format!("column `{name}` is {:?}, not a flat string column", c.physical_type()),
                ));
            }
            columns.push((i, c.max_def_level()));
        }
        Ok(ParquetColumns { path: path.to_path_buf(), reader, columns })
    }

    /// Total rows in the file (from its metadata).
    pub(crate) fn num_rows(&self) -> u64 {
        u64::try_from(self.reader.metadata().file_metadata().num_rows()).unwrap_or(0)
    }

    /// Calls `f` with successive batches of rows until the file is exhausted or `f` fails.
    pub(crate) fn for_each_batch(&self, mut f: impl FnMut(Vec<Row>) -> Result<()>) -> Result<()> {
        let path = self.path.as_path();
        for g in 0..self.reader.num_row_groups() {
            let group = guard(path, || self.reader.get_row_group(g))?;
            let group_rows = usize::try_from(group.metadata().num_rows()).unwrap_or(0);
            let mut readers = Vec::with_capacity(self.columns.len());
            for &(i, _) in &self.columns {
                match guard(path, || group.get_column_reader(i))? {
                    ColumnReader::ByteArrayColumnReader(r) => readers.push(r),
                    _ => return Err(DataError::format(&self.path, "column is not BYTE_ARRAY")),
                }
            }
            let mut done = 0usize;
            while done < group_rows {
                let want = BATCH_ROWS.min(group_rows - done);
                let mut rows: Vec<Row> = vec![Vec::with_capacity(self.columns.len()); want];
                for (reader, &(_, max_def)) in readers.iter_mut().zip(&self.columns) {
                    let mut defs: Vec<i16> = Vec::with_capacity(want);
                    let mut values: Vec<ByteArray> = Vec::with_capacity(want);
                    let (got, _, _) = guard(path, || {
                        reader.read_records(want, Some(&mut defs), None, &mut values)
                    })?;
                    if got != want {
                        return Err(DataError::format(
                            &self.path,
                            format!(
                                "row group {g}: a column ends after {} of {group_rows} rows",
                                done + got
                            ),
                        ));
                    }
                    let mut values = values.into_iter();
                    for (r, row) in rows.iter_mut().enumerate() {
                        let present = max_def == 0 || defs.get(r) == Some(&max_def);
                        let value = if present { values.next() } else { None };
                        if present && value.is_none() {
                            return Err(DataError::format(&self.path, "fewer values than levels"));
                        }
                        row.push(value);
                    }
                }
                done += want;
                f(rows)?;
            }
        }
        Ok(())
    }
}
