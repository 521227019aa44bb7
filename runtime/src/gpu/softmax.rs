//! Softmax along any axis on the GPU (`kernels-cu/softmax.cu`; reference `cpu/softmax.rs`): the
//! parameter structs, the launch configurations of the axis kernels (shared with
//! `l2_normalize.rs`; the device side is `include/steel_axis.cuh`), the launchers, and the
//! `GpuBackend` ops.
//!
//! A tensor is viewed as `[outer, n, inner]` around the axis ([`around`]). The last
//! axis (`inner = 1`) runs the row kernels, one block per row; any other axis the strided
//! kernels, a tile of adjacent columns × row phases per block. Dtypes: `x` and `y` F32 or BF16
//! (the same), statistics in f32; the backward takes `y` F32 or BF16 and `dy`/`dx` F32, and
//! accumulates into `dx`.

use super::backend::{distinct, same_shape, GpuBackend};
use super::launch::{dptr, grid_x, launch};
use super::{DevicePtr, Dim3, Gpu, LaunchConfig, NvtxRange};
use crate::{DType, Error, Result, Tensor};
use bytemuck::{Pod, Zeroable};
use std::sync::Arc;

// ---- parameter structs (mirrors of softmax.cu) ----------------------------------------------------

/// `SoftmaxFwdParams` of `softmax.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SoftmaxFwdParams {
    x: DevicePtr, // (outer, n, inner)
    y: DevicePtr, // (outer, n, inner)
    outer: u64,
    n: u64,
    inner: u64,
    col_blocks: u64,
}
const _: () = assert!(std::mem::size_of::<SoftmaxFwdParams>() == 48);

/// `SoftmaxBwdParams` of `softmax.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SoftmaxBwdParams {
    y: DevicePtr,  // (outer, n, inner)
    dy: DevicePtr, // (outer, n, inner)
    dx: DevicePtr, // (outer, n, inner)
    outer: u64,
    n: u64,
    inner: u64,
    col_blocks: u64,
}
const _: () = assert!(std::mem::size_of::<SoftmaxBwdParams>() == 56);

// ---- launch configurations (steel_axis.cuh) ---------------------------------------------------------

/// `AXIS_ROW_THREADS`: the widest row block, the row kernels' `__launch_bounds__`.
pub const ROW_THREADS: u32 = 256;
/// `AXIS_STRIDED_THREADS`: the largest strided tile, the strided kernels' `__launch_bounds__`.
pub const STRIDED_THREADS: u32 = 256;
/// `AXIS_VEC`: elements per vector step of the row kernels.
pub const VEC: usize = 8;

/// Threads per block of the row kernels (one block per row of `n`): one warp per 256 elements,
/// between 1 and 8 warps (n = 1792 → 224 threads, one 8-element vector step each).
pub fn row_block(n: usize) -> u32 {
    32 * n.div_ceil(32 * VEC).clamp(1, (ROW_THREADS / 32) as usize) as u32
}

/// `(blockDim.x, blockDim.y)` of the strided kernels: adjacent columns in x (up to a warp, fewer
/// when `inner` is smaller so that a warp also spans adjacent rows), row phases in y (no more
/// than the axis has rows, rounded up to a power of two).
pub fn strided_block(n: usize, inner: usize) -> (u32, u32) {
    let bx = inner.next_power_of_two().clamp(1, 32);
    let by = (STRIDED_THREADS as usize / bx).min(n.next_power_of_two()).max(1);
    (bx as u32, by as u32)
}

/// Which kernels an axis runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AxisLayout {
    /// `inner = 1`: one block per row.
    Rows,
    /// `inner > 1`: column tiles.
    Strided,
}

/// The launch of an axis kernel over `[outer, n, inner]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AxisLaunch {
    pub layout: AxisLayout,
    pub cfg: LaunchConfig,
    /// Column tiles per outer index (strided; 1 for rows).
    pub col_blocks: usize,
}

impl AxisLaunch {
    /// The configuration for `[outer, n, inner]` (all non-zero).
    pub fn new(op: &'static str, outer: usize, n: usize, inner: usize) -> Result<AxisLaunch> {
        if inner == 1 {
            return Ok(AxisLaunch {
                layout: AxisLayout::Rows,
                cfg: LaunchConfig {
                    grid: Dim3::x(grid_x(op, outer)?),
                    block: Dim3::x(row_block(n)),
                    shared_bytes: 0,
                },
                col_blocks: 1,
            });
        }
        let (bx, by) = strided_block(n, inner);
        let col_blocks = inner.div_ceil(bx as usize);
        let blocks = outer.saturating_mul(col_blocks);
        Ok(AxisLaunch {
            layout: AxisLayout::Strided,
            cfg: LaunchConfig {
                grid: Dim3::x(grid_x(op, blocks)?),
                block: Dim3::xy(bx, by),
                shared_bytes: 0,
            },
            col_blocks,
        })
    }

