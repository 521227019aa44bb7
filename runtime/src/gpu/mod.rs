//! The GPU path (DESIGN §4): one small [`Gpu`] trait, the launchers written once against it, and
//! a [`GpuBackend`] that implements the `Backend` ops over any `Gpu`.
//!
//! Two implementations of the trait exist: `CudaGpu` (a real device through the CUDA driver,
//! cuBLASLt and NCCL; `runtime/src/cuda/`) and [`EmuGpu`] (host memory, every launch run by the
//! kernels-cu emulator, a CPU GEMM in place of cuBLASLt). The launchers, their launch
//! configurations and the kernels are therefore the same code in CI and on the device.
//!
//! Conventions:
//! - Device memory is addressed by [`DevicePtr`] (a `CUdeviceptr`, or a host address under
//!   emulation). Every method that dereferences one is `unsafe`: the caller guarantees that the
//!   range lies inside one live allocation of this `Gpu`.
//! - Work is queued on the `Gpu`'s one compute stream in call order; `synchronize` waits for it.
//!   Host↔device copies are ordered with the stream (a download returns after the data is there).
//! - A kernel takes ONE parameter struct by value (`extern "C" __global__ void k(const P p)`),
//!   mirrored by a `#[repr(C)]` struct in [`launch`] with a size assertion on both sides; `launch`
//!   receives its bytes.
//! - Every launcher opens an NVTX range named `<caller's prefix>/<op>`; callers extend the
//!   hierarchy with [`Gpu::nvtx_push`] (e.g. `fwd/layer.3`).

pub mod adamw;
pub mod attention;
mod backend;
mod comm;
pub mod elementwise;
pub mod embedding;
mod emu;
pub mod experts;
pub mod l2_normalize;
pub mod launch;
pub mod layout;
pub mod lm_head_ce;
pub mod matmul;
pub mod mma_gemm;
pub mod rms_norm;
pub mod rope;
pub mod soft_moe;
pub mod softmax;

pub use backend::GpuBackend;
pub use comm::StagedComm;
pub use emu::{Check, EmuGpu, LaunchRecord, Schedule};

use crate::{DType, Result};
use std::sync::Arc;

/// A device address: `CUdeviceptr` on CUDA, a host address under emulation.
pub type DevicePtr = u64;

/// Grid or block dimensions of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

impl Dim3 {
    /// `(x, 1, 1)`.
    pub const fn x(x: u32) -> Dim3 {
        Dim3 { x, y: 1, z: 1 }
    }
    /// `(x, y, 1)`.
    pub const fn xy(x: u32, y: u32) -> Dim3 {
        Dim3 { x, y, z: 1 }
    }
    /// `x · y · z`.
    pub const fn count(&self) -> u64 {
        self.x as u64 * self.y as u64 * self.z as u64
    }
}

/// Where and how wide a kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: Dim3,
    pub block: Dim3,
    /// Dynamic shared memory in bytes (`extern __shared__`).
    pub shared_bytes: u32,
}

/// The value pattern of a [`Gpu::memset`] (`cuMemsetD8/D16/D32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    U8(u8),
    U16(u16),
    U32(u32),
}

impl Fill {
    /// Bytes per element of the pattern.
    pub const fn width(&self) -> usize {
        match self {
            Fill::U8(_) => 1,
            Fill::U16(_) => 2,
            Fill::U32(_) => 4,
        }
    }
}

/// Whether a GEMM operand is used as stored (`N`) or transposed (`T`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    N,
    T,
}

/// One row-major GEMM `c[m, n] = alpha · op(a) · op(b) + beta · c` (cuBLASLt on CUDA, the CPU
/// GEMM under emulation). `op(a)` is `[m, k]` (so `a` is stored `[m, k]` for `N`, `[k, m]` for
/// `T`), `op(b)` is `[k, n]` (`b` stored `[k, n]` for `N`, `[n, k]` for `T`). `a` and `b` share
/// `ab_dtype` (`F32` or `BF16`); `c` is `F32`; accumulation is fp32. With `beta = 0`, `c` is
/// never read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmDesc {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub op_a: Op,
    pub op_b: Op,
    pub ab_dtype: DType,
    pub alpha: f32,
    pub beta: f32,
}

