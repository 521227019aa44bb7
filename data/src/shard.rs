//! Packed token shards, TinyLlama-compatible byte for byte (spec §3.2–§3.3).
//!
//! Layout: `LITPKDS` (7 bytes), version u64 LE = 1, dtype code u8, chunk size u64 LE (in tokens),
//! then `chunk_size` token ids, little-endian. dtype codes: 1 u8, 2 i8, 3 i16, 4 i32, 5 i64,
//! 6 f32, 7 f64, 8 u16; the writer uses u16 for vocabularies below 65,500 and i32 otherwise.
//!
//! The writer packs token ids into a buffer; a full buffer becomes the next file
//! `{prefix}_{counter:010d}.bin`, and documents span file boundaries freely. The reference's
//! writer ([`ShardWriter::new`]) pads the last, partial buffer with `<|endoftext|>` (151643) to a
//! full shard and writes it only when it is more than 5 % full, once (the reference could write
//! it twice); a fitted writer ([`ShardWriter::fitted`]) pads it only to whole blocks and always
//! writes it. Every file is written to a hidden temporary name and renamed when complete.

use crate::{DataError, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 7] = b"LITPKDS";
pub const VERSION: u64 = 1;
pub const HEADER_BYTES: usize = 24;
/// Shards at most this full are dropped at the end of a run (spec §3.1).
pub const REMAINDER_THRESHOLD: f64 = 0.05;

/// The element type of a shard's tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenDType {
    U8,
    I8,
    I16,
    I32,
    I64,
    F32,
    F64,
    U16,
}

impl TokenDType {
    pub fn code(self) -> u8 {
        match self {
            TokenDType::U8 => 1,
            TokenDType::I8 => 2,
            TokenDType::I16 => 3,
            TokenDType::I32 => 4,
            TokenDType::I64 => 5,
            TokenDType::F32 => 6,
            TokenDType::F64 => 7,
            TokenDType::U16 => 8,
        }
    }

    pub fn from_code(code: u8) -> Option<TokenDType> {
        Some(match code {
            1 => TokenDType::U8,
            2 => TokenDType::I8,
            3 => TokenDType::I16,
            4 => TokenDType::I32,
            5 => TokenDType::I64,
            6 => TokenDType::F32,
            7 => TokenDType::F64,
            8 => TokenDType::U16,
            _ => return None,
        })
    }

    pub fn itemsize(self) -> usize {
        match self {
            TokenDType::U8 | TokenDType::I8 => 1,
            TokenDType::I16 | TokenDType::U16 => 2,
            TokenDType::I32 | TokenDType::F32 => 4,
            TokenDType::I64 | TokenDType::F64 => 8,
        }
    }

    /// The builder's "auto" rule: u16 below 65,500 ids, i32 otherwise.
    pub fn for_vocab(vocab_size: usize) -> TokenDType {
        if vocab_size < 65500 {
            TokenDType::U16
        } else {
            TokenDType::I32
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TokenDType::U8 => "uint8",
            TokenDType::I8 => "int8",
            TokenDType::I16 => "int16",
            TokenDType::I32 => "int32",
            TokenDType::I64 => "int64",
            TokenDType::F32 => "float32",
            TokenDType::F64 => "float64",
            TokenDType::U16 => "uint16",
        }
    }

    /// Decodes token `i` of a little-endian body.
    /// The smallest and largest id of whole elements in `body` (`None` when it holds none).
    pub fn id_range(self, body: &[u8]) -> Option<(i64, i64)> {
        let n = body.len() / self.itemsize();
        (0..n).map(|i| self.read(body, i)).fold(None, |acc, x| match acc {
            None => Some((x, x)),
            Some((lo, hi)) => Some((lo.min(x), hi.max(x))),
        })
    }

    fn read(self, body: &[u8], i: usize) -> i64 {
        let s = self.itemsize();
        let b = &body[i * s..(i + 1) * s];
        match self {
            TokenDType::U8 => b[0] as i64,
            TokenDType::I8 => b[0] as i8 as i64,
            TokenDType::I16 => i16::from_le_bytes([b[0], b[1]]) as i64,
            TokenDType::U16 => u16::from_le_bytes([b[0], b[1]]) as i64,
            TokenDType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            TokenDType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
            TokenDType::I64 => i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            TokenDType::F64 => {
                f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as i64
            }
        }
    }
}

/// The 24-byte header of a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    pub dtype: TokenDType,
    /// Tokens in the body.
    pub chunk_size: u64,
}

