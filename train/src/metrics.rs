//! The JSONL metrics log and model-FLOPs utilisation.

use crate::trainer::StepLog;
use crate::{Result, TrainError};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `metrics.jsonl`: one JSON object per logged step, appended and flushed line by line. Opened
/// for a run starting at `start_step`, it first drops lines of later steps (written by a run
/// that went on past its last checkpoint), so after a resume every step appears once. Nothing is
/// lost: the dropped lines are appended to `metrics.jsonl.dropped` beside it (fsync'ed) before
/// the log is rewritten to a temporary, fsync'ed and renamed over it.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Invalid(format!("{}: {e}", path.display()))
}

impl MetricsLog {
    pub fn open(path: &Path, start_step: u64) -> Result<MetricsLog> {
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
            let (kept, dropped): (Vec<&str>, Vec<&str>) = text.lines().partition(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= start_step)
            });
            let dropped: Vec<&str> = dropped.into_iter().filter(|l| !l.trim().is_empty()).collect();
            if !dropped.is_empty() {
                let backup = dropped_path(path);
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&backup)
                    .map_err(|e| io(&backup, e))?;
                let mut lines = dropped.join("\n");
                lines.push('\n');
                f.write_all(lines.as_bytes())
                    .and_then(|_| f.sync_all())
                    .map_err(|e| io(&backup, e))?;
                let mut out = kept.join("\n");
                if !out.is_empty() {
                    out.push('\n');
                }
                let tmp = path.with_extension("jsonl.tmp");
                let mut t = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
                t.write_all(out.as_bytes()).and_then(|_| t.sync_all()).map_err(|e| io(&tmp, e))?;
                std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
                if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
                }
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io(path, e))?;
        Ok(MetricsLog { path: path.to_path_buf(), file })
    }

    pub fn write(&mut self, entry: &StepLog) -> Result<()> {
        let mut line = serde_json::to_string(entry).map_err(|e| io(&self.path, e))?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(|e| io(&self.path, e))
    }
}

/// Where `MetricsLog::open` keeps the lines it drops from `path` (`metrics.jsonl.dropped`).
pub fn dropped_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".dropped");
    path.with_file_name(name)
}

/// Reads a metrics log (for plots and tests); lines that are not JSON objects are errors
/// naming their line number.
pub fn read_metrics(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .filter(serde_json::Value::is_object)
                .ok_or_else(|| io(path, format!("line {} is not a JSON object", i + 1)))
        })
        .collect()
}

/// Dense bf16 tensor-core peaks (TFLOP/s) of GPUs by name, for MFU.
pub const GPU_PEAK_TFLOPS: &[(&str, f64)] = &[
    ("H200", 989.0),
    ("H100 SXM", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("V100", 125.0),
];

/// The peak of a GPU from its name (`None` when the table does not know it).
pub fn gpu_peak_tflops(name: &str) -> Option<f64> {
    GPU_PEAK_TFLOPS.iter().find(|(k, _)| name.contains(k)).map(|(_, v)| *v)
}

/// (GHz, f32 FLOP per cycle per core) of this CPU: the clock from /proc/cpuinfo, the FMA width
/// from the ISA (AVX-512: 64, AVX2+FMA: 32).
pub fn cpu_peak_per_core() -> (f64, f64) {
    let mhz = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(2000.0);
    #[cfg(target_arch = "x86_64")]
    let flops = match steel_runtime::cpu::peak::PeakIsa::detect() {
        steel_runtime::cpu::peak::PeakIsa::Avx512 => 64.0,
        steel_runtime::cpu::peak::PeakIsa::Avx2Fma => 32.0,
        steel_runtime::cpu::peak::PeakIsa::Scalar => 8.0,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let flops = 16.0;
    (mhz / 1000.0, flops)
}

/// The peak FLOP/s MFU is measured against: `--peak-tflops` when given, else the CPU estimate
/// for the threads of the current rayon pool.
pub fn peak_flops(peak_tflops: Option<f64>) -> Option<f64> {
    if let Some(p) = peak_tflops {
        return Some(p * 1e12);
    }
    let (ghz, fpc) = cpu_peak_per_core();
    Some(ghz * 1e9 * fpc * rayon::current_num_threads() as f64)
}

/// The dense bf16 peak of a GPU by name in FLOP/s (`GPU_PEAK_TFLOPS`), `None` when unknown.
pub fn gpu_peak_flops(device_name: &str) -> Option<f64> {
    gpu_peak_tflops(device_name).map(|t| t * 1e12)
}

/// The peak a run on `device_name` is measured against: `--peak-tflops`, else a CUDA device's
/// entry in the table (no MFU for an unknown GPU), else (the CPU, and the emulator, which runs on
/// it) the CPU estimate.
pub fn peak_flops_for(device_name: &str, peak_tflops: Option<f64>) -> Option<f64> {
    if let Some(p) = peak_tflops {
        return Some(p * 1e12);
    }
    if device_name.starts_with("cuda:") {
        return gpu_peak_flops(device_name);
    }
    peak_flops(None)
}
