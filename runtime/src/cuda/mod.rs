//! `runtime::cuda`: the real-GPU layer, over `cudarc` with every CUDA library loaded at run time.
//!
//! Conventions of this module:
//! - Nothing CUDA is needed to build. Each library (driver, NVRTC, cuBLASLt, NCCL, NVTX) is
//!   probed with cudarc's `is_culib_present` before its first use ([`libs`]), because cudarc
//!   panics when a library is missing; a missing library is a [`CudaError::LibraryMissing`]
//!   that names the library and the package that provides it, never a panic.
//! - Device memory is handed out by the caching allocator ([`alloc`]): size classes, blocks
//!   reused in stream order on the one compute stream, statistics, and an out-of-memory error
//!   that prints them.
//! - Kernels (`kernels-cu/*.cu`) are compiled at run time by NVRTC ([`nvrtc`]) to a cubin for the
//!   device's compute capability, with ptxas's `-v` report kept ([`ptxas`]), and cached on disk
//!   ([`cache`]) by a hash of source, headers, options, arch and NVRTC version. System headers
//!   are discovered by [`headers`].
//! - GEMMs go to cuBLASLt ([`gemm`]): the layouts and descriptors are a pure function of the
//!   row-major GEMM shape, tested against a CPU interpretation of the same column-major layouts.
//! - The SASS of every cubin is read without a GPU ([`sass`]: `cuobjdump -sass`, per-kernel
//!   counts of HMMA, LDSM, 128-bit loads/stores, local memory, barriers).
//! - Telemetry: NVTX ranges and `cuProfilerStart/Stop` ([`profile`]), NVML readings ([`nvml`]).
//!
//! Device pointers are `u64` (`CUdeviceptr`) in this module's public API; the safe owner of a
//! pointer is a [`alloc::Block`] (or a buffer of the `Gpu` layer holding one).

pub mod alloc;
pub mod bundle;
pub mod cache;
mod context;
pub mod gemm;
mod gpu;
pub mod headers;
pub mod libs;
pub mod nvml;
pub mod nvrtc;
pub mod profile;
pub mod ptxas;
pub mod sass;

pub use context::{CudaContext, DeviceInfo, DriverMemory, Event, Function, Module, Stream};
pub use gpu::CudaGpu;

use std::path::PathBuf;

/// Errors of the CUDA layer: each names the call or the library, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library could not be loaded.
    #[error("the CUDA library {lib} was not found ({hint})")]
    LibraryMissing { lib: &'static str, hint: &'static str },
    /// No usable driver (library missing, `cuInit` failed, or no device).
    #[error("no CUDA driver found; use --device cpu ({0})")]
    NoDriver(String),
    /// A CUDA driver call failed.
    #[error("{op}: CUDA driver error {code}")]
    Driver { op: &'static str, code: String },
    /// An NVRTC call (other than the compilation itself) failed.
    #[error("{op}: NVRTC error {code}")]
    NvrtcCall { op: &'static str, code: String },
    /// A kernel source did not compile; `log` is NVRTC's program log.
    #[error("NVRTC could not compile {source_name} for {arch}:\n{log}")]
    Compile { source_name: String, arch: String, log: String },
    /// A cuBLASLt call failed.
    #[error("{op}: cuBLASLt error {code}")]
    Cublas { op: &'static str, code: String },
    /// The allocator could not get memory from the device even after releasing its cache.
    #[error("CUDA out of memory: {0}")]
    OutOfMemory(String),
    /// No CUDA include directory (with `cuda_bf16.h`) was found.
    #[error(
        "no CUDA headers found (looked for cuda_bf16.h in: {}); set CUDA_HOME or install the pip \
         packages nvidia-cuda-runtime and nvidia-cuda-cccl",
        .searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    HeadersNotFound { searched: Vec<PathBuf> },
    /// The headers found belong to another CUDA release than the NVRTC library loaded.
    #[error(
        "the CUDA headers in {} are CUDA {headers}, but NVRTC is {nvrtc}: point CUDA_HOME at the \
         toolkit NVRTC came from (or install the matching nvidia-cuda-runtime and \
         nvidia-cuda-cccl wheels)",
        .dir.display()
    )]
    HeaderVersion { dir: PathBuf, headers: String, nvrtc: String },
    /// The on-disk cubin cache could not be read or written.
    #[error("cubin cache {}: {source}", .path.display())]
    Cache { path: PathBuf, source: std::io::Error },
    /// NVML (telemetry) is unavailable or a query failed.
    #[error("NVML: {0}")]
    Nvml(String),
    /// A bad argument (arch string, shape, dtype, option).
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
}

impl CudaError {
    pub(crate) fn driver(op: &'static str, e: cudarc::driver::result::DriverError) -> Self {
        let name = e.error_name().map(|c| c.to_string_lossy().into_owned());
        let text = e.error_string().map(|c| c.to_string_lossy().into_owned());
        let code = match (name, text) {
            (Ok(n), Ok(t)) => format!("{n}: {t}"),
            _ => format!("{:?}", e.0),
        };
        CudaError::Driver { op, code }
    }
    pub(crate) fn nvrtc(op: &'static str, e: cudarc::nvrtc::result::NvrtcError) -> Self {
        CudaError::NvrtcCall { op, code: format!("{:?}", e.0) }
    }
    pub(crate) fn cublas(op: &'static str, e: cudarc::cublaslt::result::CublasError) -> Self {
        CudaError::Cublas { op, code: format!("{:?}", e.0) }
    }
    /// A status cuBLASLt would return, with why (the emulator's model and our own refusals).
    pub(crate) fn cublas_status(
        op: &'static str,
        status: &str,
        why: impl std::fmt::Display,
    ) -> Self {
        CudaError::Cublas { op, code: format!("{status} ({why})") }
    }
    pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        CudaError::Invalid { op, msg: msg.into() }
    }
}

/// Result alias of the CUDA layer.
pub type Result<T> = std::result::Result<T, CudaError>;