    /// The kernel of this layout among `[rows f32, rows bf16, strided f32, strided bf16]`.
    pub(super) fn symbol(&self, dtype: DType, symbols: [&'static str; 4]) -> &'static str {
        let bf16 = usize::from(dtype == DType::BF16);
        match self.layout {
            AxisLayout::Rows => symbols[bf16],
            AxisLayout::Strided => symbols[2 + bf16],
        }
    }
}

pub(crate) use crate::cpu::softmax::around;

/// The storage type of a tensor that may be F32 or BF16 (`x` of a forward, `y` of a backward).
pub(super) fn float_storage(op: &'static str, name: &str, t: &Tensor) -> Result<DType> {
    match t.dtype() {
        d @ (DType::F32 | DType::BF16) => Ok(d),
        d => Err(Error::dtype(op, d, format!("{name} must be F32 or BF16"))),
    }
}

// ---- softmax -----------------------------------------------------------------------------------

/// `y = softmax(x)` along `axis`: `x`, `y` F32 or BF16 (the same), same shape.
pub fn launch_softmax_fwd<G: Gpu>(gpu: &Arc<G>, x: &Tensor, axis: usize, y: &Tensor) -> Result<()> {
    const OP: &str = "softmax_fwd";
    let (outer, n, inner) = around(OP, x.shape(), axis)?;
    let dt = float_storage(OP, "x", x)?;
    let numel = x.numel();
    let (xp, yp) = (dptr(gpu, OP, x, dt, numel)?, dptr(gpu, OP, y, dt, numel)?);
    if numel == 0 {
        return Ok(());
    }
    let l = AxisLaunch::new(OP, outer, n, inner)?;
    let p = SoftmaxFwdParams {
        x: xp,
        y: yp,
        outer: outer as u64,
        n: n as u64,
        inner: inner as u64,
        col_blocks: l.col_blocks as u64,
    };
    let symbols = [
        "softmax_fwd_f32",
        "softmax_fwd_bf16",
        "softmax_strided_fwd_f32",
        "softmax_strided_fwd_bf16",
    ];
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    launch(gpu.as_ref(), l.symbol(dt, symbols), l.cfg, &p)
}

/// `dx += y ⊙ (dy − Σ_axis y ⊙ dy)`: `y` F32 or BF16, `dy` and `dx` F32, all of one shape.
pub fn launch_softmax_bwd<G: Gpu>(
    gpu: &Arc<G>,
    y: &Tensor,
    dy: &Tensor,
    axis: usize,
    dx: &Tensor,
) -> Result<()> {
    const OP: &str = "softmax_bwd";
    let (outer, n, inner) = around(OP, y.shape(), axis)?;
    let dt = float_storage(OP, "y", y)?;
    let numel = y.numel();
    let f = DType::F32;
    let (yp, dyp, dxp) =
        (dptr(gpu, OP, y, dt, numel)?, dptr(gpu, OP, dy, f, numel)?, dptr(gpu, OP, dx, f, numel)?);
    if numel == 0 {
        return Ok(());
    }
    let l = AxisLaunch::new(OP, outer, n, inner)?;
    let p = SoftmaxBwdParams {
        y: yp,
        dy: dyp,
        dx: dxp,
        outer: outer as u64,
        n: n as u64,
        inner: inner as u64,
        col_blocks: l.col_blocks as u64,
    };
    let symbols = [
        "softmax_bwd_f32",
        "softmax_bwd_bf16",
        "softmax_strided_bwd_f32",
        "softmax_strided_bwd_bf16",
    ];
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    launch(gpu.as_ref(), l.symbol(dt, symbols), l.cfg, &p)
}

// ---- the GpuBackend ops ----------------------------------------------------------------------

pub(super) fn softmax_fwd<G: Gpu>(be: &GpuBackend<G>, x: &Tensor, axis: usize) -> Result<Tensor> {
    const OP: &str = "softmax_fwd";
    be.on_device(OP, &[x])?;
    around(OP, x.shape(), axis)?;
    let dt = float_storage(OP, "x", x)?;
    let y = be.empty(x.shape(), dt)?;
    launch_softmax_fwd(be.gpu(), x, axis, &y)?;
    Ok(y)
}

pub(super) fn softmax_bwd<G: Gpu>(
    be: &GpuBackend<G>,
    y: &Tensor,
    dy: &Tensor,
    axis: usize,
    dx: &Tensor,
) -> Result<()> {
    const OP: &str = "softmax_bwd";
    be.on_device(OP, &[y, dy, dx])?;
    distinct(OP, &[dx], &[y, dy])?;
    same_shape(OP, y, dy)?;
    same_shape(OP, y, dx)?;
    launch_softmax_bwd(be.gpu(), y, dy, axis, dx)
}
