//! Rotary position embedding on the GPU (`kernels-cu/rope.cu`; reference `cpu/rope.rs`): the
//! parameter structs, the launchers, and the `GpuBackend` ops.
//!
//! `x [B, T, H, D]` (D even, rotate_half layout: j pairs with j + D/2). The angles are the CPU's:
//! each call computes the f32 tables `cos, sin [T, D/2]` on the host with
//! [`crate::cpu::rope::rope_tables`] (HF's float32 recipe, positions `pos_offset ..`) and uploads
//! them to a workspace, so the kernels never evaluate a trigonometric function and match the
//! reference to the rounding of their multiply-adds (≤ 1e-5 relative, fp32).
//! `rope_fwd`: x F32 or BF16, y of x's dtype (bf16 rounded once, to nearest even).
//! `rope_bwd`: dy and dx F32, `dx += Rᵀ dy`.

use super::backend::{distinct, same_shape, GpuBackend};
use super::launch::{dptr, grid_x, launch, workspace};
use super::{DevicePtr, Dim3, Gpu, GpuBuffer, LaunchConfig, NvtxRange};
use crate::{DType, Error, Result, Tensor};
use bytemuck::{Pod, Zeroable};
use std::sync::Arc;

// ---- parameter structs (mirrors of rope.cu) ---------------------------------------------------

/// `RopeFwdParams` of `rope.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct RopeFwdParams {
    x: DevicePtr,   // (rows, 2·half)
    cos: DevicePtr, // (seq, half)
    sin: DevicePtr, // (seq, half)
    y: DevicePtr,   // (rows, 2·half)
    rows: u64,
    seq: u64,
    heads: u64,
    half: u64,
}
const _: () = assert!(std::mem::size_of::<RopeFwdParams>() == 64);

/// `RopeBwdParams` of `rope.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct RopeBwdParams {
    dy: DevicePtr,  // (rows, 2·half)
    cos: DevicePtr, // (seq, half)
    sin: DevicePtr, // (seq, half)
    dx: DevicePtr,  // (rows, 2·half)
    rows: u64,
    seq: u64,
    heads: u64,
    half: u64,
}
const _: () = assert!(std::mem::size_of::<RopeBwdParams>() == 64);

// ---- launch configuration ---------------------------------------------------------------------

/// Threads per block (`ROPE_BLOCK`).
pub const ROPE_BLOCK: u32 = 256;
/// The most blocks of a launch; the kernels stride over the rest.
pub const ROPE_MAX_BLOCKS: usize = 8192;

/// Elements per 128-bit vector of `dtype`.
fn vec_width(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

/// The grid of a rope launch over `rows` rows of `2·half` elements of `dtype`: one thread per
/// vector of pairs when `half` is a multiple of the vector width (the tensors are whole, 256-byte
/// aligned allocations), else per pair.
pub fn rope_grid(rows: usize, half: usize, dtype: DType) -> usize {
    let n = vec_width(dtype);
    let per_row = if half.is_multiple_of(n) { half / n } else { half };
    (rows * per_row).div_ceil(ROPE_BLOCK as usize).clamp(1, ROPE_MAX_BLOCKS)
}

// ---- launchers ----------------------------------------------------------------------------------

/// The f32 tables of positions `offset .. offset + seq` on the device: `(cos, sin)`.
fn tables<G: Gpu>(
    gpu: &Arc<G>,
    seq: usize,
    d: usize,
    theta: f64,
    offset: usize,
) -> Result<(GpuBuffer, GpuBuffer)> {
    let (cos, sin) = crate::cpu::rope::rope_tables(seq, d, theta, offset);
    let up = |v: &[f32]| -> Result<GpuBuffer> {
        let buf = workspace(gpu, v.len() * 4)?;
        // SAFETY: the buffer holds exactly the table's bytes.
        unsafe { gpu.upload(buf.ptr(), bytemuck::cast_slice(v))? };
        Ok(buf)
    };
    Ok((up(&cos)?, up(&sin)?))
}

/// What both launchers share: the dims, the tables, the grid.
struct Plan {
    rows: usize,
    seq: usize,
    heads: usize,
    half: usize,
    cos: GpuBuffer,
    sin: GpuBuffer,
}

fn plan<G: Gpu>(
    gpu: &Arc<G>,
    op: &'static str,
    x: &Tensor,
    theta: f64,
    offset: usize,
) -> Result<Option<Plan>> {
    let (b, t, h, d) = crate::cpu::rope::dims(op, x)?;
    let rows = b * t * h;
    if rows == 0 || d == 0 {
        return Ok(None);
    }
    let (cos, sin) = tables(gpu, t, d, theta, offset)?;
    Ok(Some(Plan { rows, seq: t, heads: h, half: d / 2, cos, sin }))
}

fn config(op: &'static str, p: &Plan, dtype: DType) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid: Dim3::x(grid_x(op, rope_grid(p.rows, p.half, dtype))?),
        block: Dim3::x(ROPE_BLOCK),
        shared_bytes: 0,
    })
}