/// How much work a [`Gpu`] has been given: kernel launches and GEMMs since it was created
/// (`--device emu` prints them at the end of a run, the proof that the GPU path did the work).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchCounts {
    pub kernels: u64,
    pub gemms: u64,
    /// Times the host waited for the device: downloads and `synchronize` (the trainer's step
    /// has one).
    pub host_syncs: u64,
}

/// What a device's memory holds: the allocator's live bytes and their peak, and the device's
/// free and total bytes where known (the emulator knows them when given a capacity).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryInfo {
    /// Bytes of live allocations (their size classes on a GPU).
    pub allocated: u64,
    /// The highest `allocated` since the device was created or [`Gpu::reset_peak`].
    pub peak_allocated: u64,
    /// Free bytes of the device (all processes), if known.
    pub free: Option<u64>,
    /// Total bytes of the device, if known.
    pub total: Option<u64>,
}

impl std::fmt::Display for LaunchCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} kernel launches and {} GEMMs", self.kernels, self.gemms)
    }
}

/// The counters behind [`Gpu::counts`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    kernels: std::sync::atomic::AtomicU64,
    gemms: std::sync::atomic::AtomicU64,
    host_syncs: std::sync::atomic::AtomicU64,
}

impl Counters {
    pub(crate) fn kernel(&self) {
        self.kernels.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    pub(crate) fn gemm(&self) {
        self.gemms.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    pub(crate) fn host_sync(&self) {
        self.host_syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    pub(crate) fn get(&self) -> LaunchCounts {
        use std::sync::atomic::Ordering::Relaxed;
        LaunchCounts {
            kernels: self.kernels.load(Relaxed),
            gemms: self.gemms.load(Relaxed),
            host_syncs: self.host_syncs.load(Relaxed),
        }
    }
}

/// What the GPU runtime needs from a device. Small on purpose: everything else (launch
/// configurations, parameter packing, workspaces, NVTX names) lives once in the launchers.
pub trait Gpu: Send + Sync + 'static {
    /// A short human-readable name ("emu", "cuda:0 (NVIDIA H200)").
    fn name(&self) -> String;
    /// The device ordinal; tensors of this `Gpu` report `Device::Cuda(ordinal)`.
    fn ordinal(&self) -> usize;

    /// `bytes` of uninitialised device memory, aligned to at least 256 bytes. `bytes = 0` gives
    /// a valid, unique, never-dereferenced address.
    fn alloc(&self, bytes: usize) -> Result<DevicePtr>;
    /// Returns an allocation. Stream-ordered: work already queued that uses `ptr` completes
    /// before the memory is handed out again (a caching allocator on the one compute stream).
    ///
    /// # Safety
    /// `ptr` came from `alloc` of this `Gpu` and is freed once; nothing queued later uses it.
    unsafe fn free(&self, ptr: DevicePtr);

    /// Copies host bytes to `dst`.
    ///
    /// # Safety
    /// `dst .. dst + src.len()` lies inside one live allocation.
    unsafe fn upload(&self, dst: DevicePtr, src: &[u8]) -> Result<()>;
    /// Copies device bytes to the host; returns when they have arrived.
    ///
    /// # Safety
    /// `src .. src + dst.len()` lies inside one live allocation.
    unsafe fn download(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()>;
    /// Copies `bytes` between two device ranges that do not overlap.
    ///
    /// # Safety
    /// Both ranges lie inside live allocations.
    unsafe fn copy(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<()>;
    /// Writes `count` copies of the pattern at `dst`.
    ///
    /// # Safety
    /// `dst .. dst + count · width` lies inside one live allocation, aligned to the width.
    unsafe fn memset(&self, dst: DevicePtr, value: Fill, count: usize) -> Result<()>;

    /// Queues kernel `symbol` of kernels-cu with its parameter struct's bytes.
    ///
    /// # Safety
    /// `params` is the exact `#[repr(C)]` mirror of the kernel's parameter struct, and every
    /// pointer in it addresses live device memory large enough for what the kernel touches
    /// under `cfg`.
    unsafe fn launch(&self, symbol: &'static str, cfg: LaunchConfig, params: &[u8]) -> Result<()>;
    /// Allows kernel `symbol` up to `bytes` of dynamic shared memory, beyond the 48 KiB every
    /// kernel may use (`cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)`: once per kernel, to
    /// the largest size asked for). A launch above 48 KiB without it fails, on a device and in the
    /// emulator alike; the launchers call it (`launch::launch`).
    fn opt_in_dynamic_shared(&self, symbol: &'static str, bytes: u32) -> Result<()>;
    /// Queues one GEMM (see [`GemmDesc`]).
    ///
    /// # Safety
    /// `a`, `b` and `c` address at least `m·k`, `k·n` and `m·n` elements of their dtypes; `c`
    /// does not overlap `a` or `b`.
    unsafe fn gemm(&self, desc: &GemmDesc, a: DevicePtr, b: DevicePtr, c: DevicePtr) -> Result<()>;
    /// Queues a batched GEMM as cuBLASLt runs it ([`crate::cuda::gemm::GemmShape`]): row-major
    /// `out[i] = alpha · op(a[i]) · op(b[i]) + beta · out[i] (+ bias)` for every batch item `i`,
    /// strided or broadcast (stride 0) operands, fp32 accumulation, a bias `[n]` of the output
    /// dtype, bf16 or f32 output.
    ///
    /// # Safety
    /// The pointers address every element the shape and its strides reach; `out` does not
    /// overlap the inputs.
    unsafe fn gemm_ex(
        &self,
        shape: &crate::cuda::gemm::GemmShape,
        ptrs: crate::cuda::gemm::GemmPtrs,
        alpha: f32,
        beta: f32,
    ) -> Result<()>;
    /// Waits for all queued work.
    fn synchronize(&self) -> Result<()>;
    /// The kernels launched, GEMMs queued and host waits so far.
    fn counts(&self) -> LaunchCounts;
    /// The device's memory now (see [`MemoryInfo`]).
    fn memory(&self) -> MemoryInfo;
    /// Starts a new peak: `peak_allocated` becomes the bytes allocated now.
    fn reset_peak(&self);

    /// Opens an NVTX range (nested; closed by `nvtx_pop`). Never fails: telemetry is optional.
    fn nvtx_push(&self, name: &str);
    /// Closes the innermost NVTX range.
    fn nvtx_pop(&self);
}

/// An owned device allocation; freed on drop. Tensors on a `Gpu` hold one.
pub struct GpuBuffer {
    ptr: DevicePtr,
    bytes: usize,
    gpu: Arc<dyn Gpu>,
}

impl GpuBuffer {
    /// Allocates `bytes` on `gpu` (contents undefined).
    pub fn new(gpu: Arc<dyn Gpu>, bytes: usize) -> Result<GpuBuffer> {
        let ptr = gpu.alloc(bytes)?;
        Ok(GpuBuffer { ptr, bytes, gpu })
    }
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn gpu(&self) -> &Arc<dyn Gpu> {
        &self.gpu
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        // SAFETY: the pointer came from this Gpu's alloc and the buffer owns it; `free` is
        // stream-ordered, so queued work that still uses it finishes first.
        unsafe { self.gpu.free(self.ptr) }
    }
}

impl std::fmt::Debug for GpuBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuffer({:#x}, {} bytes on {})", self.ptr, self.bytes, self.gpu.name())
    }
}

/// An RAII NVTX range: pushed on creation, popped on drop (also on early `?` returns).
pub struct NvtxRange<'a> {
    gpu: &'a dyn Gpu,
}

impl<'a> NvtxRange<'a> {
    pub fn new(gpu: &'a dyn Gpu, name: &str) -> NvtxRange<'a> {
        gpu.nvtx_push(name);
        NvtxRange { gpu }
    }
}

impl Drop for NvtxRange<'_> {
    fn drop(&mut self) {
        self.gpu.nvtx_pop();
    }
}
