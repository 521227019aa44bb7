//! Pre-compiled kernel bundles: cubins built on one machine and loaded on another without NVRTC.
//!
//! `steel-bench kernels --compile-only --arch sm_90 --export DIR` writes one `<stem>.<arch>.cubin`
//! per `.cu` source and a `manifest.txt` with one line per source:
//!
//! ```text
//! <source file> <arch> <source digest> <cubin file>
//! ```
//!
//! The source digest is the BLAKE3 hash of the source and of every kernel header (name and
//! text) — not of NVRTC's version or include paths, which differ between the build machine and
//! the GPU machine. A loader ([`load`]) accepts a cubin only when its digest matches the sources
//! embedded in the running binary, so a stale bundle is an error rather than wrong kernels.
//! `scripts/gpu-check.sh` carries such a bundle to a GPU machine (`STEEL_CUBINS=DIR`).

use super::{CudaError, Result};
use std::path::Path;

/// The file listing a bundle's cubins.
pub const MANIFEST: &str = "manifest.txt";

/// The digest that ties a cubin to its source and the kernel headers.
pub fn source_digest(source: &str, headers: &[(&str, &str)]) -> String {
    let mut h = blake3::Hasher::new();
    for part in std::iter::once(("", source)).chain(headers.iter().copied()) {
        h.update(&(part.0.len() as u64).to_le_bytes());
        h.update(part.0.as_bytes());
        h.update(&(part.1.len() as u64).to_le_bytes());
        h.update(part.1.as_bytes());
    }
    h.finalize().to_hex().to_string()
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CudaError + '_ {
    move |source| CudaError::Cache { path: path.to_path_buf(), source }
}

/// Writes a bundle: `cubins` are `(source file, source text, cubin)` compiled for `arch`.
pub fn write(
    dir: &Path,
    arch: &str,
    headers: &[(&str, &str)],
    cubins: &[(&str, &str, &[u8])],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut manifest = String::new();
    for (name, text, cubin) in cubins {
        let stem = name.strip_suffix(".cu").unwrap_or(name);
        let file = format!("{stem}.{arch}.cubin");
        let path = dir.join(&file);
        std::fs::write(&path, cubin).map_err(io(&path))?;
        manifest.push_str(&format!("{name} {arch} {} {file}\n", source_digest(text, headers)));
    }
    let path = dir.join(MANIFEST);
    std::fs::write(&path, manifest).map_err(io(&path))
}

/// Loads the cubins of `sources` for `arch` from a bundle, checking each source digest.
/// Returns `(source file, cubin)` in the order of `sources`.
pub fn load(
    dir: &Path,
    arch: &str,
    sources: &[(&str, &str)],
    headers: &[(&str, &str)],
) -> Result<Vec<(String, Vec<u8>)>> {
    let mpath = dir.join(MANIFEST);
    let manifest = std::fs::read_to_string(&mpath).map_err(io(&mpath))?;
    let mut out = Vec::with_capacity(sources.len());
    for (name, text) in sources {
        let want = source_digest(text, headers);
        let line = manifest
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() == 4 && f[0] == *name && f[1] == arch)
            .ok_or_else(|| {
                CudaError::invalid(
                    "kernel bundle",
                    format!("{} has no {arch} cubin for {name}", mpath.display()),
                )
            })?;
        if line[2] != want {
            return Err(CudaError::invalid(
                "kernel bundle",
                format!(
                    "the {arch} cubin of {name} in {} was built from other sources; rebuild it \
                     (scripts/gpu-check.sh build)",
                    dir.display()
                ),
            ));
        }
        let path = dir.join(line[3]);
        let cubin = std::fs::read(&path).map_err(io(&path))?;
        out.push((name.to_string(), cubin));
    }
    Ok(out)
}
