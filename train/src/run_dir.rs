//! The output directory of a run (`--out`): one trainer at a time (`RunLock`), starting over
//! without losing the old run (`move_aside`, `--fresh`), and which checkpoints pruning may
//! delete (`prune_valid`).
//!
//! - The lock is `flock` on `<out>/.lock` (`File::try_lock`), taken before anything else is
//!   written under `--out`, data preparation included, and held for the whole run. The kernel
//!   releases it when the process exits, however it exits, so a crash leaves no stale lock; the
//!   file keeps the holder's pid and host for the message a second trainer gets. `flock` is not
//!   reliable on NFS (it may be local to one client): keep `--out` on a local or a
//!   lock-coherent file system.
//! - Nothing here deletes a run: `--fresh` renames the old directory to a dated sibling.
//! - Pruning keeps the newest `keep` checkpoints that verify and never touches a damaged one
//!   (nor the newest valid one, whatever `keep` says).

use crate::checkpoint;
use crate::{Result, TrainError};
use std::collections::HashSet;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

const LOCK: &str = ".lock";

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Invalid(format!("{}: {e}", path.display()))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "an unknown host".into())
}

/// The exclusive lock on a run directory, held until dropped (or the process ends).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Locks `out` (created if missing) for global rank `rank`: rank 0 takes the lock, the other
    /// ranks of a multi-process run get `None` (rank 0 alone writes to `--out`). A directory
    /// another trainer holds is an error naming its pid and host.
    pub fn acquire(out: &Path, rank: usize) -> Result<Option<RunLock>> {
        if rank != 0 {
            return Ok(None);
        }
        std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
        let path = out.join(LOCK);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "another process" } else { holder };
                return Err(TrainError::Invalid(format!(
                    "{} is in use by another trainer ({holder}): wait for it to finish, or \
                     choose another --out",
                    out.display()
                )));
            }
            Err(TryLockError::Error(e)) => {
                return Err(io(&path, format!("cannot lock the run directory: {e}")))
            }
        }
        let me = format!("steel-train pid {} on {}\n", std::process::id(), hostname());
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(me.as_bytes()))
            .and_then(|_| file.sync_all())
            .map_err(|e| io(&path, e))?;
        Ok(Some(RunLock { _file: file }))
    }
}

/// `YYYYMMDD-HHMMSS` (UTC) of now.
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `--fresh`: renames a non-empty `out` to the sibling `<out>.replaced-<UTC time>` (a counter is
/// added when that exists) and returns where it went; `None` when there was nothing to move.
/// The caller holds `out`'s lock, so no trainer is writing it; nothing is deleted.
pub fn move_aside(out: &Path) -> Result<Option<PathBuf>> {
    let has_content = match std::fs::read_dir(out) {
        Ok(mut entries) => entries.any(|e| e.is_ok_and(|e| e.file_name() != LOCK)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io(out, e)),
    };
    if !has_content {
        return Ok(None);
    }
    let name = out
        .file_name()
        .ok_or_else(|| io(out, "--fresh needs an --out that names a directory"))?
        .to_string_lossy()
        .into_owned();
    let base = format!("{name}.replaced-{}", utc_stamp());
    let mut dst = out.with_file_name(&base);
    let mut n = 2;
    while dst.exists() {
        dst = out.with_file_name(format!("{base}-{n}"));
        n += 1;
    }
    std::fs::rename(out, &dst).map_err(|e| io(out, format!("cannot move it aside: {e}")))?;
    if let Some(parent) = dst.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = File::open(parent).and_then(|f| f.sync_all());
    }
    Ok(Some(dst))
}

/// Keeps the newest `keep` (at least 1) checkpoints under `root` that verify and deletes every
/// checkpoint older than the last of them, and leftover temporaries. Damaged checkpoints newer
/// than that are neither counted nor deleted (a damaged newest checkpoint can never push out the
/// last valid one); with no valid checkpoint nothing is deleted. `known_valid` holds the
/// checkpoints this process wrote or verified, which are not hashed again; the ones verified now
/// join it. Returns what was deleted.
pub fn prune_valid(
    root: &Path,
    keep: usize,
    known_valid: &mut HashSet<PathBuf>,
) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let mut kept = 0usize;
    for (_, dir) in checkpoint::list(root)? {
        if kept < keep.max(1) {
            if known_valid.contains(&dir) || checkpoint::verify(&dir).is_ok() {
                known_valid.insert(dir);
                kept += 1;
            }
            continue;
        }
        std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
        known_valid.remove(&dir);
        removed.push(dir);
    }
    removed.extend(checkpoint::remove_temporaries(root)?);
    Ok(removed)
}
