//! The lm_head projection fused with softmax cross entropy on the GPU (`kernels-cu/lm_head_ce.cu`
//! for the softmax-CE rows and the loss sum, `Gpu::gemm` for the logits; reference
//! `cpu/lm_head_ce.rs`): the parameter structs, the launchers, and the `GpuBackend` ops.

use super::backend::{distinct, ptr, GpuBackend};
use super::elementwise::launch_cast_f32_bf16;
use super::launch::{gemm, gemm_desc, grid_x, launch, workspace};
use super::{DevicePtr, Dim3, Gpu, LaunchConfig, NvtxRange, Op};
use crate::backend::{Backend, CrossEntropy, CrossEntropyOut};
use crate::{DType, Error, Result, Tensor};
use bytemuck::{Pod, Zeroable};
use std::sync::Arc;

// ---- parameter structs (mirrors of lm_head_ce.cu) -------------------------------------------------

/// `SoftmaxCeFwdParams` of `lm_head_ce.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SoftmaxCeFwdParams {
    logits: DevicePtr,  // (rows, v)
    targets: DevicePtr, // (rows)
    lse: DevicePtr,     // (rows)
    nll: DevicePtr,     // (rows)
    rows: u64,
    v: u64,
    ignore_index: i64,
    target_kind: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<SoftmaxCeFwdParams>() == 64);

/// `SoftmaxCeBwdParams` of `lm_head_ce.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SoftmaxCeBwdParams {
    logits: DevicePtr,  // (rows, v), in place
    targets: DevicePtr, // (rows)
    lse: DevicePtr,     // (rows)
    dloss: DevicePtr,   // (1)
    rows: u64,
    v: u64,
    ignore_index: i64,
    scale: f32,
    target_kind: u32,
}
const _: () = assert!(std::mem::size_of::<SoftmaxCeBwdParams>() == 64);

/// `SumF32Params` of `lm_head_ce.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SumF32Params {
    x: DevicePtr,   // (n)
    out: DevicePtr, // (1)
    n: u64,
}
const _: () = assert!(std::mem::size_of::<SumF32Params>() == 24);

// ---- launch configurations --------------------------------------------------------------------

/// Threads per block of the softmax-CE row kernels: one warp per 256 classes, 1 to 32 warps
/// (the 151,936-class vocabulary gets 1024 threads).
pub fn vocab_block(v: usize) -> u32 {
    32 * v.div_ceil(256).clamp(1, 32) as u32
}

/// The one-block reduction of `sum_f32`.
pub const SUM_BLOCK: u32 = 256;

// ---- softmax cross entropy ----------------------------------------------------------------------

/// How targets are stored on the device (`STEEL_TARGETS_*` of `lm_head_ce.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    I32 = 0,
    U32 = 1,
}

impl TargetKind {
    pub fn of(op: &'static str, dtype: DType) -> Result<TargetKind> {
        match dtype {
            DType::I32 => Ok(TargetKind::I32),
            DType::U32 => Ok(TargetKind::U32),
            other => Err(Error::dtype(op, other, "targets on the GPU must be I32 or U32")),
        }
    }
}

/// A chunk of token rows of the fused lm_head + cross entropy: device addresses of the chunk's
/// first row in each buffer. Built by the GPU backend from checked tensors.
#[derive(Clone, Copy, Debug)]
pub struct CeChunk {
    /// `(rows, v)` f32 logits (dlogits in place for the backward).
    pub logits: DevicePtr,
    /// `(rows)` targets.
    pub targets: DevicePtr,
    pub target_kind: TargetKind,
    /// `(rows)` f32.
    pub lse: DevicePtr,
    pub rows: usize,
    pub v: usize,
    pub ignore_index: i64,
}

/// Per row of the chunk: `lse` and `nll` (`(rows)` f32), streamed over the vocabulary.
///
/// # Safety
/// Every address of `c` and `nll` covers its `(rows[, v])` elements in live memory of `gpu`.
pub unsafe fn softmax_ce_fwd<G: Gpu>(gpu: &Arc<G>, c: &CeChunk, nll: DevicePtr) -> Result<()> {
    const OP: &str = "softmax_ce_fwd";
    let p = SoftmaxCeFwdParams {
        logits: c.logits,
        targets: c.targets,
        lse: c.lse,
        nll,
        rows: c.rows as u64,
        v: c.v as u64,
        ignore_index: c.ignore_index,
        target_kind: c.target_kind as u32,
        pad: 0,
    };
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    let cfg = LaunchConfig {
        grid: Dim3::x(grid_x(OP, c.rows)?),
        block: Dim3::x(vocab_block(c.v)),
        shared_bytes: 0,
    };
    launch(gpu.as_ref(), "softmax_ce_fwd_f32", cfg, &p)
}

