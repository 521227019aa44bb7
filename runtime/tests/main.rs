//! The runtime's integration tests, as one binary (one link of the dependency tree):
//! finite-difference gradient checks of every backward op, forward ops against scalar formulas,
//! error handling, AdamW against PyTorch's formula, and bit-identical results at any thread
//! count. All on `steel_runtime::cpu::CpuBackend`.
//!
//! `PROPTEST_CASES` sets the number of cases of every property test (defaults 24–32).

mod adamw;
mod comm;
mod common;
mod cuda;
mod determinism;
mod errors;
mod forward;
mod gpu_kernels;
mod grad_check;
