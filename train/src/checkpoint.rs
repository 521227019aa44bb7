//! Crash-safe checkpoint directories (DESIGN §6).
//!
//! A checkpoint is a directory `step-NNNNNN/` of files plus `manifest.json` (each file's size and
//! BLAKE3 hash, the step, free-form metadata). It is written as `.tmp-step-NNNNNN/`, every file
//! and the directory fsync'ed, then renamed into place and the parent fsync'ed: a crash at any
//! moment leaves either the complete new checkpoint or none, and the previous one untouched.
//! Loading verifies every file against the manifest and names the first damaged one;
//! `latest_valid` skips damaged checkpoints (with a warning each) and picks the newest good one.
//!
//! A checkpoint is read as untrusted input: manifest names are plain file names (no `..`, no
//! directories, no absolute paths), every file a checkpoint must have is listed, and each file is
//! opened without following a link, must be a regular file of the manifest's size, is read at
//! most that many bytes, and is hashed and parsed from the same bytes ([`Checkpoint::read`]).
//! A loader reads only files the manifest lists. The checkpoint directory itself may be a link.

use crate::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use steel_model::is_plain_name;

const MANIFEST: &str = "manifest.json";

/// The largest manifest read (a real one is a few kilobytes).
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// The files every checkpoint holds (besides its data state, one of [`DATA_STATE_FILES`]).
pub const REQUIRED_FILES: [&str; 4] =
    ["model.safetensors", "optimizer.safetensors", "trainer.json", "config.json"];

/// The data position: a packed dataset's state or a fine-tuning order; a checkpoint holds one.
pub const DATA_STATE_FILES: [&str; 2] = ["data.safetensors", "data.json"];

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

/// Opens `path` for reading without following a final symbolic link and without blocking on a
/// FIFO, and checks that it is a regular file; returns it with its size.
fn open_regular(path: &Path) -> Result<(std::fs::File, u64)> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    }
    let f = opts.open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            TrainError::Invalid(format!(
                "{}: is a symbolic link; checkpoint files must be regular files in the \
                 checkpoint directory",
                path.display()
            ))
        } else {
            io(path, e)
        }
    })?;
    let meta = f.metadata().map_err(|e| io(path, e))?;
    if !meta.is_file() {
        return Err(TrainError::Invalid(format!(
            "{}: is not a regular file ({}); checkpoint files must be regular files",
            path.display(),
            kind_of(&meta.file_type())
        )));
    }
    Ok((f, meta.len()))
}

fn kind_of(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a file"
    }
}

/// Reads `dir`'s manifest (bounded, not through a link) and checks its names: plain, unique,
/// and every file a checkpoint must have listed.
fn read_manifest(dir: &Path) -> Result<Manifest> {
    let mpath = dir.join(MANIFEST);
    let (f, len) = open_regular(&mpath)?;
    if len > MAX_MANIFEST_BYTES {
        return Err(TrainError::Invalid(format!(
            "{}: damaged manifest: {len} bytes (a manifest is a few kilobytes)",
            mpath.display()
        )));
    }
    let mut text = String::new();
    use std::io::Read;
    f.take(MAX_MANIFEST_BYTES).read_to_string(&mut text).map_err(|e| io(&mpath, e))?;
    parse_manifest(&text)
        .map_err(|msg| TrainError::Invalid(format!("{}: damaged manifest: {msg}", mpath.display())))
}

/// Parses and checks a manifest's text (the names rule of the module docs); the error says what
/// is wrong. The entry point of the manifest fuzz target.
pub fn parse_manifest(text: &str) -> std::result::Result<Manifest, String> {
    let m: Manifest = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut seen = std::collections::HashSet::new();
    for f in &m.files {
        if !is_plain_name(&f.name) || f.name == MANIFEST {
            return Err(format!(
                "file name {:?} is not a plain file name in the checkpoint directory",
                f.name
            ));
        }
        if !seen.insert(f.name.as_str()) {
            return Err(format!("file {:?} is listed twice", f.name));
        }
        if f.blake3.len() != 64 || !f.blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("file {:?} has no BLAKE3 hash (64 hex digits)", f.name));
        }
    }
    let missing: Vec<&str> = REQUIRED_FILES.iter().copied().filter(|n| !seen.contains(n)).collect();
    if !missing.is_empty() {
        return Err(format!("it does not list {}, which every checkpoint has", missing.join(", ")));
    }
    if !DATA_STATE_FILES.iter().any(|n| seen.contains(n)) {
        return Err(format!(
            "it lists no data state ({}), which every checkpoint has",
            DATA_STATE_FILES.join(" or ")
        ));
    }
    Ok(m)
}

