//! The kernels of kernels-cu on the emulated GPU (`EmuGpu`), against the CPU reference, through
//! the production launchers and `GpuBackend`. Every test name starts with `emu_`, so
//! `cargo test emu` selects them. The same test bodies run on the real device as `cuda_*` tests
//! when `STEEL_DEVICE=cuda` (they return at once otherwise); only the launch-log assertions are
//! emulator-only.
//!
//! - Property tests: ragged shapes (not multiples of 8, 32 or 64), values in ±[0.1, 1] (never
//!   zero), outputs poisoned beforehand (every emulated allocation starts as NaN bytes, and
//!   accumulated gradients start from random non-zero values), and the launch log checked so
//!   nothing can route around the kernel. Each emulated case runs twice, under round-robin and
//!   under a second schedule drawn from its seed (reversed, warp-major or seeded random), with
//!   the memory checker on, and the two runs must agree bit for bit (`on_two_schedules`).
//! - Tolerances (DESIGN §4, ‖out − ref‖ / ‖ref‖): fp32 outputs ≤ 1e-5; bf16 outputs ≤ 1e-2 (the
//!   mma GEMM's inputs are bf16 but exactly representable in f32 and its output is fp32, so it
//!   is held to 1e-5).
//! - Emulator semantics: warp shuffles/ballot/any/all, atomics, block reductions, dynamic shared
//!   memory and ldmatrix against hand-computed values; a barrier not every thread reaches is an
//!   error naming the kernel.

pub(crate) use crate::common::*;
use proptest::prelude::*;
use std::sync::Arc;
use steel_runtime::cpu::CpuBackend;
use steel_runtime::cuda::CudaGpu;
use steel_runtime::gpu::{lm_head_ce::vocab_block, rms_norm::row_block};
use steel_runtime::gpu::{Dim3, EmuGpu, Gpu, GpuBackend, LaunchConfig, LaunchRecord, Schedule};
use steel_runtime::{bf16, AdamW, AdamWParam, Backend, CrossEntropy, DType, Tensor};

const F32_TOL: f64 = 1e-5;
const BF16_TOL: f64 = 1e-2;

/// A device under test: a `Gpu`, and its launch/NVTX logs when it keeps them.
trait TestGpu: Gpu {
    fn launch_log(&self) -> Option<Vec<LaunchRecord>>;
    fn nvtx_log(&self) -> Option<Vec<String>>;
}

impl TestGpu for EmuGpu {
    fn launch_log(&self) -> Option<Vec<LaunchRecord>> {
        Some(self.launches())
    }
    fn nvtx_log(&self) -> Option<Vec<String>> {
        Some(self.nvtx_ranges())
    }
}

impl TestGpu for CudaGpu {
    fn launch_log(&self) -> Option<Vec<LaunchRecord>> {
        None
    }
    fn nvtx_log(&self) -> Option<Vec<String>> {
        None
    }
}

fn emu() -> GpuBackend<EmuGpu> {
    GpuBackend::new(Arc::new(EmuGpu::new()))
}

fn emu_with(schedule: Schedule) -> GpuBackend<EmuGpu> {
    GpuBackend::new(Arc::new(EmuGpu::new().with_schedule(schedule)))
}

/// What a check produced: every output tensor's values, as bits.
type Outputs = Vec<Vec<u64>>;

/// Runs `check` on the emulator under round-robin and under a second schedule chosen by `seed`,
/// and requires bit-identical outputs: our kernels are deterministic, so no legal order of a
/// block's threads may change a bit.
fn on_two_schedules(seed: u64, check: impl Fn(&GpuBackend<EmuGpu>) -> Outputs) {
    let second = match seed % 3 {
        0 => Schedule::Reverse,
        1 => Schedule::WarpMajor,
        _ => Schedule::Random(seed),
    };
    let a = check(&emu_with(Schedule::RoundRobin));
    let b = check(&emu_with(second));
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let diff = x.iter().zip(y).position(|(p, q)| p != q);
        assert!(diff.is_none(), "output {i} differs between schedules rr and {second} at {diff:?}");
    }
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The real device when `STEEL_DEVICE=cuda` (outputs poisoned), else `None`.
fn cuda() -> Option<GpuBackend<CudaGpu>> {
    if std::env::var("STEEL_DEVICE").ok().as_deref() != Some("cuda") {
        return None;
    }
    let gpu = CudaGpu::new(0).unwrap_or_else(|e| panic!("STEEL_DEVICE=cuda but: {e}"));
    Some(GpuBackend::with_poisoned_outputs(Arc::new(gpu)))
}

fn cpu() -> CpuBackend {
    CpuBackend::new()
}

fn f32_rand(shape: &[usize], seed: u64) -> Tensor {
    rand_tensor_dt(shape, DType::F32, seed)
}

fn down<G: TestGpu>(g: &GpuBackend<G>, t: &Tensor) -> Vec<f64> {
    vals(&g.download(t).unwrap())
}

fn symbols(log: &[LaunchRecord]) -> Vec<&'static str> {
    log.iter().map(|r| r.symbol).collect()
}

mod adamw;
mod attention;
mod coverage;
mod elementwise;
mod embedding;
mod emulator;
mod experts;
mod l2_normalize;
mod layout;
mod lm_head_ce;
mod matmul;
mod mma_gemm;
mod rms_norm;
mod rope;
mod soft_moe;
mod softmax;

pub(crate) use emulator::launch_raw;
use lm_head_ce::check_lm_head_ce;
use rms_norm::check_add_rms_norm;

/// The same at the model's widths on the device (`STEEL_DEVICE=cuda`): the softmax-CE kernels at
/// their declared `__launch_bounds__(1024)`.
#[test]
fn cuda_kernels_at_model_widths() {
    if let Some(g) = cuda() {
        check_lm_head_ce(&g, 3, 8, 151_936, 2, 3, 11);
        check_add_rms_norm(&g, 3, 1792, true, 12);
    }
}

/// The model's real widths once per run: the 151,936-class vocabulary (1024-thread rows, many
/// elements per thread) and hidden 1792 (7-warp rows).
#[test]
fn emu_kernels_at_model_widths() {
    on_two_schedules(11, |g| check_lm_head_ce(g, 3, 8, 151_936, 2, 3, 11));
    on_two_schedules(12, |g| check_add_rms_norm(g, 3, 1792, true, 12));
    assert_eq!(vocab_block(151_936), 1024);
    assert_eq!(row_block(1792), 224);
}
