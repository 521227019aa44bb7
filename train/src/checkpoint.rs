//! Crash-safe checkpoint directories (DESIGN §6).
//!
//! A checkpoint is a directory `step-NNNNNN/` of files plus `manifest.json` (each file's size and
//! BLAKE3 hash, the step, free-form metadata). It is written as `.tmp-step-NNNNNN/`, every file
//! and the directory fsync'ed, then renamed into place and the parent fsync'ed: a crash at any
//! moment leaves either the complete new checkpoint or none, and the previous one untouched.
//! Loading verifies every file against the manifest and names the first damaged one;
//! `latest_valid` skips damaged checkpoints (with a warning each) and picks the newest good one.

use crate::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

const MANIFEST: &str = "manifest.json";

/// One file of a checkpoint as recorded in its manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub name: String,
    pub bytes: u64,
    pub blake3: String,
}

/// The manifest of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub step: u64,
    pub files: Vec<FileRecord>,
    /// Free-form metadata (counters, recipe, RNG state, …).
    pub meta: serde_json::Value,
}

fn io(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Invalid(format!("{}: {e}", path.display()))
}

/// Writes one checkpoint file at the path it is given.
pub type FileWriter<'a> = &'a dyn Fn(&Path) -> Result<()>;

/// The newest valid checkpoint (directory and manifest), if any.
pub type Found = Option<(PathBuf, Manifest)>;

/// The directory name of step `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| io(dir, e))
}

fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).map_err(|e| io(path, e))?;
    let mut h = blake3::Hasher::new();
    let n = std::io::copy(&mut f, &mut h).map_err(|e| io(path, e))?;
    Ok((n, h.finalize().to_hex().to_string()))
}

/// Writes a checkpoint of `files` (name → contents written by the closure) under `root`,
/// atomically (see the module docs), and returns its directory.
pub fn write_checkpoint(
    root: &Path,
    step: u64,
    files: &[(&str, FileWriter<'_>)],
    meta: serde_json::Value,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
    let name = step_dir_name(step);
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let out = write_into(root, &tmp, &name, step, files, meta);
    if out.is_err() {
        // A failed write (a full disk, a bad file name) leaves no partial temporary behind; the
        // previous checkpoints are untouched.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    out
}

fn write_into(
    root: &Path,
    tmp: &Path,
    name: &str,
    step: u64,
    files: &[(&str, FileWriter<'_>)],
    meta: serde_json::Value,
) -> Result<PathBuf> {
    let mut records = Vec::with_capacity(files.len());
    for (fname, write) in files {
        if *fname == MANIFEST || fname.contains('/') {
            return Err(TrainError::Invalid(format!(
                "checkpoint file name {fname:?} is not allowed"
            )));
        }
        let path = tmp.join(fname);
        write(&path)?;
        std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(|e| io(&path, e))?;
        let (bytes, blake3) = hash_file(&path)?;
        records.push(FileRecord { name: fname.to_string(), bytes, blake3 });
    }
    let manifest = Manifest { format: "steel-checkpoint-v1".into(), step, files: records, meta };
    let mpath = tmp.join(MANIFEST);
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|e| TrainError::Invalid(e.to_string()))?;
    let mut f = std::fs::File::create(&mpath).map_err(|e| io(&mpath, e))?;
    f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| io(&mpath, e))?;
    fsync_dir(tmp)?;
    let dst = root.join(name);
    if dst.exists() {
        std::fs::remove_dir_all(&dst).map_err(|e| io(&dst, e))?;
    }
    std::fs::rename(tmp, &dst).map_err(|e| io(&dst, e))?;
    fsync_dir(root)?;
    Ok(dst)
}

/// Reads `dir`'s manifest and checks every file's size and hash; the error names the file.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let mpath = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&mpath).map_err(|e| io(&mpath, e))?;
    let m: Manifest = serde_json::from_str(&text)
        .map_err(|e| TrainError::Invalid(format!("{}: damaged manifest: {e}", mpath.display())))?;
    for f in &m.files {
        let path = dir.join(&f.name);
        let (bytes, hash) = hash_file(&path)?;
        if bytes != f.bytes {
            return Err(TrainError::Invalid(format!(
                "{}: checksum mismatch: {bytes} bytes where the manifest records {}, so the \
                 file is truncated or corrupted",
                path.display(),
                f.bytes
            )));
        }
        if hash != f.blake3 {
            return Err(TrainError::Invalid(format!(
                "{}: checksum mismatch: its BLAKE3 hash differs from the manifest's (the \
                 size, {bytes} bytes, is right), so the file is corrupted",
                path.display()
            )));
        }
    }
    Ok(m)
}

/// Complete checkpoint directories under `root`, newest step first (temporaries are ignored).
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .map_err(|e| io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = p.file_name()?.to_str()?.strip_prefix("step-")?.parse::<u64>().ok()?;
            p.is_dir().then_some((step, p))
        })
        .collect();
    out.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    Ok(out)
}

/// The newest checkpoint that verifies, and a warning for every newer one that did not.
pub fn latest_valid(root: &Path) -> Result<(Found, Vec<String>)> {
    let mut warnings = Vec::new();
    for (_, dir) in list(root)? {
        match verify(&dir) {
            Ok(m) => return Ok((Some((dir, m)), warnings)),
            Err(e) => warnings.push(format!("skipping damaged checkpoint {}: {e}", dir.display())),
        }
    }
    Ok((None, warnings))
}

/// Removes the temporaries a crash mid-write left under `root` (`.tmp-step-*`: never a
/// checkpoint; the next write of the same step replaces it anyway).
pub fn remove_temporaries(root: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !root.exists() {
        return Ok(removed);
    }
    for e in std::fs::read_dir(root).map_err(|e| io(root, e))?.flatten() {
        let p = e.path();
        if p.is_dir()
            && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".tmp-step-"))
        {
            std::fs::remove_dir_all(&p).map_err(|e| io(&p, e))?;
            removed.push(p);
        }
    }
    Ok(removed)
}
