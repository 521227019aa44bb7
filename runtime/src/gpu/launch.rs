//! What every launcher shares: checked device pointers, grid limits, workspaces, the one
//! `launch` call, and the GEMM helpers. The launchers themselves live with their op family
//! (`rms_norm.rs`, `adamw.rs`, `lm_head_ce.rs`, …): each owns its launch configuration (grid,
//! block, shared memory), packs the kernel's `#[repr(C)]` parameter struct (mirrored from the
//! `.cu` source, sizes asserted on both sides), allocates its workspaces, checks that every buffer
//! is on this `Gpu` and large enough for what the kernel touches, and opens an NVTX range named
//! after the op. Written once for every [`Gpu`].
//!
//! Conventions: tensors are contiguous device tensors of the same `Gpu`; gradients accumulate
//! (`+=`) as in the `Backend` contract; 64-bit sizes and offsets everywhere.

use super::{DevicePtr, GemmDesc, Gpu, GpuBuffer, LaunchConfig, NvtxRange, Op};
use crate::{DType, Error, Result, Tensor};
use bytemuck::Pod;
use std::sync::Arc;

/// The largest grid.x a launch may use.
pub(crate) const MAX_GRID_X: usize = (1 << 31) - 1;

pub(crate) fn grid_x(op: &'static str, n: usize) -> Result<u32> {
    if n == 0 || n > MAX_GRID_X {
        return Err(Error::invalid(op, format!("{n} blocks do not fit a grid (1 ..= 2^31 − 1)")));
    }
    Ok(n as u32)
}

pub(crate) fn grid_y(op: &'static str, n: usize) -> Result<u32> {
    if n == 0 || n > 65_535 {
        return Err(Error::invalid(op, format!("{n} blocks do not fit grid.y (1 ..= 65535)")));
    }
    Ok(n as u32)
}

// ---- checked pointers and the launch ------------------------------------------------------------------------------------

fn same_gpu<G: Gpu>(gpu: &Arc<G>, buf: &GpuBuffer) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(gpu), Arc::as_ptr(buf.gpu()))
}

/// The device address of `t`, after checking that it lives on `gpu`, has `dtype` and at least
/// `numel` elements.
pub(crate) fn dptr<G: Gpu>(
    gpu: &Arc<G>,
    op: &'static str,
    t: &Tensor,
    dtype: DType,
    numel: usize,
) -> Result<DevicePtr> {
    let buf = t.gpu_buffer().filter(|b| same_gpu(gpu, b)).ok_or_else(|| Error::Device {
        op,
        expected: crate::Device::Cuda(gpu.ordinal()),
        found: t.device(),
    })?;
    if t.dtype() != dtype {
        return Err(Error::dtype(op, t.dtype(), format!("expected {dtype}")));
    }
    if t.numel() != numel {
        return Err(Error::shape(op, format!("{:?} does not hold {numel} elements", t.shape())));
    }
    Ok(buf.ptr())
}

pub(crate) fn opt_dptr<G: Gpu>(
    gpu: &Arc<G>,
    op: &'static str,
    t: Option<&Tensor>,
    dtype: DType,
    numel: usize,
) -> Result<DevicePtr> {
    t.map_or(Ok(0), |t| dptr(gpu, op, t, dtype, numel))
}

/// A workspace of `bytes` on `gpu` (freed, stream-ordered, when dropped).
pub(crate) fn workspace<G: Gpu>(gpu: &Arc<G>, bytes: usize) -> Result<GpuBuffer> {
    let g: Arc<dyn Gpu> = gpu.clone();
    GpuBuffer::new(g, bytes)
}

/// The dynamic shared memory every kernel may use without the opt-in.
pub const DEFAULT_DYNAMIC_SHARED: u32 = 48 * 1024;

pub(crate) fn launch<G: Gpu, P: Pod>(
    gpu: &G,
    symbol: &'static str,
    cfg: LaunchConfig,
    p: &P,
) -> Result<()> {
    if cfg.shared_bytes > DEFAULT_DYNAMIC_SHARED {
        gpu.opt_in_dynamic_shared(symbol, cfg.shared_bytes)?;
    }
    // SAFETY: every launcher below packs `P` as the exact mirror of the kernel's struct (size
    // asserted here and in the .cu source) and has checked that each pointer addresses a live
    // buffer of this Gpu large enough for what the kernel touches under `cfg`.
    unsafe { gpu.launch(symbol, cfg, bytemuck::bytes_of(p)) }
}

// ---- GEMMs --------------------------------------------------------------------------------------

/// One GEMM on the `Gpu` (cuBLASLt, or the CPU GEMM under emulation) with an NVTX range.
///
/// # Safety
/// As [`Gpu::gemm`].
pub unsafe fn gemm<G: Gpu>(
    gpu: &Arc<G>,
    name: &str,
    desc: &GemmDesc,
    a: DevicePtr,
    b: DevicePtr,
    c: DevicePtr,
) -> Result<()> {
    let _range = NvtxRange::new(gpu.as_ref(), name);
    // SAFETY: forwarded contract.
    unsafe { gpu.gemm(desc, a, b, c) }
}

/// The GEMM descriptor of `c [m, n] (+)= op(a) · op(b)` in f32 or bf16.
pub fn gemm_desc(
    m: usize,
    n: usize,
    k: usize,
    op_a: Op,
    op_b: Op,
    ab: DType,
    beta: f32,
) -> GemmDesc {
    GemmDesc { m, n, k, op_a, op_b, ab_dtype: ab, alpha: 1.0, beta }
}
