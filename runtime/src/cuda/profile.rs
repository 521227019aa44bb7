//! Profiling hooks: NVTX ranges and the profiler's capture window.
//!
//! - [`range`] opens an NVTX range closed when the guard drops; launchers and layers wrap their
//!   work in one, so Nsight Systems shows `rms_norm_fwd_bf16` over its kernel. Without
//!   `libnvToolsExt` (or with `STEEL_NVTX=0`) a range costs one memoised branch and does nothing.
//! - [`profiler_start`]/[`profiler_stop`] are `cuProfilerStart/Stop`, the driver API's
//!   `cudaProfilerStart/Stop`, which `nsys profile --capture-range=cudaProfilerApi` waits for.
//!   [`ProfileWindow`] turns the trainer's `--profile-steps A:B` into those calls.

use super::libs::{self, CudaLib};
use super::{CudaError, Result};
use std::sync::OnceLock;

fn nvtx_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("STEEL_NVTX").map(|v| v != "0").unwrap_or(true) && CudaLib::Nvtx.is_present()
    })
}

/// An open NVTX range; dropping it closes the range.
#[must_use = "the range closes when this guard is dropped"]
pub struct Range(Option<cudarc::nvtx::Range>);

impl Range {
    /// Whether the range was really opened (NVTX present).
    pub fn is_recording(&self) -> bool {
        self.0.is_some()
    }
}

/// Opens an NVTX range named `name` (a no-op without NVTX). A name with a NUL byte is cut there.
pub fn range(name: &str) -> Range {
    if !nvtx_enabled() {
        return Range(None);
    }
    let name = name.split('\0').next().unwrap_or_default();
    Range(Some(cudarc::nvtx::Event::message(name).range()))
}

/// Pushes a nested NVTX range on this thread (a no-op without NVTX); [`pop`] closes it.
pub fn push(name: &str) {
    if nvtx_enabled() {
        cudarc::nvtx::result::range_push(name.split('\0').next().unwrap_or_default());
    }
}

/// Closes the innermost range opened by [`push`] on this thread.
pub fn pop() {
    if nvtx_enabled() {
        cudarc::nvtx::result::range_pop();
    }
}

/// `cuProfilerStart`: begins the profiler's capture (needs a current context).
pub fn profiler_start() -> Result<()> {
    libs::require(CudaLib::Driver)?;
    // SAFETY: the driver library is present; the call takes no arguments.
    unsafe { cudarc::driver::sys::cuProfilerStart() }
        .result()
        .map_err(|e| CudaError::driver("cuProfilerStart", e))
}

/// `cuProfilerStop`: ends the capture and flushes the profiler's buffers.
pub fn profiler_stop() -> Result<()> {
    libs::require(CudaLib::Driver)?;
    // SAFETY: as `profiler_start`.
    unsafe { cudarc::driver::sys::cuProfilerStop() }
        .result()
        .map_err(|e| CudaError::driver("cuProfilerStop", e))
}

/// What to do with the profiler around a training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileAction {
    /// Call [`profiler_start`] before the step.
    Start,
    /// Call [`profiler_stop`] after the step.
    Stop,
}

/// The steps `first..=last` to capture (`--profile-steps 10:12`, `10..12` or `10`; steps count
/// from 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProfileWindow {
    pub first: u64,
    pub last: u64,
}

impl std::str::FromStr for ProfileWindow {
    type Err = CudaError;
    fn from_str(s: &str) -> Result<ProfileWindow> {
        let num = |t: &str| {
            t.trim().parse::<u64>().map_err(|_| {
                CudaError::invalid(
                    "--profile-steps",
                    format!("{s:?} is not a step range (expected e.g. 10:12, 10..12 or 10)"),
                )
            })
        };
        let (first, last) = match s.split_once("..").or_else(|| s.split_once(':')) {
            Some((a, b)) => (num(a)?, num(b.trim_start_matches('='))?),
            None => (num(s)?, num(s)?),
        };
        if first == 0 {
            return Err(CudaError::invalid(
                "--profile-steps",
                format!("{s:?}: steps count from 1"),
            ));
        }
        if last < first {
            return Err(CudaError::invalid(
                "--profile-steps",
                format!("{s:?}: the last step is before the first"),
            ));
        }
        Ok(ProfileWindow { first, last })
    }
}

impl ProfileWindow {
    /// The action before step `step` runs.
    pub fn before(&self, step: u64) -> Option<ProfileAction> {
        (step == self.first).then_some(ProfileAction::Start)
    }
    /// The action after step `step` ran.
    pub fn after(&self, step: u64) -> Option<ProfileAction> {
        (step == self.last).then_some(ProfileAction::Stop)
    }
}

/// Forwards `crate::trace` ranges (`fwd/layer.3/attention`, `bwd/…`, `optim`) to NVTX, so
/// Nsight Systems shows the trainer's phases and layers (also on a CPU run profiled by nsys).
pub struct NvtxSink;

impl crate::trace::RangeSink for NvtxSink {
    fn push(&self, full_name: &str) {
        push(full_name);
    }
    fn pop(&self) {
        pop();
    }
}