/// `y = R x` on `x [B, T, H, D]` (F32 or BF16; y of x's dtype and shape).
pub fn launch_rope_fwd<G: Gpu>(
    gpu: &Arc<G>,
    x: &Tensor,
    theta: f64,
    pos_offset: usize,
    y: &Tensor,
) -> Result<()> {
    const OP: &str = "rope_fwd";
    let (dt, symbol) = match x.dtype() {
        DType::F32 => (DType::F32, "rope_fwd_f32"),
        DType::BF16 => (DType::BF16, "rope_fwd_bf16"),
        other => return Err(Error::dtype(OP, other, "x must be F32 or BF16")),
    };
    same_shape(OP, x, y)?;
    let (x_p, y_p): (DevicePtr, DevicePtr) =
        (dptr(gpu, OP, x, dt, x.numel())?, dptr(gpu, OP, y, dt, x.numel())?);
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    let Some(p) = plan(gpu, OP, x, theta, pos_offset)? else { return Ok(()) };
    let params = RopeFwdParams {
        x: x_p,
        cos: p.cos.ptr(),
        sin: p.sin.ptr(),
        y: y_p,
        rows: p.rows as u64,
        seq: p.seq as u64,
        heads: p.heads as u64,
        half: p.half as u64,
    };
    launch(gpu.as_ref(), symbol, config(OP, &p, dt)?, &params)
}

/// `dx += Rᵀ dy` on `dy, dx [B, T, H, D]` (F32).
pub fn launch_rope_bwd<G: Gpu>(
    gpu: &Arc<G>,
    dy: &Tensor,
    theta: f64,
    pos_offset: usize,
    dx: &Tensor,
) -> Result<()> {
    const OP: &str = "rope_bwd";
    let f = DType::F32;
    same_shape(OP, dy, dx)?;
    let (dy_p, dx_p) = (dptr(gpu, OP, dy, f, dy.numel())?, dptr(gpu, OP, dx, f, dy.numel())?);
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    let Some(p) = plan(gpu, OP, dy, theta, pos_offset)? else { return Ok(()) };
    let params = RopeBwdParams {
        dy: dy_p,
        cos: p.cos.ptr(),
        sin: p.sin.ptr(),
        dx: dx_p,
        rows: p.rows as u64,
        seq: p.seq as u64,
        heads: p.heads as u64,
        half: p.half as u64,
    };
    launch(gpu.as_ref(), "rope_bwd_f32", config(OP, &p, f)?, &params)
}

// ---- the GpuBackend ops ----------------------------------------------------------------------

pub(super) fn rope_fwd<G: Gpu>(
    be: &GpuBackend<G>,
    x: &Tensor,
    theta: f64,
    pos_offset: usize,
) -> Result<Tensor> {
    const OP: &str = "rope_fwd";
    be.on_device(OP, &[x])?;
    crate::cpu::rope::dims(OP, x)?;
    if !matches!(x.dtype(), DType::F32 | DType::BF16) {
        return Err(Error::dtype(OP, x.dtype(), "x must be F32 or BF16"));
    }
    let y = be.empty(x.shape(), x.dtype())?;
    launch_rope_fwd(be.gpu(), x, theta, pos_offset, &y)?;
    Ok(y)
}

pub(super) fn rope_bwd<G: Gpu>(
    be: &GpuBackend<G>,
    dy: &Tensor,
    theta: f64,
    pos_offset: usize,
    dx: &Tensor,
) -> Result<()> {
    const OP: &str = "rope_bwd";
    be.on_device(OP, &[dy, dx])?;
    distinct(OP, &[dx], &[dy])?;
    crate::cpu::rope::dims(OP, dy)?;
    for t in [dy, dx] {
        if t.dtype() != DType::F32 {
            return Err(Error::dtype(OP, t.dtype(), "dy and dx must be F32"));
        }
    }
    launch_rope_bwd(be.gpu(), dy, theta, pos_offset, dx)
}
