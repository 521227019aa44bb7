//! Run-time discovery of the CUDA libraries, before cudarc touches them.
//!
//! cudarc loads each library lazily on its first call and panics when it is missing; every
//! entry point of this crate therefore asks [`require`] first, which uses cudarc's own
//! `is_culib_present` (the same candidate names cudarc will load) and turns absence into a
//! [`CudaError::LibraryMissing`]. Results are memoised per process: `dlopen` finds the same
//! libraries for the life of a process (`LD_LIBRARY_PATH` is read once, at start-up).

use super::{CudaError, Result};
use crate::DriverProbe;
use std::sync::OnceLock;

/// A CUDA library that Steel loads at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CudaLib {
    /// `libcuda.so.1`, installed with the NVIDIA driver.
    Driver,
    /// `libnvrtc.so.13` (+ `libnvrtc-builtins`), the run-time kernel compiler.
    Nvrtc,
    /// `libcublasLt.so.13`, the GEMM library.
    CublasLt,
    /// `libnccl.so.2`, collectives.
    Nccl,
    /// `libnvToolsExt.so.1`, NVTX ranges for Nsight Systems (optional: ranges are no-ops without).
    Nvtx,
}

impl CudaLib {
    /// Every library, in the order `steel-bench`'s reports list them.
    pub const ALL: [CudaLib; 5] =
        [CudaLib::Driver, CudaLib::Nvrtc, CudaLib::CublasLt, CudaLib::Nccl, CudaLib::Nvtx];

    /// The library's file name stem.
    pub fn name(self) -> &'static str {
        match self {
            CudaLib::Driver => "libcuda",
            CudaLib::Nvrtc => "libnvrtc",
            CudaLib::CublasLt => "libcublasLt",
            CudaLib::Nccl => "libnccl",
            CudaLib::Nvtx => "libnvToolsExt",
        }
    }

    /// Where the library comes from, for error messages.
    pub fn hint(self) -> &'static str {
        match self {
            CudaLib::Driver => {
                "it is installed with the NVIDIA driver; use --device cpu without one"
            }
            CudaLib::Nvrtc => {
                "pip install 'nvidia-cuda-nvrtc==13.0.*' and put its nvidia/cu13/lib on \
                 LD_LIBRARY_PATH, or install the CUDA toolkit"
            }
            CudaLib::CublasLt => {
                "pip install 'nvidia-cublas==13.0.*' (or use a PyTorch virtualenv) and put its \
                 nvidia/*/lib on LD_LIBRARY_PATH"
            }
            CudaLib::Nccl => {
                "pip install nvidia-nccl-cu13 and put its nvidia/nccl/lib on LD_LIBRARY_PATH"
            }
            CudaLib::Nvtx => "pip install nvidia-nvtx and put its nvidia/*/lib on LD_LIBRARY_PATH",
        }
    }

    fn slot(self) -> &'static OnceLock<bool> {
        static SLOTS: [OnceLock<bool>; 5] =
            [OnceLock::new(), OnceLock::new(), OnceLock::new(), OnceLock::new(), OnceLock::new()];
        &SLOTS[self as usize]
    }

    /// Whether cudarc will find this library (memoised).
    pub fn is_present(self) -> bool {
        *self.slot().get_or_init(|| {
            // SAFETY: each `is_culib_present` only tries `dlopen` on cudarc's candidate names
            // (running the library's initialisers, as any use of it would) and closes it again.
            unsafe {
                match self {
                    CudaLib::Driver => cudarc::driver::sys::is_culib_present(),
                    CudaLib::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                    CudaLib::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
                    CudaLib::Nccl => cudarc::nccl::sys::is_culib_present(),
                    CudaLib::Nvtx => cudarc::nvtx::sys::is_culib_present(),
                }
            }
        })
    }
}

/// `Ok` when `lib` can be loaded, else the error naming it and where it comes from.
pub fn require(lib: CudaLib) -> Result<()> {
    if lib.is_present() {
        Ok(())
    } else {
        Err(CudaError::LibraryMissing { lib: lib.name(), hint: lib.hint() })
    }
}

/// Probes the driver: library present, `cuInit` succeeds, at least one device. Never panics.
pub fn probe_driver() -> DriverProbe {
    static PROBE: OnceLock<DriverProbe> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            if !CudaLib::Driver.is_present() {
                return DriverProbe::Missing("libcuda.so.1 is not installed".into());
            }
            if let Err(e) = cudarc::driver::result::init() {
                return DriverProbe::Missing(format!(
                    "cuInit failed: {}",
                    CudaError::driver("cuInit", e)
                ));
            }
            match cudarc::driver::result::device::get_count() {
                Ok(n) if n > 0 => DriverProbe::Found { devices: n as usize },
                Ok(_) => DriverProbe::Missing("the driver reports no devices".into()),
                Err(e) => {
                    DriverProbe::Missing(CudaError::driver("cuDeviceGetCount", e).to_string())
                }
            }
        })
        .clone()
}

/// `Ok(devices)` when a driver with at least one device is usable, else [`CudaError::NoDriver`].
pub fn require_driver() -> Result<usize> {
    match probe_driver() {
        DriverProbe::Found { devices } => Ok(devices),
        DriverProbe::Missing(why) => Err(CudaError::NoDriver(why)),
    }
}

/// One line per library: found or missing (for `steel-bench` and gpu-check reports).
pub fn report() -> Vec<(CudaLib, bool)> {
    CudaLib::ALL.iter().map(|&l| (l, l.is_present())).collect()
}
