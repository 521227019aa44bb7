//! End-to-end tests of the tape over the CPU backend: gradient checks of composed networks,
//! tape mechanics, gradient accumulation, determinism across thread counts and a toy training
//! run. (One test binary: every test binary links the whole dependency tree.)

mod common;
mod gpu_block;
mod gpu_model;
mod model;
mod tape;
mod train;
mod trainer;
mod training;
