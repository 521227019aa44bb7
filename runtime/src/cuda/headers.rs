//! Where the CUDA headers are: the include directories handed to NVRTC with `-I`.
//!
//! The kernels include `cuda_bf16.h` (and CCCL's `cuda/std/...`), which NVRTC does not bundle.
//! The search order, first hits first:
//! 1. next to the NVRTC library this process loaded (`…/lib/libnvrtc.so.13` → `…/include`: the
//!    pip wheels' `nvidia/cu13/include`, or the toolkit NVRTC came from) — the headers that belong
//!    to the compiler come first;
//! 2. `$CUDA_HOME/include`, `$CUDA_PATH/include`;
//! 3. the standard toolkit installs: `/usr/local/cuda/include`, `/usr/local/cuda-13.0/include`,
//!    `/opt/cuda/include`;
//! 4. next to each `LD_LIBRARY_PATH` entry (`…/lib` → `…/include`);
//! 5. `$VIRTUAL_ENV/lib/python3*/site-packages/nvidia/*/include`.
//!
//! A directory counts when it has `cuda_bf16.h`; its `cccl` subfolder (the pip layout of
//! `nvidia-cuda-cccl`) is added after it when present. [`check_version`] then refuses headers of
//! another CUDA release than NVRTC's (`CUDA_VERSION` of their `cuda.h` against `nvrtcVersion`).

use super::{CudaError, Result};
use std::path::{Path, PathBuf};

/// The include directories found, and every place looked at (for error messages).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IncludeDirs {
    pub dirs: Vec<PathBuf>,
    pub searched: Vec<PathBuf>,
}

impl IncludeDirs {
    /// The `-I` options for NVRTC.
    pub fn options(&self) -> Vec<String> {
        self.dirs.iter().map(|d| format!("-I{}", d.display())).collect()
    }
}

/// The candidate include directories, in search order (see the module header).
/// `var` reads an environment variable; `loaded` are paths of loaded shared libraries.
pub fn candidates(var: &dyn Fn(&str) -> Option<String>, loaded: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for lib in loaded {
        if let Some(dir) = lib.parent().and_then(Path::parent) {
            out.push(dir.join("include"));
        }
    }
    for v in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = var(v).filter(|s| !s.is_empty()) {
            out.push(Path::new(&root).join("include"));
        }
    }
    for root in ["/usr/local/cuda", "/usr/local/cuda-13.0", "/opt/cuda"] {
        out.push(Path::new(root).join("include"));
    }
    if let Some(paths) = var("LD_LIBRARY_PATH") {
        for p in paths.split(':').filter(|p| !p.is_empty()) {
            if let Some(dir) = Path::new(p).parent() {
                out.push(dir.join("include"));
            }
        }
    }
    if let Some(venv) = var("VIRTUAL_ENV").filter(|s| !s.is_empty()) {
        for nvidia in site_packages(Path::new(&venv)).into_iter().map(|sp| sp.join("nvidia")) {
            let mut subdirs: Vec<PathBuf> = std::fs::read_dir(&nvidia)
                .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path().join("include")).collect())
                .unwrap_or_default();
            subdirs.sort();
            out.extend(subdirs);
        }
    }
    out
}

/// `<venv>/lib/python3*/site-packages`.
fn site_packages(venv: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(venv.join("lib"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
                .map(|e| e.path().join("site-packages"))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Keeps the candidates that hold `cuda_bf16.h` (each followed by its `cccl` subfolder when
/// present), without duplicates.
pub fn select(candidates: &[PathBuf]) -> Result<IncludeDirs> {
    let mut found = IncludeDirs::default();
    for c in candidates {
        let canon = c.canonicalize().unwrap_or_else(|_| c.clone());
        if found.searched.contains(&canon) {
            continue;
        }
        found.searched.push(canon.clone());
        if canon.join("cuda_bf16.h").is_file() {
            found.dirs.push(canon.clone());
            let cccl = canon.join("cccl");
            if cccl.is_dir() {
                found.dirs.push(cccl);
            }
        }
    }
    if found.dirs.is_empty() {
        return Err(CudaError::HeadersNotFound { searched: found.searched });
    }
    Ok(found)
}

/// The `(major, minor)` of `CUDA_VERSION` in `dir/cuda.h` (`#define CUDA_VERSION 13000`).
pub fn cuda_version(dir: &Path) -> Option<(i32, i32)> {
    let text = std::fs::read_to_string(dir.join("cuda.h")).ok()?;
    let v: i32 = text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("#define")?.trim_start().strip_prefix("CUDA_VERSION")?;
        rest.trim().parse().ok()
    })?;
    Some((v / 1000, (v % 1000) / 10))
}

/// Refuses headers of another CUDA release than NVRTC's: the first include directory's
/// `CUDA_VERSION` (when it has a `cuda.h`) must be NVRTC's `major.minor`.
pub fn check_version(found: &IncludeDirs, nvrtc: (i32, i32)) -> Result<()> {
    let Some(dir) = found.dirs.first() else { return Ok(()) };
    match cuda_version(dir) {
        Some(v) if v != nvrtc => Err(CudaError::HeaderVersion {
            dir: dir.clone(),
            headers: format!("{}.{}", v.0, v.1),
            nvrtc: format!("{}.{}", nvrtc.0, nvrtc.1),
        }),
        _ => Ok(()),
    }
}

/// Paths of the shared libraries named `stem*` that this process has loaded (`/proc/self/maps`).
pub fn loaded_libraries(stem: &str) -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut out: Vec<PathBuf> = Vec::new();
    for path in maps.lines().filter_map(|l| l.split_whitespace().nth(5)) {
        let p = PathBuf::from(path);
        let is_match =
            p.file_name().map(|f| f.to_string_lossy().starts_with(stem)).unwrap_or(false);
        if is_match && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// The include directories for this process: [`candidates`] from the environment and the loaded
/// NVRTC library, then [`select`].
pub fn discover() -> Result<IncludeDirs> {
    let var = |k: &str| std::env::var(k).ok();
    select(&candidates(&var, &loaded_libraries("libnvrtc")))
}
