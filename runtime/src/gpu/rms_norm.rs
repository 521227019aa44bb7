//! RMSNorm and the residual add fused with it on the GPU (`kernels-cu/rms_norm.cu`; reference
//! `cpu/rms_norm.rs`): the parameter structs, the launchers, and the `GpuBackend` ops.

use super::backend::{distinct, same_shape, GpuBackend};
use super::launch::{dptr, grid_x, grid_y, launch, opt_dptr, workspace};
use super::{DevicePtr, Dim3, Gpu, LaunchConfig, NvtxRange};
use crate::{DType, Error, Result, Tensor};
use bytemuck::{Pod, Zeroable};
use std::sync::Arc;

// ---- parameter structs (mirrors of rms_norm.cu) ---------------------------------------------------

/// `AddRmsNormFwdParams` of `rms_norm.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AddRmsNormFwdParams {
    x: DevicePtr,    // (rows, h)
    r: DevicePtr,    // (rows, h) or 0
    w: DevicePtr,    // (h)
    sum: DevicePtr,  // (rows, h) or 0
    y: DevicePtr,    // (rows, h)
    rstd: DevicePtr, // (rows)
    rows: u64,
    h: u64,
    eps: f32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<AddRmsNormFwdParams>() == 72);

/// `AddRmsNormBwdParams` of `rms_norm.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AddRmsNormBwdParams {
    sum: DevicePtr,  // (rows, h)
    w: DevicePtr,    // (h)
    rstd: DevicePtr, // (rows)
    dy: DevicePtr,   // (rows, h)
    dsum: DevicePtr, // (rows, h) or 0
    dx: DevicePtr,   // (rows, h)
    dr: DevicePtr,   // (rows, h) or 0
    rows: u64,
    h: u64,
}
const _: () = assert!(std::mem::size_of::<AddRmsNormBwdParams>() == 72);

/// `AddRmsNormDwParams` of `rms_norm.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AddRmsNormDwParams {
    sum: DevicePtr,     // (rows, h)
    rstd: DevicePtr,    // (rows)
    dy: DevicePtr,      // (rows, h)
    partial: DevicePtr, // (chunks, h)
    rows: u64,
    h: u64,
    rows_per_chunk: u64,
}
const _: () = assert!(std::mem::size_of::<AddRmsNormDwParams>() == 56);

/// `AddRmsNormDwReduceParams` of `rms_norm.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AddRmsNormDwReduceParams {
    partial: DevicePtr, // (chunks, h)
    dw: DevicePtr,      // (h)
    chunks: u64,
    h: u64,
}
const _: () = assert!(std::mem::size_of::<AddRmsNormDwReduceParams>() == 32);

// ---- launch configurations --------------------------------------------------------------------

/// Threads per block of the row kernels (one block per row): one warp per 256 elements of the
/// row, between 1 and 8 warps (h = 1792 → 224 threads, 8 elements each).
pub fn row_block(h: usize) -> u32 {
    32 * h.div_ceil(256).clamp(1, 8) as u32
}

/// Rows per partial sum of the RMSNorm weight gradient (as the CPU's `ROW_BLOCK`).
pub const DW_ROWS_PER_CHUNK: usize = 64;
/// Threads per block of the column kernels (dw).
pub const COLUMN_BLOCK: u32 = 128;

// ---- add_rms_norm -------------------------------------------------------------------------------