impl ShardHeader {
    pub fn to_bytes(self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[..7].copy_from_slice(MAGIC);
        h[7..15].copy_from_slice(&VERSION.to_le_bytes());
        h[15] = self.dtype.code();
        h[16..24].copy_from_slice(&self.chunk_size.to_le_bytes());
        h
    }

    /// Parses and validates a header; `file_len`, when given, must match the header.
    pub fn parse(path: &Path, bytes: &[u8], file_len: Option<u64>) -> Result<ShardHeader> {
        if bytes.len() < HEADER_BYTES {
            return Err(DataError::format(
                path,
                format!("{} bytes is shorter than the 24-byte shard header", bytes.len()),
            ));
        }
        if &bytes[..7] != MAGIC {
            return Err(DataError::format(
                path,
                format!(
                    "bad magic {:?}: not a LITPKDS shard",
                    String::from_utf8_lossy(&bytes[..7])
                ),
            ));
        }
        let version = u64::from_le_bytes(bytes[7..15].try_into().unwrap_or([0; 8]));
        if version != VERSION {
            return Err(DataError::format(
                path,
                format!("unsupported shard format version {version} (expected 1)"),
            ));
        }
        let dtype = TokenDType::from_code(bytes[15])
            .ok_or_else(|| DataError::format(path, format!("unknown dtype code {}", bytes[15])))?;
        let chunk_size = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or([0; 8]));
        // The size must fit a u64 and the address space (a crafted chunk size would wrap the
        // product, pass the check and then index far past the map).
        let want = chunk_size
            .checked_mul(dtype.itemsize() as u64)
            .and_then(|b| b.checked_add(HEADER_BYTES as u64))
            .filter(|&b| usize::try_from(b).is_ok())
            .ok_or_else(|| {
                DataError::format(
                    path,
                    format!(
                        "its header announces {chunk_size} {} tokens: more bytes than any file \
                         can hold",
                        dtype.name()
                    ),
                )
            })?;
        if let Some(len) = file_len {
            if len != want {
                return Err(DataError::format(
                    path,
                    format!("file is {len} bytes but its header announces {chunk_size} {} tokens ({want} bytes)", dtype.name()),
                ));
            }
        }
        Ok(ShardHeader { dtype, chunk_size })
    }
}

/// A shard opened for reading (memory-mapped).
pub struct Shard {
    pub path: PathBuf,
    pub header: ShardHeader,
    map: memmap2::Mmap,
}

impl Shard {
    /// Opens and validates `path` (magic, version, dtype, size consistent with the header).
    pub fn open(path: &Path) -> Result<Shard> {
        let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
        let len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
        // SAFETY: shards are read-only inputs; the dataset re-checks their content hashes on
        // resume, and nothing in Steel writes to a shard after it was renamed into place.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| DataError::io(path, e))?;
        let header = ShardHeader::parse(path, &map, Some(len))?;
        Ok(Shard { path: path.to_path_buf(), header, map })
    }

    pub fn len(&self) -> usize {
        self.header.chunk_size as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens `start .. start + n` as i64.
    pub fn tokens(&self, start: usize, n: usize) -> Result<Vec<i64>> {
        if start.checked_add(n).is_none_or(|end| end > self.len()) {
            return Err(DataError::format(
                &self.path,
                format!("tokens {start}..{start}+{n} are past the end ({})", self.len()),
            ));
        }
        let body = &self.map[HEADER_BYTES..];
        Ok((start..start + n).map(|i| self.header.dtype.read(body, i)).collect())
    }
}

/// What a finished writer produced.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct WriterSummary {
    /// Token ids added (documents and separators).
    pub tokens_added: u64,
    /// Files written, in order.
    pub files: Vec<PathBuf>,
    /// Tokens of a final partial shard that was ≤ 5 % full and therefore not written.
    pub tokens_dropped: u64,
    /// Padding tokens written at the end of the last shard.
    pub padding_tokens: u64,
}

/// Packs token ids into shards (see the module docs).
pub struct ShardWriter {
    dir: PathBuf,
    prefix: String,
    dtype: TokenDType,
    pad: u32,
    /// Tokens per full shard.
    chunk: usize,
    /// `Some(block)`: the last shard holds just the blocks the remaining tokens need
    /// ([`ShardWriter::fitted`]); `None`: the reference's fixed-size last shard.
    fit_block: Option<usize>,
    /// The tokens of the shard being filled (grown as ids arrive, never beyond `chunk`).
    buf: Vec<u32>,
    counter: u64,
    summary: WriterSummary,
}

