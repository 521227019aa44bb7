//! NVML readings for the training log: memory, utilisation, power and temperature of a GPU.
//!
//! `libnvidia-ml.so.1` ships with the driver and is loaded at run time by `nvml-wrapper`; on a
//! machine without it, [`NvmlReader::new`] is an error that says so (never a panic), and the
//! trainer simply logs no telemetry. Each reading queries the device afresh; a field the device
//! does not report (e.g. power on some boards) is `None` rather than an error.

use super::{CudaError, Result};
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::Nvml;
use std::fmt;

/// One reading of one GPU.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuReading {
    pub name: String,
    /// Device memory in use, bytes (all processes).
    pub memory_used: u64,
    pub memory_total: u64,
    /// Percent of the last sample period a kernel was running.
    pub utilization_gpu: Option<u32>,
    /// Percent of the last sample period device memory was read or written.
    pub utilization_memory: Option<u32>,
    /// Board power draw, watts.
    pub power_w: Option<f64>,
    /// GPU die temperature, °C.
    pub temperature_c: Option<u32>,
}

impl fmt::Display for GpuReading {
    /// `gpu mem 61.2/139.8 GiB util 98% (mem 71%) 612 W 63 C` (fields the device lacks show `-`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let pct = |v: Option<u32>| v.map(|v| format!("{v}%")).unwrap_or_else(|| "-".into());
        write!(
            f,
            "gpu mem {:.1}/{:.1} GiB util {} (mem {}) {} {}",
            gib(self.memory_used),
            gib(self.memory_total),
            pct(self.utilization_gpu),
            pct(self.utilization_memory),
            self.power_w.map(|w| format!("{w:.0} W")).unwrap_or_else(|| "- W".into()),
            self.temperature_c.map(|t| format!("{t} C")).unwrap_or_else(|| "- C".into()),
        )
    }
}

/// An initialised NVML and the index of the GPU to read.
pub struct NvmlReader {
    nvml: Nvml,
    index: u32,
}

impl NvmlReader {
    /// Loads NVML and checks that GPU `index` exists.
    pub fn new(index: u32) -> Result<NvmlReader> {
        let nvml = Nvml::init().map_err(|e| {
            CudaError::Nvml(format!(
                "cannot initialise NVML ({e}); libnvidia-ml.so.1 is installed with the NVIDIA driver"
            ))
        })?;
        let count =
            nvml.device_count().map_err(|e| CudaError::Nvml(format!("device count: {e}")))?;
        if index >= count {
            return Err(CudaError::Nvml(format!("no GPU {index} ({count} found)")));
        }
        Ok(NvmlReader { nvml, index })
    }

    /// Reads the GPU now.
    pub fn read(&self) -> Result<GpuReading> {
        let dev = self
            .nvml
            .device_by_index(self.index)
            .map_err(|e| CudaError::Nvml(format!("GPU {}: {e}", self.index)))?;
        let mem = dev.memory_info().map_err(|e| CudaError::Nvml(format!("memory info: {e}")))?;
        let util = dev.utilization_rates().ok();
        Ok(GpuReading {
            name: dev.name().unwrap_or_else(|_| format!("GPU {}", self.index)),
            memory_used: mem.used,
            memory_total: mem.total,
            utilization_gpu: util.as_ref().map(|u| u.gpu),
            utilization_memory: util.as_ref().map(|u| u.memory),
            power_w: dev.power_usage().ok().map(|mw| mw as f64 / 1000.0),
            temperature_c: dev.temperature(TemperatureSensor::Gpu).ok(),
        })
    }
}
