//! Where a tensor lives.

use std::fmt;

/// A compute device. `Cuda(i)` is the i-th CUDA device (or its emulation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// What the user asked for with `--device auto|cpu|cuda` (DESIGN §4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DeviceRequest {
    /// The GPU when one is usable, otherwise the CPU with a one-line notice.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl std::str::FromStr for DeviceRequest {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu" => Ok(DeviceRequest::Cuda),
            other => Err(crate::Error::invalid(
                "device",
                format!("unknown device {other:?} (expected auto, cpu or cuda)"),
            )),
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceRequest::Auto => "auto",
            DeviceRequest::Cpu => "cpu",
            DeviceRequest::Cuda => "cuda",
        })
    }
}

/// The device a run will use, and the line to tell the user why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceChoice {
    pub device: Device,
    pub notice: String,
}

/// What probing the CUDA driver found: the number of devices, or why there is no usable driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriverProbe {
    Found { devices: usize },
    Missing(String),
}

/// Looks for the CUDA driver library at run time (never at build time, never panicking) with
/// cudarc's own `is_culib_present`, then initialises it and asks how many devices there are.
/// The answer is memoised for the process.
pub fn probe_cuda_driver() -> DriverProbe {
    crate::cuda::libs::probe_driver()
}

/// Resolves `--device` as DESIGN §4 says: `cpu` is the CPU; `auto` the GPU when one is usable,
/// else the CPU with a notice; an explicit `cuda` without a driver is an error whose message is
/// "no CUDA driver found; use --device cpu" (binaries exit 2 on it).
///
/// `cuda_backend` says whether this build can run the requested work on a GPU; while it cannot,
/// `auto` falls back to the CPU and says so, and `cuda` is an error that says so.
pub fn choose_device(req: DeviceRequest, cuda_backend: bool) -> crate::Result<DeviceChoice> {
    let cpu = |notice: String| Ok(DeviceChoice { device: Device::Cpu, notice });
    match req {
        DeviceRequest::Cpu => cpu("device: cpu (--device cpu)".into()),
        DeviceRequest::Auto => match probe_cuda_driver() {
            DriverProbe::Found { devices } if cuda_backend => Ok(DeviceChoice {
                device: Device::Cuda(0),
                notice: format!("device: cuda:0 ({devices} CUDA device(s) found)"),
            }),
            DriverProbe::Found { devices } => cpu(format!(
                "device: cpu ({devices} CUDA device(s) found, but this command has no CUDA \
                 path yet)"
            )),
            DriverProbe::Missing(why) => cpu(format!("device: cpu (no CUDA driver: {why})")),
        },
        DeviceRequest::Cuda => match probe_cuda_driver() {
            DriverProbe::Missing(_) => Err(crate::Error::invalid(
                "device",
                "no CUDA driver found; use --device cpu".to_string(),
            )),
            DriverProbe::Found { .. } if !cuda_backend => Err(crate::Error::invalid(
                "device",
                "a CUDA driver is present, but this command has no CUDA path yet; use --device cpu"
                    .to_string(),
            )),
            DriverProbe::Found { devices } => Ok(DeviceChoice {
                device: Device::Cuda(0),
                notice: format!("device: cuda:0 ({devices} CUDA device(s) found)"),
            }),
        },
    }
}
