//! `steel-export`: a training checkpoint → a HuggingFace model directory.

use anyhow::Context;
use clap::Parser;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use steel_model::{save_hf_dir, ExportOptions, SaveDType};
use steel_runtime::{cpu::CpuBackend, DType};
use steel_train::checkpoint::Checkpoint;

#[derive(Parser)]
#[command(
    name = "steel-export",
    version,
    about = "Export a training checkpoint as a HuggingFace directory (config.json, safetensors, generation_config.json, tokenizer files)",
    after_help = "Example (from the clone; after `cargo install --path bin`, bare `steel-export …` too):\n  cargo run --release --bin steel-export -- --checkpoint runs/demo/checkpoints/step-000250 --out runs/demo/export\n\n\
        The checkpoint's files are verified against its manifest first; a damaged file is named."
)]
struct Args {
    /// A checkpoint directory (…/checkpoints/step-NNNNNN).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The HF directory to write: absent, empty, or a previous export (which is replaced whole).
    /// Never the checkpoint, inside it or around it, and never another directory: a run's
    /// output is refused.
    #[arg(long)]
    out: PathBuf,
    /// Weight dtype of the export.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32"])]
    dtype: String,
    /// Also copy the reference's remote code (configuration_steel.py, modeling_steel.py) from DIR
    /// and set auto_map, so `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` works.
    #[arg(long, value_name = "DIR")]
    remote_code: Option<PathBuf>,
}

fn main() -> ExitCode {
    steel_cli::run("steel-export", || {
        let args = Args::parse();
        // Verified first, then read through its manifest: only listed files, each parsed from
        // the bytes that were hashed.
        let ck = Checkpoint::open(&args.checkpoint)
            .with_context(|| format!("checkpoint {}", args.checkpoint.display()))?;
        check_out(&args.checkpoint, &args.out)?;
        let model = ck.load_model(Arc::new(CpuBackend::new()), DType::F32)?;
        let opts = ExportOptions {
            dtype: if args.dtype == "f32" { SaveDType::F32 } else { SaveDType::BF16 },
            remote_code: args.remote_code.clone(),
            ..ExportOptions::default()
        };
        // Written to a temporary sibling, marked as an export, then renamed into place: a
        // failure leaves the previous export (or nothing) where --out points.
        let tmp = sibling(&args.out, "tmp-export")?;
        let mut copied = Vec::new();
        let written = (|| -> anyhow::Result<()> {
            save_hf_dir(&model, &tmp, &opts)?;
            for name in ["tokenizer.json", "tokenizer_config.json"] {
                if ck.has(name) {
                    let dst = tmp.join(name);
                    std::fs::write(&dst, ck.read(name)?).with_context(|| {
                        format!("copying {} to {}", ck.path(name).display(), dst.display())
                    })?;
                    copied.push(name);
                }
            }
            let marker = tmp.join(MARKER);
            std::fs::write(&marker, format!("exported from {}\n", args.checkpoint.display()))
                .with_context(|| format!("writing {}", marker.display()))?;
            Ok(())
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        replace_dir(&tmp, &args.out)?;
        println!(
            "exported {} parameters ({}) to {}{}",
            model.config.num_params(),
            args.dtype,
            args.out.display(),
            if copied.is_empty() {
                " (the checkpoint has no tokenizer files)".to_string()
            } else {
                format!(" with {}", copied.join(", "))
            }
        );
        Ok(())
    })
}

/// The file that marks a directory as an export (so a re-export may replace it).
const MARKER: &str = ".steel-export";

/// `path` made absolute and free of `.`, `..` and symlinks, also when its last components do
/// not exist yet (the existing ancestor is canonicalized, the rest appended).
fn resolve(path: &Path) -> anyhow::Result<PathBuf> {
    let abs =
        if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) };
    let mut existing = abs.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = existing.canonicalize().with_context(|| format!("{}", existing.display()))?;
    for c in rest.iter().rev() {
        match Path::new(c).components().next() {
            Some(Component::ParentDir) => {
                out.pop();
            }
            Some(Component::CurDir) | None => {}
            _ => out.push(c),
        }
    }
    Ok(out)
}

/// Refuses an `--out` that is the checkpoint, lies inside it or contains it, or is a directory
/// with contents that is not a previous export.
fn check_out(checkpoint: &Path, out: &Path) -> anyhow::Result<()> {
    let (c, o) = (resolve(checkpoint)?, resolve(out)?);
    if o == c || o.starts_with(&c) || c.starts_with(&o) {
        anyhow::bail!(
            "--out {} {} the checkpoint {}: export to a directory of its own (e.g. {})",
            out.display(),
            if o == c {
                "is"
            } else if o.starts_with(&c) {
                "lies inside"
            } else {
                "contains"
            },
            checkpoint.display(),
            c.parent().and_then(Path::parent).unwrap_or(&c).join("export").display()
        );
    }
    if o.exists() {
        if !o.is_dir() {
            anyhow::bail!("--out {} exists and is not a directory", out.display());
        }
        let empty = std::fs::read_dir(&o)?.next().is_none();
        if !empty && !o.join(MARKER).is_file() {
            anyhow::bail!(
                "--out {} already holds files and is not a previous export (it has no {MARKER}): \
                 choose an absent or empty directory",
                out.display()
            );
        }
    }
    Ok(())
}

/// A fresh sibling path of `out` for `what` (`<out>.<what>-<pid>`).
fn sibling(out: &Path, what: &str) -> anyhow::Result<PathBuf> {
    let name = out
        .file_name()
        .with_context(|| format!("--out {} must name a directory", out.display()))?
        .to_string_lossy()
        .into_owned();
    let p = out.with_file_name(format!("{name}.{what}-{}", std::process::id()));
    if p.exists() {
        std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(p)
}

/// Puts the finished `tmp` at `out`: an empty directory or a previous export there is moved
/// aside first and removed once the new export is in place.
fn replace_dir(tmp: &Path, out: &Path) -> anyhow::Result<()> {
    let old = if out.exists() {
        let old = sibling(out, "old-export")?;
        std::fs::rename(out, &old).with_context(|| format!("moving {} aside", out.display()))?;
        Some(old)
    } else {
        None
    };
    std::fs::rename(tmp, out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    if let Some(old) = old {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}
