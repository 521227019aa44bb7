//! L2 normalisation along any axis on the GPU (`kernels-cu/l2_normalize.cu`; reference
//! `cpu/l2_normalize.rs`): the parameter structs, the launchers, and the `GpuBackend` ops. The
//! launch configurations are softmax's axis kernels' ([`AxisLaunch`]): the last axis runs the row
//! kernels, any other axis the strided ones.
//!
//! Dtypes: `x` and `y` F32 or BF16 (the same), `norm` F32 with `x`'s shape without the axis; the
//! backward takes `y` F32 or BF16, `norm`, `dy` and `dx` F32, and accumulates into `dx`.

use super::backend::{distinct, same_shape, GpuBackend};
use super::launch::{dptr, launch};
use super::softmax::{around, float_storage, AxisLaunch};
use super::{DevicePtr, Gpu, NvtxRange};
use crate::{DType, Error, Result, Tensor};
use bytemuck::{Pod, Zeroable};
use std::sync::Arc;

// ---- parameter structs (mirrors of l2_normalize.cu) -----------------------------------------------

/// `L2NormalizeFwdParams` of `l2_normalize.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct L2NormalizeFwdParams {
    x: DevicePtr,    // (outer, n, inner)
    y: DevicePtr,    // (outer, n, inner)
    norm: DevicePtr, // (outer, inner)
    outer: u64,
    n: u64,
    inner: u64,
    col_blocks: u64,
    eps: f32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<L2NormalizeFwdParams>() == 64);

/// `L2NormalizeBwdParams` of `l2_normalize.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct L2NormalizeBwdParams {
    y: DevicePtr,    // (outer, n, inner)
    norm: DevicePtr, // (outer, inner)
    dy: DevicePtr,   // (outer, n, inner)
    dx: DevicePtr,   // (outer, n, inner)
    outer: u64,
    n: u64,
    inner: u64,
    col_blocks: u64,
    eps: f32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<L2NormalizeBwdParams>() == 72);

/// The shape of the norms: `shape` without `axis`.
fn norm_shape(shape: &[usize], axis: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    s.remove(axis);
    s
}

// ---- l2_normalize ------------------------------------------------------------------------------

/// `norm = ‖x‖₂` along `axis`, `y = x / max(norm, eps)`: `x`, `y` F32 or BF16 (the same, one
/// shape), `norm` F32 with `outer · inner` elements. An empty axis (n = 0) gives zero norms.
pub fn launch_l2_normalize_fwd<G: Gpu>(
    gpu: &Arc<G>,
    x: &Tensor,
    axis: usize,
    eps: f32,
    y: &Tensor,
    norm: &Tensor,
) -> Result<()> {
    const OP: &str = "l2_normalize_fwd";
    let (outer, n, inner) = around(OP, x.shape(), axis)?;
    let dt = float_storage(OP, "x", x)?;
    let numel = x.numel();
    let (xp, yp) = (dptr(gpu, OP, x, dt, numel)?, dptr(gpu, OP, y, dt, numel)?);
    let normp = dptr(gpu, OP, norm, DType::F32, outer * inner)?;
    if outer * inner == 0 {
        return Ok(());
    }
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    if n == 0 {
        // SAFETY: `norm` holds outer · inner f32 (checked above).
        return unsafe { gpu.memset(normp, super::Fill::U32(0), outer * inner) };
    }
    let l = AxisLaunch::new(OP, outer, n, inner)?;
    let p = L2NormalizeFwdParams {
        x: xp,
        y: yp,
        norm: normp,
        outer: outer as u64,
        n: n as u64,
        inner: inner as u64,
        col_blocks: l.col_blocks as u64,
        eps,
        pad: 0,
    };
    let symbols = [
        "l2_normalize_fwd_f32",
        "l2_normalize_fwd_bf16",
        "l2_normalize_strided_fwd_f32",
        "l2_normalize_strided_fwd_bf16",
    ];
    launch(gpu.as_ref(), l.symbol(dt, symbols), l.cfg, &p)
}

/// Backward of [`launch_l2_normalize_fwd`] from the saved `y` and `norm`: where `norm > eps`,
/// `dx += (dy − y · Σ_axis y ⊙ dy) / norm`, elsewhere `dx += dy / eps`. `y` F32 or BF16, `norm`,
/// `dy`, `dx` F32.
pub fn launch_l2_normalize_bwd<G: Gpu>(
    gpu: &Arc<G>,
    y: &Tensor,
    norm: &Tensor,
    dy: &Tensor,
    axis: usize,
    eps: f32,
    dx: &Tensor,
) -> Result<()> {
    const OP: &str = "l2_normalize_bwd";
    let (outer, n, inner) = around(OP, y.shape(), axis)?;
    let dt = float_storage(OP, "y", y)?;
    let numel = y.numel();
    let f = DType::F32;
    let (yp, dyp, dxp) =
        (dptr(gpu, OP, y, dt, numel)?, dptr(gpu, OP, dy, f, numel)?, dptr(gpu, OP, dx, f, numel)?);
    let normp = dptr(gpu, OP, norm, f, outer * inner)?;
    if numel == 0 {
        return Ok(());
    }
    let l = AxisLaunch::new(OP, outer, n, inner)?;
    let p = L2NormalizeBwdParams {
        y: yp,
        norm: normp,
        dy: dyp,
        dx: dxp,
        outer: outer as u64,
        n: n as u64,
        inner: inner as u64,
        col_blocks: l.col_blocks as u64,
        eps,
        pad: 0,
    };
    let symbols = [
        "l2_normalize_bwd_f32",
        "l2_normalize_bwd_bf16",
        "l2_normalize_strided_bwd_f32",
        "l2_normalize_strided_bwd_bf16",
    ];
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    launch(gpu.as_ref(), l.symbol(dt, symbols), l.cfg, &p)
}

// ---- the GpuBackend ops ----------------------------------------------------------------------

pub(super) fn l2_normalize_fwd<G: Gpu>(
    be: &GpuBackend<G>,
    x: &Tensor,
    axis: usize,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "l2_normalize_fwd";
    be.on_device(OP, &[x])?;
    around(OP, x.shape(), axis)?;
    let dt = float_storage(OP, "x", x)?;
    let y = be.empty(x.shape(), dt)?;
    let norm = be.empty(&norm_shape(x.shape(), axis), DType::F32)?;
    launch_l2_normalize_fwd(be.gpu(), x, axis, eps as f32, &y, &norm)?;
    Ok((y, norm))
}

pub(super) fn l2_normalize_bwd<G: Gpu>(
    be: &GpuBackend<G>,
    y: &Tensor,
    norm: &Tensor,
    dy: &Tensor,
    axis: usize,
    eps: f64,
    dx: &Tensor,
) -> Result<()> {
    const OP: &str = "l2_normalize_bwd";
    be.on_device(OP, &[y, norm, dy, dx])?;
    distinct(OP, &[dx], &[y, norm, dy])?;
    same_shape(OP, y, dy)?;
    same_shape(OP, y, dx)?;
    around(OP, y.shape(), axis)?;
    if norm.shape() != norm_shape(y.shape(), axis) {
        return Err(Error::shape(
            OP,
            format!("norm {:?} does not match y {:?} at axis {axis}", norm.shape(), y.shape()),
        ));
    }
    launch_l2_normalize_bwd(be.gpu(), y, norm, dy, axis, eps as f32, dx)
}