/// In place: `logits ← dloss[0] · scale · (softmax − onehot)`, 0 on ignored rows.
///
/// # Safety
/// As [`softmax_ce_fwd`]; `dloss` addresses one live f32.
pub unsafe fn softmax_ce_bwd<G: Gpu>(
    gpu: &Arc<G>,
    c: &CeChunk,
    dloss: DevicePtr,
    scale: f32,
) -> Result<()> {
    const OP: &str = "softmax_ce_bwd";
    let p = SoftmaxCeBwdParams {
        logits: c.logits,
        targets: c.targets,
        lse: c.lse,
        dloss,
        rows: c.rows as u64,
        v: c.v as u64,
        ignore_index: c.ignore_index,
        scale,
        target_kind: c.target_kind as u32,
    };
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    let cfg = LaunchConfig {
        grid: Dim3::x(grid_x(OP, c.rows)?),
        block: Dim3::x(vocab_block(c.v)),
        shared_bytes: 0,
    };
    launch(gpu.as_ref(), "softmax_ce_bwd_f32", cfg, &p)
}

/// `out[0] = Σ x` over `n` f32 values in one block (fixed order: deterministic).
///
/// # Safety
/// `x` covers `n` f32 and `out` one f32 of live memory of `gpu`.
pub unsafe fn sum_f32<G: Gpu>(gpu: &Arc<G>, x: DevicePtr, n: usize, out: DevicePtr) -> Result<()> {
    let p = SumF32Params { x, out, n: n as u64 };
    let _range = NvtxRange::new(gpu.as_ref(), "sum");
    let cfg = LaunchConfig { grid: Dim3::x(1), block: Dim3::x(SUM_BLOCK), shared_bytes: 0 };
    launch(gpu.as_ref(), "sum_f32", cfg, &p)
}

// ---- the GpuBackend ops ----------------------------------------------------------------------

/// `CeCountParams` of `lm_head_ce.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct CeCountParams {
    targets: DevicePtr, // (n)
    out: DevicePtr,     // (2) u64
    n: u64,
    v: u64,
    ignore_index: i64,
    target_kind: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<CeCountParams>() == 48);

/// The number of counted targets, counted on the device with their validity: the op downloads
/// two words instead of the targets. An invalid target (outside `0..v`, not the ignore index)
/// is an error naming its position and value.
fn count_targets<G: Gpu>(
    be: &GpuBackend<G>,
    op: &'static str,
    targets: &Tensor,
    kind: TargetKind,
    v: usize,
    ignore: i64,
) -> Result<usize> {
    let n = targets.numel();
    if n == 0 {
        return Ok(0);
    }
    let gpu = be.gpu();
    let out = workspace(gpu, 16)?;
    let p = CeCountParams {
        targets: ptr(targets),
        out: out.ptr(),
        n: n as u64,
        v: v as u64,
        ignore_index: ignore,
        target_kind: kind as u32,
        pad: 0,
    };
    let cfg = LaunchConfig { grid: Dim3::x(1), block: Dim3::x(COUNT_BLOCK), shared_bytes: 0 };
    launch(gpu.as_ref(), "ce_count_targets", cfg, &p)?;
    let mut words = [0u8; 16];
    // SAFETY: out holds two u64.
    unsafe { gpu.download(out.ptr(), &mut words)? };
    let count = u64::from_le_bytes(words[..8].try_into().unwrap_or_default());
    let bad = u64::from_le_bytes(words[8..].try_into().unwrap_or_default()) as usize;
    if bad < n {
        let mut t = [0u8; 4];
        // SAFETY: position bad < n lies inside the targets (4-byte elements).
        unsafe { gpu.download(ptr(targets) + 4 * bad as u64, &mut t)? };
        let value = match kind {
            TargetKind::I32 => i64::from(i32::from_le_bytes(t)),
            TargetKind::U32 => i64::from(u32::from_le_bytes(t)),
        };
        return Err(Error::invalid(
            op,
            format!(
                "target {value} at position {bad} is outside 0..{v} and not the ignore index \
                 {ignore}"
            ),
        ));
    }
    Ok(count as usize)
}

