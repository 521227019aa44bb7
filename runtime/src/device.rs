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

/// What the user asked for with `--device auto|cpu|cuda|emu` (DESIGN §4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DeviceRequest {
    /// The GPU when one is usable, otherwise the CPU with a one-line notice.
    #[default]
    Auto,
    Cpu,
    Cuda,
    /// The GPU backend with every kernel run by the CPU emulator (slow: for debugging kernels
    /// and for CI). Needs no GPU.
    Emu,
}

/// The `--help` text of a `--device` flag.
pub const DEVICE_HELP: &str = "auto (the GPU when one is usable, else the CPU), cpu, cuda, or emu \
    (the GPU backend with every kernel run by the CPU emulator: slow, needs no GPU; for \
    debugging kernels and CI)";

impl std::str::FromStr for DeviceRequest {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu" => Ok(DeviceRequest::Cuda),
            "emu" => Ok(DeviceRequest::Emu),
            other => Err(crate::Error::invalid(
                "device",
                format!("unknown device {other:?} (expected auto, cpu, cuda or emu)"),
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
            DeviceRequest::Emu => "emu",
        })
    }
}

/// The device a run will use, and the line to tell the user why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceChoice {
    pub device: Device,
    pub notice: String,
    /// `--device emu`: `device` is the emulated `Cuda(0)`.
    pub emulated: bool,
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
    let cpu = |notice: String| Ok(DeviceChoice { device: Device::Cpu, notice, emulated: false });
    match req {
        DeviceRequest::Cpu => cpu("device: cpu (requested)".into()),
        DeviceRequest::Emu => Ok(DeviceChoice {
            device: Device::Cuda(0),
            notice: "device: emu (the GPU backend, every kernel run by the CPU emulator: slow)"
                .into(),
            emulated: true,
        }),
        DeviceRequest::Auto => match probe_cuda_driver() {
            DriverProbe::Found { devices } if cuda_backend => Ok(DeviceChoice {
                device: Device::Cuda(0),
                notice: format!("device: cuda:0 ({devices} CUDA device(s) found)"),
                emulated: false,
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
                emulated: false,
            }),
        },
    }
}

/// A backend opened for a `--device` request: what the tools compute with.
pub struct Compute {
    backend: std::sync::Arc<dyn crate::Backend>,
    choice: DeviceChoice,
    gpu: Option<std::sync::Arc<dyn crate::gpu::Gpu>>,
    cpu_backends_at_open: usize,
}

impl Compute {
    /// The backend every op of the run goes to.
    pub fn backend(&self) -> std::sync::Arc<dyn crate::Backend> {
        self.backend.clone()
    }

    /// The device and the line that tells the user why (`device: emu (…)`).
    pub fn choice(&self) -> &DeviceChoice {
        &self.choice
    }

    /// The GPU underneath (`None` on the CPU).
    pub fn gpu(&self) -> Option<&std::sync::Arc<dyn crate::gpu::Gpu>> {
        self.gpu.as_ref()
    }

    /// The work given to the GPU so far (`None` on the CPU).
    pub fn counts(&self) -> Option<crate::gpu::LaunchCounts> {
        self.gpu.as_ref().map(|g| g.counts())
    }

    /// `CpuBackend`s constructed since the backend was opened (0 on the GPU path, which proves
    /// that no op fell back to the CPU).
    pub fn cpu_backends_constructed(&self) -> usize {
        crate::cpu::CpuBackend::constructed() - self.cpu_backends_at_open
    }

    /// The end-of-run line of a GPU run: `emu: 1234 kernel launches and 56 GEMMs; no CPU
    /// backend constructed` (`None` on the CPU).
    pub fn summary(&self) -> Option<String> {
        let counts = self.counts()?;
        let name = if self.choice.emulated { "emu" } else { "cuda" };
        let cpu = match self.cpu_backends_constructed() {
            0 => "no CPU backend constructed".to_string(),
            n => format!("{n} CPU backend(s) constructed"),
        };
        Some(format!("{name}: {counts}; {cpu}"))
    }
}

/// Opens the backend `req` asks for: the CPU backend, `GpuBackend<CudaGpu>` on device 0, or
/// `GpuBackend<EmuGpu>` for `emu`. `auto` picks the GPU only when `gpu_ready` (the command's
/// ops all run there); an explicit `cuda` or `emu` always gets the GPU backend, and an op it
/// does not have yet fails with the op's name — nothing falls back to the CPU.
pub fn open_backend(req: DeviceRequest, gpu_ready: bool) -> crate::Result<Compute> {
    use crate::gpu::{EmuGpu, Gpu, GpuBackend};
    use std::sync::Arc;
    let choice = choose_device(req, gpu_ready || req == DeviceRequest::Cuda)?;
    let at_open = crate::cpu::CpuBackend::constructed();
    let (backend, gpu): (Arc<dyn crate::Backend>, Option<Arc<dyn Gpu>>) =
        match (choice.device, choice.emulated) {
            (Device::Cpu, _) => (Arc::new(crate::cpu::CpuBackend::new()), None),
            (Device::Cuda(_), true) => {
                let g = Arc::new(EmuGpu::new());
                (Arc::new(GpuBackend::new(g.clone())), Some(g))
            }
            (Device::Cuda(i), false) => {
                let g = Arc::new(crate::cuda::CudaGpu::new(i)?);
                (Arc::new(GpuBackend::new(g.clone())), Some(g))
            }
        };
    let cpu_backends_at_open =
        if gpu.is_some() { crate::cpu::CpuBackend::constructed() } else { at_open };
    Ok(Compute { backend, choice, gpu, cpu_backends_at_open })
}