/// Forward of RMSNorm over the last axis of `x [rows, h]`, fused with the residual add when `r`
/// is given: `sum = x + r` (written when `sum` is given), `y = w ⊙ sum · rstd`.
#[allow(clippy::too_many_arguments)]
pub fn launch_add_rms_norm_fwd<G: Gpu>(
    gpu: &Arc<G>,
    x: &Tensor,
    r: Option<&Tensor>,
    w: &Tensor,
    eps: f32,
    sum: Option<&Tensor>,
    y: &Tensor,
    rstd: &Tensor,
) -> Result<()> {
    const OP: &str = "add_rms_norm_fwd";
    let h = w.numel();
    let rows = x.numel().checked_div(h).unwrap_or(0);
    if h == 0 || rows * h != x.numel() {
        return Err(Error::shape(OP, format!("x {:?} is not rows × {h}", x.shape())));
    }
    if r.is_some() != sum.is_some() {
        return Err(Error::invalid(OP, "the residual and the sum output come together"));
    }
    let f = DType::F32;
    let p = AddRmsNormFwdParams {
        x: dptr(gpu, OP, x, f, rows * h)?,
        r: opt_dptr(gpu, OP, r, f, rows * h)?,
        w: dptr(gpu, OP, w, f, h)?,
        sum: opt_dptr(gpu, OP, sum, f, rows * h)?,
        y: dptr(gpu, OP, y, f, rows * h)?,
        rstd: dptr(gpu, OP, rstd, f, rows)?,
        rows: rows as u64,
        h: h as u64,
        eps,
        pad: 0,
    };
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    let cfg = LaunchConfig {
        grid: Dim3::x(grid_x(OP, rows)?),
        block: Dim3::x(row_block(h)),
        shared_bytes: 0,
    };
    launch(gpu.as_ref(), "add_rms_norm_fwd_f32", cfg, &p)
}

/// Backward of [`launch_add_rms_norm_fwd`] from the saved `sum` (or `x` of the plain norm) and `rstd`:
/// `g = dsum + rstd · (dy ⊙ w − x̂ · mean(dy ⊙ w ⊙ x̂))`, `dx += g`, `dr += g` (when given),
/// `dw += Σ_rows dy ⊙ x̂` (chunks of rows summed in order: deterministic).
#[allow(clippy::too_many_arguments)]
pub fn launch_add_rms_norm_bwd<G: Gpu>(
    gpu: &Arc<G>,
    sum: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    dsum: Option<&Tensor>,
    dx: &Tensor,
    dr: Option<&Tensor>,
    dw: &Tensor,
) -> Result<()> {
    const OP: &str = "add_rms_norm_bwd";
    let h = w.numel();
    let rows = sum.numel().checked_div(h).unwrap_or(0);
    if h == 0 || rows * h != sum.numel() {
        return Err(Error::shape(OP, format!("sum {:?} is not rows × {h}", sum.shape())));
    }
    let f = DType::F32;
    let (sum_p, rstd_p, dy_p) = (
        dptr(gpu, OP, sum, f, rows * h)?,
        dptr(gpu, OP, rstd, f, rows)?,
        dptr(gpu, OP, dy, f, rows * h)?,
    );
    let p = AddRmsNormBwdParams {
        sum: sum_p,
        w: dptr(gpu, OP, w, f, h)?,
        rstd: rstd_p,
        dy: dy_p,
        dsum: opt_dptr(gpu, OP, dsum, f, rows * h)?,
        dx: dptr(gpu, OP, dx, f, rows * h)?,
        dr: opt_dptr(gpu, OP, dr, f, rows * h)?,
        rows: rows as u64,
        h: h as u64,
    };
    let dw_p = dptr(gpu, OP, dw, f, h)?;
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    let cfg = LaunchConfig {
        grid: Dim3::x(grid_x(OP, rows)?),
        block: Dim3::x(row_block(h)),
        shared_bytes: 0,
    };
    launch(gpu.as_ref(), "add_rms_norm_bwd_f32", cfg, &p)?;

    let chunks = rows.div_ceil(DW_ROWS_PER_CHUNK);
    let partial = workspace(gpu, chunks * h * 4)?;
    let col_blocks = grid_x(OP, h.div_ceil(COLUMN_BLOCK as usize))?;
    let pd = AddRmsNormDwParams {
        sum: sum_p,
        rstd: rstd_p,
        dy: dy_p,
        partial: partial.ptr(),
        rows: rows as u64,
        h: h as u64,
        rows_per_chunk: DW_ROWS_PER_CHUNK as u64,
    };
    let cfg = LaunchConfig {
        grid: Dim3::xy(col_blocks, grid_y(OP, chunks)?),
        block: Dim3::x(COLUMN_BLOCK),
        shared_bytes: 0,
    };
    launch(gpu.as_ref(), "add_rms_norm_bwd_dw_f32", cfg, &pd)?;
    let pr = AddRmsNormDwReduceParams {
        partial: partial.ptr(),
        dw: dw_p,
        chunks: chunks as u64,
        h: h as u64,
    };
    let cfg =
        LaunchConfig { grid: Dim3::x(col_blocks), block: Dim3::x(COLUMN_BLOCK), shared_bytes: 0 };
    launch(gpu.as_ref(), "add_rms_norm_bwd_dw_reduce_f32", cfg, &pr)
}

