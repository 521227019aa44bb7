//! Shared pieces of Steel's command-line tools.

pub mod data_cli;
pub mod emu_diff;
pub mod eval_mc;
pub mod fuzz;
pub mod generation;

use anyhow::Context;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use steel_model::SteelModel;
use steel_runtime::{Backend, DType};
use steel_train::checkpoint::Checkpoint;

/// Whether `dir` is a training checkpoint (it has a manifest) rather than a HF model directory.
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join("manifest.json").symlink_metadata().is_ok()
}

/// Loads the model of `dir` on `backend` (F32): a training checkpoint is verified and read
/// through its manifest (every file checked, the weights parsed from the bytes that were
/// hashed); a HF model directory is loaded as HF lays it out.
pub fn load_model(dir: &Path, backend: Arc<dyn Backend>) -> anyhow::Result<SteelModel> {
    if is_checkpoint(dir) {
        let ck = Checkpoint::open(dir).with_context(|| format!("checkpoint {}", dir.display()))?;
        Ok(ck.load_model(backend, DType::F32)?)
    } else {
        Ok(steel_model::load_hf_dir(dir, backend, DType::F32)?)
    }
}

/// Runs a tool's body: on error prints one line naming the cause and exits with status 2
/// (user mistakes never end in a panic or a backtrace).
pub fn run(tool: &str, body: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{tool}: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Parses a comma-separated list of token ids ("1,2,3").
pub fn parse_ids(s: &str) -> anyhow::Result<Vec<i64>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse::<i64>()
                .map_err(|_| anyhow::anyhow!("{x:?} in --ids is not an integer token id"))
        })
        .collect()
}

/// Human-readable byte counts (GiB with two decimals).
pub fn gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes / (1u64 << 30) as f64)
}

/// A rayon pool of `threads` threads (default: every core), and that count.
pub fn thread_pool(threads: Option<usize>) -> anyhow::Result<(rayon::ThreadPool, usize)> {
    if threads == Some(0) {
        anyhow::bail!("--threads must be at least 1");
    }
    let n = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(|e| anyhow::anyhow!("building a pool of {n} threads: {e}"))?;
    Ok((pool, n))
}

/// A spinner for long work, showing elapsed time and a message.
pub fn spinner() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar
}

/// `--device`, the same flag in every tool.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Where to compute: auto, cpu, cuda or emu (the GPU backend with every kernel run by the CPU
    /// emulator: slow, needs no GPU; for debugging kernels and for CI).
    #[arg(long, default_value = "auto", long_help = steel_runtime::DEVICE_HELP)]
    pub device: String,
}

impl DeviceArgs {
    /// Opens the backend and prints its `device: …` line (stderr). `gpu_ready`: whether this
    /// tool's ops all run on the GPU backend yet, so `auto` may pick a GPU.
    pub fn open(&self, gpu_ready: bool) -> anyhow::Result<DeviceRun> {
        let req: steel_runtime::DeviceRequest = self.device.parse()?;
        let compute = steel_runtime::open_backend(req, gpu_ready)?;
        eprintln!("{}", compute.choice().notice);
        Ok(DeviceRun { compute })
    }
}

/// The backend of a run. On a GPU (`cuda`, `emu`) it prints, when the run ends (also on an
/// error), how many kernels and GEMMs it launched and whether any CPU backend was constructed:
/// `emu: 1234 kernel launches and 56 GEMMs; no CPU backend constructed`.
pub struct DeviceRun {
    compute: steel_runtime::Compute,
}

impl DeviceRun {
    pub fn backend(&self) -> std::sync::Arc<dyn steel_runtime::Backend> {
        self.compute.backend()
    }
    pub fn compute(&self) -> &steel_runtime::Compute {
        &self.compute
    }
}

impl Drop for DeviceRun {
    fn drop(&mut self) {
        if let Some(line) = self.compute.summary() {
            eprintln!("{line}");
        }
    }
}