/// Threads of the one-block target count.
pub const COUNT_BLOCK: u32 = 256;

/// The shapes of the op, and the GEMM operand dtype: `x` and `w` both F32 or both BF16.
fn ce_dims<G: Gpu>(
    be: &GpuBackend<G>,
    op: &'static str,
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    spec: CrossEntropy,
) -> Result<(usize, usize, usize, DType)> {
    be.on_device(op, &[x, w, targets])?;
    let crate::cpu::lm_head_ce::Dims { n, h, v } =
        crate::cpu::lm_head_ce::dims(op, x, w, targets, spec)?;
    let ab = match (x.dtype(), w.dtype()) {
        (DType::F32, DType::F32) => DType::F32,
        (DType::BF16, DType::BF16) => DType::BF16,
        (a, b) => {
            return Err(Error::dtype(
                op,
                b,
                format!("x is {a}: x and w are both F32 or both BF16 (the GEMMs' operands)"),
            ))
        }
    };
    Ok((n, h, v, ab))
}

pub(super) fn lm_head_ce_fwd<G: Gpu>(
    be: &GpuBackend<G>,
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    spec: CrossEntropy,
) -> Result<CrossEntropyOut> {
    const OP: &str = "lm_head_ce_fwd";
    let dims = ce_dims(be, OP, x, w, targets, spec)?;
    let kind = TargetKind::of(OP, targets.dtype())?;
    let count = count_targets(be, OP, targets, kind, dims.2, spec.ignore_index)?;
    ce_fwd(be, x, w, targets, spec, dims, kind, count)
}

/// `lm_head_ce_fwd` with the caller's count: nothing is downloaded or counted (see
/// `Backend::lm_head_ce_fwd_counted`).
pub(super) fn lm_head_ce_fwd_counted<G: Gpu>(
    be: &GpuBackend<G>,
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    spec: CrossEntropy,
    count: usize,
) -> Result<CrossEntropyOut> {
    const OP: &str = "lm_head_ce_fwd_counted";
    let dims = ce_dims(be, OP, x, w, targets, spec)?;
    let kind = TargetKind::of(OP, targets.dtype())?;
    if count > dims.0 {
        return Err(Error::invalid(OP, format!("count {count} exceeds the {} targets", dims.0)));
    }
    ce_fwd(be, x, w, targets, spec, dims, kind, count)
}

