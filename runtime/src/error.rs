//! Errors of the runtime: every variant names the op (or function) and what a caller can fix.

use crate::{DType, Device};

/// Result alias used throughout the runtime.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Shapes that do not fit together; the message gives the shapes involved.
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },
    /// A dtype the op does not accept (on this backend).
    #[error("{op}: unsupported dtype {dtype} ({msg})")]
    DType { op: &'static str, dtype: DType, msg: String },
    /// A tensor that lives on another device than the backend that was asked to use it.
    #[error("{op}: tensor is on {found} but the backend runs on {expected}")]
    Device { op: &'static str, expected: Device, found: Device },
    /// Any other invalid argument (out-of-range index, aliasing outputs, bad option).
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    /// A `Gpu` operation failed: a kernel launch the emulator rejected (the message names the
    /// kernel: deadlocked barrier, misused warp collective, bad configuration), or an op the GPU
    /// backend does not implement yet.
    #[error("{op}: {msg}")]
    Gpu { op: &'static str, msg: String },
    /// The CUDA layer failed (library missing, driver call, compile, out of memory, ...).
    #[error(transparent)]
    Cuda(#[from] crate::cuda::CudaError),
}

impl Error {
    pub(crate) fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape { op, msg: msg.into() }
    }
    pub(crate) fn dtype(op: &'static str, dtype: DType, msg: impl Into<String>) -> Self {
        Error::DType { op, dtype, msg: msg.into() }
    }
    pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Invalid { op, msg: msg.into() }
    }
    pub(crate) fn gpu(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Gpu { op, msg: msg.into() }
    }
}