// ---- the GpuBackend ops ----------------------------------------------------------------------

pub(super) fn rms_norm_fwd<G: Gpu>(
    be: &GpuBackend<G>,
    x: &Tensor,
    w: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "rms_norm_fwd";
    be.on_device(OP, &[x, w])?;
    crate::cpu::rms_norm::hidden(OP, x, w)?;
    let y = be.empty(x.shape(), DType::F32)?;
    let rstd = be.empty(&x.shape()[..x.dims() - 1], DType::F32)?;
    launch_add_rms_norm_fwd(be.gpu(), x, None, w, eps as f32, None, &y, &rstd)?;
    Ok((y, rstd))
}

pub(super) fn rms_norm_bwd<G: Gpu>(
    be: &GpuBackend<G>,
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
    dw: &Tensor,
) -> Result<()> {
    const OP: &str = "rms_norm_bwd";
    be.on_device(OP, &[x, w, rstd, dy, dx, dw])?;
    crate::cpu::rms_norm::hidden(OP, x, w)?;
    for t in [dy, dx] {
        same_shape(OP, x, t)?;
    }
    same_shape(OP, w, dw)?;
    distinct(OP, &[dx, dw], &[x, w, rstd, dy])?;
    launch_add_rms_norm_bwd(be.gpu(), x, w, rstd, dy, None, dx, None, dw)
}

pub(super) fn add_rms_norm_fwd<G: Gpu>(
    be: &GpuBackend<G>,
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "add_rms_norm_fwd";
    be.on_device(OP, &[x, r, w])?;
    same_shape(OP, x, r)?;
    crate::cpu::rms_norm::hidden(OP, x, w)?;
    let sum = be.empty(x.shape(), DType::F32)?;
    let y = be.empty(x.shape(), DType::F32)?;
    let rstd = be.empty(&x.shape()[..x.dims() - 1], DType::F32)?;
    launch_add_rms_norm_fwd(be.gpu(), x, Some(r), w, eps as f32, Some(&sum), &y, &rstd)?;
    Ok((sum, y, rstd))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn add_rms_norm_bwd<G: Gpu>(
    be: &GpuBackend<G>,
    sum: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    dsum: Option<&Tensor>,
    dx: &Tensor,
    dr: &Tensor,
    dw: &Tensor,
) -> Result<()> {
    const OP: &str = "add_rms_norm_bwd";
    let mut ins = vec![sum, w, rstd, dy];
    ins.extend(dsum);
    be.on_device(OP, &ins)?;
    be.on_device(OP, &[dx, dr, dw])?;
    crate::cpu::rms_norm::hidden(OP, sum, w)?;
    for t in [dy, dx, dr].into_iter().chain(dsum) {
        same_shape(OP, sum, t)?;
    }
    same_shape(OP, w, dw)?;
    distinct(OP, &[dx, dr, dw], &ins)?;
    launch_add_rms_norm_bwd(be.gpu(), sum, w, rstd, dy, dsum, dx, Some(dr), dw)
}
