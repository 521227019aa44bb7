//! The runtime's integration tests, as one binary (one link of the dependency tree):
//! finite-difference gradient checks of every backward op, forward ops against scalar formulas,
//! error handling, AdamW against PyTorch's formula, and bit-identical results at any thread
//! count on `steel_runtime::cpu::CpuBackend`; the GPU kernels on the emulator (and on a device
//! with `STEEL_DEVICE=cuda`), and the emulator's own detectors.
//!
//! `PROPTEST_CASES` sets the number of cases of every property test (defaults 24–32).

mod adamw;
mod comm;
mod common;
mod cuda;
mod determinism;
mod emu_checks;
mod errors;
mod forward;
mod gpu;
mod grad_check;
