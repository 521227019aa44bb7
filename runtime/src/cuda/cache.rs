//! The on-disk cubin cache.
//!
//! A compiled kernel file is stored as `<key>.cubin` with NVRTC's program log beside it as
//! `<key>.log` (so a cached compile still reports ptxas's `-v` lines). The key is the BLAKE3 hash
//! of everything that determines the cubin: NVRTC's version, the target arch, the options, the
//! source name and text, and every in-memory header (name and text). The folder is
//! `$STEEL_CUBIN_CACHE` when set, else `$XDG_CACHE_HOME/steel/cubin`, else
//! `~/.cache/steel/cubin`. Writes go to a temporary file renamed into place, so concurrent
//! processes never see half a cubin.

use super::{CudaError, Result};
use std::path::{Path, PathBuf};

/// Everything a cubin depends on.
#[derive(Clone, Copy, Debug)]
pub struct CacheKey<'a> {
    /// NVRTC's `(major, minor)`.
    pub nvrtc_version: (i32, i32),
    /// `sm_90`.
    pub arch: &'a str,
    /// Every NVRTC option, in order (include paths too: other headers, other cubin).
    pub options: &'a [String],
    pub source_name: &'a str,
    pub source: &'a str,
    /// In-memory headers `(include name, text)`.
    pub headers: &'a [(&'a str, &'a str)],
}

impl CacheKey<'_> {
    /// The hex BLAKE3 digest naming the cache entry.
    pub fn digest(&self) -> String {
        let mut h = blake3::Hasher::new();
        // Every field is length-prefixed, so no two different keys hash the same byte stream.
        let mut field = |bytes: &[u8]| {
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(b"steel-cubin-v1");
        field(format!("nvrtc {}.{}", self.nvrtc_version.0, self.nvrtc_version.1).as_bytes());
        field(self.arch.as_bytes());
        field(&(self.options.len() as u64).to_le_bytes());
        for o in self.options {
            field(o.as_bytes());
        }
        field(self.source_name.as_bytes());
        field(self.source.as_bytes());
        field(&(self.headers.len() as u64).to_le_bytes());
        for (name, text) in self.headers {
            field(name.as_bytes());
            field(text.as_bytes());
        }
        h.finalize().to_hex().to_string()
    }
}

/// The cache folder (see the module header), or `None` when no home is known.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("STEEL_CUBIN_CACHE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p).join("steel").join("cubin"));
    }
    std::env::var_os("HOME")
        .filter(|p| !p.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("steel").join("cubin"))
}

/// A cached compile: the cubin and the program log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub cubin: Vec<u8>,
    pub log: String,
}

/// A cubin cache in one folder.
#[derive(Clone, Debug)]
pub struct CubinCache {
    dir: PathBuf,
}

impl CubinCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CubinCache { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn paths(&self, digest: &str) -> (PathBuf, PathBuf) {
        (self.dir.join(format!("{digest}.cubin")), self.dir.join(format!("{digest}.log")))
    }

    /// The entry for `key`, `None` when absent (or incomplete). Read errors other than "not
    /// found" are errors.
    pub fn get(&self, key: &CacheKey) -> Result<Option<Entry>> {
        let (cubin_path, log_path) = self.paths(&key.digest());
        let cubin = match std::fs::read(&cubin_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CudaError::Cache { path: cubin_path, source }),
        };
        let log = match std::fs::read_to_string(&log_path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CudaError::Cache { path: log_path, source }),
        };
        if cubin.is_empty() {
            return Ok(None);
        }
        Ok(Some(Entry { cubin, log }))
    }

    /// Stores `entry` under `key` (log first, cubin last: a present cubin means a complete entry).
    pub fn put(&self, key: &CacheKey, entry: &Entry) -> Result<()> {
        let (cubin_path, log_path) = self.paths(&key.digest());
        std::fs::create_dir_all(&self.dir)
            .map_err(|source| CudaError::Cache { path: self.dir.clone(), source })?;
        write_atomic(&log_path, entry.log.as_bytes())?;
        write_atomic(&cubin_path, &entry.cubin)
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|source| CudaError::Cache { path: tmp.clone(), source })?;
    std::fs::rename(&tmp, path)
        .map_err(|source| CudaError::Cache { path: path.to_path_buf(), source })
}
