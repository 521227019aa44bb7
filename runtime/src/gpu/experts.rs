//! All E double-SwiGLU experts on the GPU (`kernels-cu/experts.cu`; reference
//! `cpu/experts.rs`): the parameter structs, launch configurations, launchers and the
//! `GpuBackend` ops.
//!
//! Forward: `experts_fwd_<dt>` twice (stage 1 `x → u`, stage 2 `u → y`), each one launch for all
//! experts — a warp per (expert, output row) streaming that row of both weights once.
//! Backward: `experts_gate_grad` (stage 2, from dy), `experts_wgrad` (stage 2: dW_gate_down,
//! dW_down and du's partials), `experts_gate_grad` (stage 1, summing the partials),
//! `experts_wgrad` (stage 1: dW_gate_up, dW_up and dx's partials), `experts_reduce` (dx +=): every
//! weight is read once and every weight gradient read and written once. Values (x, weights,
//! saved activations) F32 or BF16, one dtype; dy, dx and the weight gradients F32. At most
//! [`MAX_EXPERTS`] experts (the pointer tables travel in the parameter struct).

use super::backend::GpuBackend;
use super::launch::{dptr, grid_x, grid_y, launch, workspace};
use super::{DevicePtr, Dim3, Gpu, LaunchConfig, NvtxRange};
use crate::backend::{ExpertWeights, ExpertsOut};
use crate::cpu::experts::{all_weights, bwd_dims, bwd_operands, experts_dims, ExpertDims};
use crate::{DType, Error, Result, Tensor};
use bytemuck::{Pod, Zeroable};
use std::sync::Arc;

/// `EXPERTS_MAX`: the size of the pointer tables.
pub const MAX_EXPERTS: usize = 32;
/// `EXPERTS_THREADS`: threads per block of the forward (8 warps, one output row each).
pub const THREADS: u32 = 256;
/// `EXPERTS_WARPS`.
pub const WARPS: usize = 8;
/// `EXPERTS_OC`: output rows per block of `experts_wgrad` (its partials' chunk).
pub const OUT_CHUNK: usize = 32;
/// `EXPERTS_KT`: input columns per block of `experts_wgrad` (one per thread).
pub const K_TILE: usize = 128;

// ---- parameter structs (mirrors of experts.cu) ---------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ExpertsFwdParams {
    w1: [DevicePtr; MAX_EXPERTS],
    w2: [DevicePtr; MAX_EXPERTS],
    v: DevicePtr,
    a: DevicePtr,
    b: DevicePtr,
    h: DevicePtr,
    experts: u64,
    rows: u64,
    n: u64,
    k: u64,
}
const _: () = assert!(std::mem::size_of::<ExpertsFwdParams>() == 8 * 2 * MAX_EXPERTS + 64);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ExpertsGateGradParams {
    part: DevicePtr,
    a: DevicePtr,
    b: DevicePtr,
    ga: DevicePtr,
    gb: DevicePtr,
    n: u64,
    chunks: u64,
}
const _: () = assert!(std::mem::size_of::<ExpertsGateGradParams>() == 56);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ExpertsWgradParams {
    w1: [DevicePtr; MAX_EXPERTS],
    w2: [DevicePtr; MAX_EXPERTS],
    dw1: [DevicePtr; MAX_EXPERTS],
    dw2: [DevicePtr; MAX_EXPERTS],
    ga: DevicePtr,
    gb: DevicePtr,
    v: DevicePtr,
    part: DevicePtr,
    experts: u64,
    rows: u64,
    n: u64,
    k: u64,
}
const _: () = assert!(std::mem::size_of::<ExpertsWgradParams>() == 8 * 4 * MAX_EXPERTS + 64);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ExpertsReduceParams {
    part: DevicePtr,
    dst: DevicePtr,
    n: u64,
    chunks: u64,
}
const _: () = assert!(std::mem::size_of::<ExpertsReduceParams>() == 32);

// ---- launch configurations -----------------------------------------------------------------------

/// The forward of a stage with `n` output rows: a warp per row, grid (⌈n / 8⌉, E).
pub fn fwd_grid(op: &'static str, n: usize, e: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid: Dim3::xy(grid_x(op, n.div_ceil(WARPS))?, grid_y(op, e)?),
        block: Dim3::x(THREADS),
        shared_bytes: 0,
    })
}