impl ShardWriter {
    /// A writer of `chunk_size`-token shards, the reference's way: the last, partial shard is
    /// padded to `chunk_size` and written only when it is more than 5 % full.
    pub fn new(
        dir: &Path,
        prefix: &str,
        chunk_size: usize,
        dtype: TokenDType,
        pad: u32,
    ) -> Result<ShardWriter> {
        if chunk_size == 0 {
            return Err(DataError::Invalid("the chunk size must be at least one token".into()));
        }
        if !matches!(dtype, TokenDType::U16 | TokenDType::I32) {
            return Err(DataError::Invalid(format!(
                "the writer writes uint16 or int32 tokens, not {}",
                dtype.name()
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        Ok(ShardWriter {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            dtype,
            pad,
            chunk: chunk_size,
            fit_block: None,
            buf: Vec::new(),
            counter: 0,
            summary: WriterSummary::default(),
        })
    }

    /// A writer of shards of at most `chunk_size` tokens whose last shard is sized to what is
    /// left: padded only to a whole number of `block`-token blocks, and written however little
    /// it holds, so a small input still gives a shard. `chunk_size` must be whole blocks.
    pub fn fitted(
        dir: &Path,
        prefix: &str,
        chunk_size: usize,
        block: usize,
        dtype: TokenDType,
        pad: u32,
    ) -> Result<ShardWriter> {
        if block == 0 || !chunk_size.is_multiple_of(block) {
            return Err(DataError::Invalid(format!(
                "a shard of {chunk_size} tokens is not whole blocks of {block}"
            )));
        }
        let mut w = Self::new(dir, prefix, chunk_size, dtype, pad)?;
        w.fit_block = Some(block);
        Ok(w)
    }

    /// Appends ids, writing every shard that fills up.
    pub fn add(&mut self, mut ids: &[u32]) -> Result<()> {
        self.summary.tokens_added += ids.len() as u64;
        while !ids.is_empty() {
            let n = (self.chunk - self.buf.len()).min(ids.len());
            let need = self.buf.len() + n;
            if need > self.buf.capacity() {
                // Doubling, but never past one shard: the buffer is what the output needs.
                let to = (2 * self.buf.capacity()).max(need).min(self.chunk);
                self.buf.reserve_exact(to - self.buf.len());
            }
            self.buf.extend_from_slice(&ids[..n]);
            ids = &ids[n..];
            if self.buf.len() == self.chunk {
                self.write_chunk()?;
            }
        }
        Ok(())
    }

    fn write_chunk(&mut self) -> Result<()> {
        let name = format!("{}_{:010}.bin", self.prefix, self.counter);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let header = ShardHeader { dtype: self.dtype, chunk_size: self.buf.len() as u64 };
        let mut bytes = Vec::with_capacity(HEADER_BYTES + self.buf.len() * self.dtype.itemsize());
        bytes.extend_from_slice(&header.to_bytes());
        match self.dtype {
            TokenDType::U16 => {
                for &t in &self.buf {
                    let v = u16::try_from(t).map_err(|_| {
                        DataError::Invalid(format!(
                            "token id {t} does not fit the uint16 shard dtype"
                        ))
                    })?;
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
            _ => {
                for &t in &self.buf {
                    let v = i32::try_from(t).map_err(|_| {
                        DataError::Invalid(format!("token id {t} does not fit int32"))
                    })?;
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        let mut f = std::fs::File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        f.write_all(&bytes).map_err(|e| DataError::io(&tmp, e))?;
        f.sync_all().map_err(|e| DataError::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))?;
        self.summary.files.push(path);
        self.counter += 1;
        self.buf.clear();
        Ok(())
    }

    /// Writes the partial last shard (once) and returns the summary: the reference's way, padded
    /// to a full shard when more than 5 % full and dropped otherwise; a [`fitted`] writer pads it
    /// to whole blocks and always writes it.
    ///
    /// [`fitted`]: ShardWriter::fitted
    pub fn finish(mut self) -> Result<WriterSummary> {
        let fill = self.buf.len();
        if fill == 0 {
            return Ok(self.summary);
        }
        let target = match self.fit_block {
            Some(block) => Some(fill.div_ceil(block) * block),
            None if fill as f64 / self.chunk as f64 > REMAINDER_THRESHOLD => Some(self.chunk),
            None => None,
        };
        match target {
            Some(len) => {
                self.summary.padding_tokens = (len - fill) as u64;
                self.buf.resize(len, self.pad);
                self.write_chunk()?;
            }
            None => self.summary.tokens_dropped = fill as u64,
        }
        Ok(self.summary)
    }
}