/// The forward's chunks (logits GEMM, softmax-CE rows, the loss sum) on operands `ce_dims`
/// has checked.
#[allow(clippy::too_many_arguments)]
fn ce_fwd<G: Gpu>(
    be: &GpuBackend<G>,
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    spec: CrossEntropy,
    (n, h, v, ab): (usize, usize, usize, DType),
    kind: TargetKind,
    count: usize,
) -> Result<CrossEntropyOut> {
    let es = ab.size_in_bytes();
    let lse = be.empty(&[n], DType::F32)?;
    let loss_sum = be.empty(&[1], DType::F32)?;
    let _range = NvtxRange::new(be.gpu().as_ref(), "lm_head_ce_fwd");
    if n == 0 {
        be.fill(&loss_sum, 0.0)?;
        return Ok(CrossEntropyOut { loss_sum, lse, count });
    }
    let chunk = spec.chunk_tokens.min(n);
    let nll = workspace(be.gpu(), n * 4)?;
    let logits = workspace(be.gpu(), chunk * v * 4)?;
    let tsize = targets.dtype().size_in_bytes() as u64;
    for r0 in (0..n).step_by(chunk) {
        let rows = chunk.min(n - r0);
        let desc = gemm_desc(rows, v, h, Op::N, Op::T, ab, 0.0);
        let c = CeChunk {
            logits: logits.ptr(),
            targets: ptr(targets) + r0 as u64 * tsize,
            target_kind: kind,
            lse: ptr(&lse) + r0 as u64 * 4,
            rows,
            v,
            ignore_index: spec.ignore_index,
        };
        // SAFETY: x holds n·h elements (rows r0.. are inside), w v·h, logits chunk·v ≥ rows·v
        // f32; targets, lse and nll hold n elements, so the chunk's rows are inside.
        unsafe {
            let x_rows = ptr(x) + (r0 * h * es) as u64;
            gemm(be.gpu(), "logits", &desc, x_rows, ptr(w), logits.ptr())?;
            softmax_ce_fwd(be.gpu(), &c, nll.ptr() + r0 as u64 * 4)?;
        }
    }
    // SAFETY: nll holds n f32, loss_sum one.
    unsafe { sum_f32(be.gpu(), nll.ptr(), n, ptr(&loss_sum))? };
    Ok(CrossEntropyOut { loss_sum, lse, count })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn lm_head_ce_bwd<G: Gpu>(
    be: &GpuBackend<G>,
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    dloss: &Tensor,
    scale: f64,
    spec: CrossEntropy,
    dx: &Tensor,
    dw: &Tensor,
) -> Result<()> {
    const OP: &str = "lm_head_ce_bwd";
    let (n, h, v, ab) = ce_dims(be, OP, x, w, targets, spec)?;
    be.on_device(OP, &[lse, dloss, dx, dw])?;
    distinct(OP, &[dx, dw], &[x, w, targets, lse, dloss])?;
    for t in [lse, dloss, dx, dw] {
        if t.dtype() != DType::F32 {
            return Err(Error::dtype(OP, t.dtype(), "lse, dloss and the gradients must be F32"));
        }
    }
    if lse.numel() != n || dloss.numel() != 1 || dx.shape() != x.shape() || dw.shape() != w.shape()
    {
        return Err(Error::shape(
            OP,
            format!(
                "lse {:?}, dloss {:?}, dx {:?} or dw {:?} do not fit",
                lse.shape(),
                dloss.shape(),
                dx.shape(),
                dw.shape()
            ),
        ));
    }
    // No download: the softmax-CE backward only compares targets with class indices, so an
    // invalid one (which the forward reports) cannot make it touch memory out of bounds.
    let kind = TargetKind::of(OP, targets.dtype())?;
    if n == 0 {
        return Ok(());
    }
    let es = ab.size_in_bytes();
    let _range = NvtxRange::new(be.gpu().as_ref(), "lm_head_ce_bwd");
    let chunk = spec.chunk_tokens.min(n);
    let logits = workspace(be.gpu(), chunk * v * 4)?;
    // bf16 x/w: the f32 dlogits of a chunk are rounded to bf16 for the dx/dw GEMMs (both GEMM
    // operands share a dtype; the outputs stay f32).
    let dlogits16 =
        if ab == DType::BF16 { Some(workspace(be.gpu(), chunk * v * 2)?) } else { None };
    let tsize = targets.dtype().size_in_bytes() as u64;
    for r0 in (0..n).step_by(chunk) {
        let rows = chunk.min(n - r0);
        let x_rows = ptr(x) + (r0 * h * es) as u64;
        let c = CeChunk {
            logits: logits.ptr(),
            targets: ptr(targets) + r0 as u64 * tsize,
            target_kind: kind,
            lse: ptr(lse) + r0 as u64 * 4,
            rows,
            v,
            ignore_index: spec.ignore_index,
        };
        // SAFETY: as in the forward; dx rows r0.. lie inside n·h, dw is v·h, and neither
        // overlaps the inputs or the logits workspaces (checked / fresh).
        unsafe {
            let logits_desc = gemm_desc(rows, v, h, Op::N, Op::T, ab, 0.0);
            gemm(be.gpu(), "logits", &logits_desc, x_rows, ptr(w), logits.ptr())?;
            softmax_ce_bwd(be.gpu(), &c, ptr(dloss), scale as f32)?;
            let dlogits = match &dlogits16 {
                Some(d16) => {
                    launch_cast_f32_bf16(be.gpu(), logits.ptr(), d16.ptr(), rows * v)?;
                    d16.ptr()
                }
                None => logits.ptr(),
            };
            let dx_desc = gemm_desc(rows, h, v, Op::N, Op::N, ab, 1.0);
            gemm(be.gpu(), "dx", &dx_desc, dlogits, ptr(w), ptr(dx) + (r0 * h * 4) as u64)?;
            let dw_desc = gemm_desc(v, h, rows, Op::T, Op::N, ab, 1.0);
            gemm(be.gpu(), "dw", &dw_desc, dlogits, x_rows, ptr(dw))?;
        }
    }
    Ok(())
}