/// `experts_wgrad` of a stage with weights `[n, k]`: grid (⌈k / 128⌉, ⌈n / 32⌉, E), 128 threads.
pub fn wgrad_grid(op: &'static str, n: usize, k: usize, e: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid: Dim3 {
            x: grid_x(op, k.div_ceil(K_TILE))?,
            y: grid_y(op, n.div_ceil(OUT_CHUNK))?,
            z: grid_y(op, e)?,
        },
        block: Dim3::x(K_TILE as u32),
        shared_bytes: 0,
    })
}

/// An elementwise kernel over `n` elements: 256 threads per block.
pub fn flat_grid(op: &'static str, n: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid: Dim3::x(grid_x(op, n.div_ceil(THREADS as usize))?),
        block: Dim3::x(THREADS),
        shared_bytes: 0,
    })
}

fn value_symbol(dt: DType, stems: [&'static str; 2]) -> &'static str {
    if dt == DType::BF16 {
        stems[1]
    } else {
        stems[0]
    }
}

/// The value dtype (F32 or BF16) shared by `x` and every weight, and the expert count limit.
fn value_dtype(op: &'static str, x: &Tensor, w: &ExpertWeights<'_>, e: usize) -> Result<DType> {
    let dt = x.dtype();
    if !matches!(dt, DType::F32 | DType::BF16) {
        return Err(Error::dtype(op, dt, "the experts take F32 or BF16 values on the GPU"));
    }
    if let Some(t) = all_weights(w).iter().find(|t| t.dtype() != dt) {
        return Err(Error::dtype(op, t.dtype(), format!("the expert weights must be {dt}, as x")));
    }
    if e > MAX_EXPERTS {
        return Err(Error::invalid(
            op,
            format!("{e} experts: the GPU experts kernels take at most {MAX_EXPERTS}"),
        ));
    }
    Ok(dt)
}

/// The pointer table of `ts` (each checked: on `gpu`, `dt`, `numel` elements), zero-padded.
fn table<G: Gpu>(
    gpu: &Arc<G>,
    op: &'static str,
    ts: &[Tensor],
    dt: DType,
    numel: usize,
) -> Result<[DevicePtr; MAX_EXPERTS]> {
    let mut out = [0; MAX_EXPERTS];
    for (slot, t) in out.iter_mut().zip(ts) {
        *slot = dptr(gpu, op, t, dt, numel)?;
    }
    Ok(out)
}

// ---- the GpuBackend ops -----------------------------------------------------------------------

pub(super) fn experts_fwd<G: Gpu>(
    be: &GpuBackend<G>,
    x: &Tensor,
    w: ExpertWeights<'_>,
) -> Result<ExpertsOut> {
    const OP: &str = "experts_fwd";
    be.on_device(OP, &[x])?;
    be.on_device(OP, &all_weights(&w))?;
    let ExpertDims { e, r, d, f } = experts_dims(OP, x, w)?;
    let dt = value_dtype(OP, x, &w, e)?;
    let (inner, outer) = ([e, r, f], [e, r, d]);
    let out = ExpertsOut {
        y: be.empty(&outer, dt)?,
        a1: be.empty(&inner, dt)?,
        b1: be.empty(&inner, dt)?,
        u: be.empty(&inner, dt)?,
        a2: be.empty(&outer, dt)?,
        b2: be.empty(&outer, dt)?,
    };
    if r == 0 {
        return Ok(out);
    }
    let gpu = be.gpu();
    let (ni, no) = (e * r * f, e * r * d);
    let stage1 = ExpertsFwdParams {
        w1: table(gpu, OP, w.gate_up, dt, f * d)?,
        w2: table(gpu, OP, w.up, dt, f * d)?,
        v: dptr(gpu, OP, x, dt, no)?,
        a: dptr(gpu, OP, &out.a1, dt, ni)?,
        b: dptr(gpu, OP, &out.b1, dt, ni)?,
        h: dptr(gpu, OP, &out.u, dt, ni)?,
        experts: e as u64,
        rows: r as u64,
        n: f as u64,
        k: d as u64,
    };
    let stage2 = ExpertsFwdParams {
        w1: table(gpu, OP, w.gate_down, dt, d * f)?,
        w2: table(gpu, OP, w.down, dt, d * f)?,
        v: stage1.h,
        a: dptr(gpu, OP, &out.a2, dt, no)?,
        b: dptr(gpu, OP, &out.b2, dt, no)?,
        h: dptr(gpu, OP, &out.y, dt, no)?,
        experts: e as u64,
        rows: r as u64,
        n: d as u64,
        k: f as u64,
    };
    let sym = value_symbol(dt, ["experts_fwd_f32", "experts_fwd_bf16"]);
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    launch(gpu.as_ref(), sym, fwd_grid(OP, f, e)?, &stage1)?;
    launch(gpu.as_ref(), sym, fwd_grid(OP, d, e)?, &stage2)?;
    Ok(out)
}

pub(super) fn experts_bwd<G: Gpu>(
    be: &GpuBackend<G>,
    x: &Tensor,
    w: ExpertWeights<'_>,
    saved: &ExpertsOut,
    dy: &Tensor,
    dx: &Tensor,
    dw: ExpertWeights<'_>,
) -> Result<()> {
    const OP: &str = "experts_bwd";
    let (ins, outs) = bwd_operands(x, &w, saved, dy, dx, &dw);
    be.on_device(OP, &ins)?;
    be.on_device(OP, &outs)?;
    let m = bwd_dims(OP, x, w, saved, dy, dx, dw)?;
    let ExpertDims { e, r, d, f } = m;
    let dt = value_dtype(OP, x, &w, e)?;
    if r == 0 {
        return Ok(());
    }
    let gpu = be.gpu();
    let fl = DType::F32;
    let (ni, no) = (e * r * f, e * r * d);
    let ptr = |t: &Tensor, dtype: DType, n: usize| dptr(gpu, OP, t, dtype, n);
    let (ga2, gb2) = (workspace(gpu, no * 4)?, workspace(gpu, no * 4)?);
    let (ga1, gb1) = (workspace(gpu, ni * 4)?, workspace(gpu, ni * 4)?);
    let chunks2 = d.div_ceil(OUT_CHUNK);
    let chunks1 = f.div_ceil(OUT_CHUNK);
    let part2 = workspace(gpu, chunks2 * ni * 4)?;
    let part1 = workspace(gpu, chunks1 * no * 4)?;
    let gate = value_symbol(dt, ["experts_gate_grad_f32", "experts_gate_grad_bf16"]);
    let wgrad = value_symbol(dt, ["experts_wgrad_f32", "experts_wgrad_bf16"]);
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    let g2 = ExpertsGateGradParams {
        part: ptr(dy, fl, no)?,
        a: ptr(&saved.a2, dt, no)?,
        b: ptr(&saved.b2, dt, no)?,
        ga: ga2.ptr(),
        gb: gb2.ptr(),
        n: no as u64,
        chunks: 1,
    };
    launch(gpu.as_ref(), gate, flat_grid(OP, no)?, &g2)?;
    let w2 = ExpertsWgradParams {
        w1: table(gpu, OP, w.gate_down, dt, d * f)?,
        w2: table(gpu, OP, w.down, dt, d * f)?,
        dw1: table(gpu, OP, dw.gate_down, fl, d * f)?,
        dw2: table(gpu, OP, dw.down, fl, d * f)?,
        ga: ga2.ptr(),
        gb: gb2.ptr(),
        v: ptr(&saved.u, dt, ni)?,
        part: part2.ptr(),
        experts: e as u64,
        rows: r as u64,
        n: d as u64,
        k: f as u64,
    };
    launch(gpu.as_ref(), wgrad, wgrad_grid(OP, d, f, e)?, &w2)?;
    let g1 = ExpertsGateGradParams {
        part: part2.ptr(),
        a: ptr(&saved.a1, dt, ni)?,
        b: ptr(&saved.b1, dt, ni)?,
        ga: ga1.ptr(),
        gb: gb1.ptr(),
        n: ni as u64,
        chunks: chunks2 as u64,
    };
    launch(gpu.as_ref(), gate, flat_grid(OP, ni)?, &g1)?;
    let w1 = ExpertsWgradParams {
        w1: table(gpu, OP, w.gate_up, dt, f * d)?,
        w2: table(gpu, OP, w.up, dt, f * d)?,
        dw1: table(gpu, OP, dw.gate_up, fl, f * d)?,
        dw2: table(gpu, OP, dw.up, fl, f * d)?,
        ga: ga1.ptr(),
        gb: gb1.ptr(),
        v: ptr(x, dt, no)?,
        part: part1.ptr(),
        experts: e as u64,
        rows: r as u64,
        n: f as u64,
        k: d as u64,
    };
    launch(gpu.as_ref(), wgrad, wgrad_grid(OP, f, d, e)?, &w1)?;
    let red = ExpertsReduceParams {
        part: part1.ptr(),
        dst: ptr(dx, fl, no)?,
        n: no as u64,
        chunks: chunks1 as u64,
    };
    launch(gpu.as_ref(), "experts_reduce", flat_grid(OP, no)?, &red)
}
