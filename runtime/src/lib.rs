//! Steel's runtime: devices, dtypes, contiguous tensors and the `Backend` op set.
//!
//! The `Backend` trait (see [`backend`]) is the complete list of operations the model and the
//! trainer use, as explicit forward/backward pairs. [`cpu::CpuBackend`] implements all of them in
//! plain Rust (rayon for threads, the `gemm` crate for matrix products); it is the semantic
//! reference every GPU kernel is tested against, and it is deterministic at any thread count.

pub mod backend;
pub mod comm;
pub mod cpu;
pub mod cuda;
mod device;
mod dtype;
mod error;
pub mod gpu;
mod tensor;
pub mod trace;

pub use backend::{
    step_verdict, AdamW, AdamWParam, Backend, CrossEntropy, CrossEntropyOut, ExpertWeights,
    ExpertsOut, Matmul, SoftMoeRoute, Transpose,
};
pub use device::{
    choose_device, open_backend, probe_cuda_driver, Compute, Device, DeviceChoice, DeviceRequest,
    DriverProbe, DEVICE_HELP,
};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use half::bf16;
pub use tensor::{CpuStorage, Tensor};