/// Checks one file of a checkpoint against its record: a regular file (not a link) of the
/// recorded size, whose first `bytes` bytes hash to the recorded value. With `keep`, returns
/// those bytes (the ones that were hashed), else an empty vector.
fn check_file(dir: &Path, rec: &FileRecord, keep: bool) -> Result<Vec<u8>> {
    let path = dir.join(&rec.name);
    let (f, len) = open_regular(&path)?;
    if len != rec.bytes {
        return Err(TrainError::Invalid(format!(
            "{}: checksum mismatch: {len} bytes where the manifest records {}, so the file is \
             truncated or corrupted",
            path.display(),
            rec.bytes
        )));
    }
    let mut h = blake3::Hasher::new();
    let mut kept = Vec::new();
    use std::io::Read;
    let mut r = f.take(rec.bytes);
    let n = if keep {
        // The size is the file's own (checked above), so this allocation is what the file is.
        kept.try_reserve_exact(rec.bytes as usize).map_err(|_| {
            TrainError::Invalid(format!(
                "{}: {} bytes do not fit in this machine's memory",
                path.display(),
                rec.bytes
            ))
        })?;
        r.read_to_end(&mut kept).map_err(|e| io(&path, e))?;
        h.update(&kept);
        kept.len() as u64
    } else {
        std::io::copy(&mut r, &mut h).map_err(|e| io(&path, e))?
    };
    if n != rec.bytes {
        return Err(TrainError::Invalid(format!(
            "{}: checksum mismatch: {n} bytes could be read where the manifest records {}, so \
             the file is truncated",
            path.display(),
            rec.bytes
        )));
    }
    if h.finalize().to_hex().as_str() != rec.blake3 {
        return Err(TrainError::Invalid(format!(
            "{}: checksum mismatch: its BLAKE3 hash differs from the manifest's (the size, {n} \
             bytes, is right), so the file is corrupted",
            path.display()
        )));
    }
    Ok(kept)
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
        if *fname == MANIFEST || !is_plain_name(fname) {
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
    let m = read_manifest(dir)?;
    for f in &m.files {
        check_file(dir, f, false)?;
    }
    Ok(m)
}

/// A verified checkpoint directory, read through its manifest.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Checkpoint {
    /// Opens and verifies `dir` (every file, as [`verify`]).
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        Ok(Checkpoint { dir: dir.to_path_buf(), manifest: verify(dir)? })
    }

    /// Whether the manifest lists `name`.
    pub fn has(&self, name: &str) -> bool {
        self.manifest.files.iter().any(|f| f.name == name)
    }

    /// The path of `name` in the checkpoint (for messages).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The bytes of the listed file `name`, checked again against the manifest as they are read:
    /// what the caller parses is exactly what was hashed (a file changed since [`open`] is an
    /// error, not a silent mix). A name the manifest does not list is an error.
    ///
    /// [`open`]: Checkpoint::open
    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        let rec = self.manifest.files.iter().find(|f| f.name == name).ok_or_else(|| {
            TrainError::Invalid(format!(
                "{}: {name} is not in the checkpoint's manifest, so it is not read",
                self.dir.display()
            ))
        })?;
        check_file(&self.dir, rec, true)
    }

    /// The model of this checkpoint (`config.json` and `model.safetensors`, read through the
    /// manifest) on `backend` in `dtype`.
    pub fn load_model(
        &self,
        backend: std::sync::Arc<dyn steel_runtime::Backend>,
        dtype: steel_runtime::DType,
    ) -> Result<steel_model::SteelModel> {
        let config = steel_model::SteelConfig::from_json(&self.read_string("config.json")?)
            .map_err(|e| {
                TrainError::Invalid(format!("{}: {e}", self.path("config.json").display()))
            })?;
        let name = "model.safetensors";
        let bytes = self.read(name)?;
        Ok(steel_model::load_from_bytes(config, &[(self.path(name), &bytes)], backend, dtype)?)
    }

    /// [`read`](Checkpoint::read) as UTF-8 text.
    pub fn read_string(&self, name: &str) -> Result<String> {
        String::from_utf8(self.read(name)?).map_err(|_| {
            TrainError::Invalid(format!("{}: not UTF-8 text", self.path(name).display()))
        })
    }
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
