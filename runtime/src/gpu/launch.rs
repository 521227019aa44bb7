//! The launchers: the only way into a kernel. Each owns its launch configuration (grid, block,
//! shared memory), packs the kernel's `#[repr(C)]` parameter struct (mirrored from the `.cu`
//! source, sizes asserted on both sides), allocates its workspaces, checks that every buffer is
//! on this `Gpu` and large enough for what the kernel touches, and opens an NVTX range named
//! after the op. Written once for every [`Gpu`].
//!
//! Conventions: tensors are contiguous device tensors of the same `Gpu`; gradients accumulate
//! (`+=`) as in the `Backend` contract; 64-bit sizes and offsets everywhere.

use super::{DevicePtr, Dim3, GemmDesc, Gpu, GpuBuffer, LaunchConfig, NvtxRange, Op};
use crate::backend::{AdamW, AdamWParam};
use crate::{DType, Error, Result, Tensor};
use bytemuck::{Pod, Zeroable};
use std::sync::Arc;

// ---- parameter structs (mirrors of kernels-cu) --------------------------------------------------

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

/// `AdamWTensor` of `adamw.cu` (one row of the device table).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AdamWTensor {
    param: DevicePtr, // (n)
    grad: DevicePtr,  // (n)
    m: DevicePtr,     // (n)
    v: DevicePtr,     // (n)
    copy: DevicePtr,  // (n) bf16, or 0
    n: u64,
    block_start: u64,
    decay: f32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<AdamWTensor>() == 64);

/// `AdamWParams` of `adamw.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AdamWParams {
    tensors: DevicePtr, // (count) AdamWTensor
    count: u64,
    elems_per_block: u64,
    beta1: f32,
    beta2: f32,
    eps: f32,
    grad_scale: f32,
    step_size: f32,
    bc2_sqrt: f32,
}
const _: () = assert!(std::mem::size_of::<AdamWParams>() == 48);

/// `SoftmaxCeFwdParams` of `cross_entropy.cu`.
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

/// `SoftmaxCeBwdParams` of `cross_entropy.cu`.
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

/// `SumF32Params` of `cross_entropy.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SumF32Params {
    x: DevicePtr,   // (n)
    out: DevicePtr, // (1)
    n: u64,
}
const _: () = assert!(std::mem::size_of::<SumF32Params>() == 24);

/// `MmaTileGemmParams` of `mma_gemm.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MmaTileGemmParams {
    a: DevicePtr, // (m, k) bf16
    b: DevicePtr, // (n, k) bf16
    c: DevicePtr, // (m, n) f32
    m: u64,
    n: u64,
    k: u64,
}
const _: () = assert!(std::mem::size_of::<MmaTileGemmParams>() == 48);

// ---- launch configurations (pure functions of the shape) ---------------------------------------

/// Threads per block of the row kernels (one block per row): one warp per 256 elements of the
/// row, between 1 and 8 warps (h = 1792 → 224 threads, 8 elements each).
pub fn row_block(h: usize) -> u32 {
    32 * h.div_ceil(256).clamp(1, 8) as u32
}

/// Threads per block of the softmax-CE row kernels: one warp per 256 classes, 1 to 32 warps
/// (the 151,936-class vocabulary gets 1024 threads).
pub fn vocab_block(v: usize) -> u32 {
    32 * v.div_ceil(256).clamp(1, 32) as u32
}

/// Rows per partial sum of the RMSNorm weight gradient (as the CPU's `ROW_BLOCK`).
pub const DW_ROWS_PER_CHUNK: usize = 64;
/// Threads per block of the column kernels (dw).
pub const COLUMN_BLOCK: u32 = 128;
/// AdamW: threads per block and elements per block.
pub const ADAMW_BLOCK: u32 = 256;
pub const ADAMW_ELEMS_PER_BLOCK: usize = 256 * 8;
/// The one-block reduction of `sum_f32`.
pub const SUM_BLOCK: u32 = 256;
/// The mma tile GEMM: 4 warps per 64×64 output tile.
pub const MMA_TILE: usize = 64;
pub const MMA_BLOCK: u32 = 128;

/// The largest grid.x a launch may use.
const MAX_GRID_X: usize = (1 << 31) - 1;

fn grid_x(op: &'static str, n: usize) -> Result<u32> {
    if n == 0 || n > MAX_GRID_X {
        return Err(Error::invalid(op, format!("{n} blocks do not fit a grid (1 ..= 2^31 − 1)")));
    }
    Ok(n as u32)
}

fn grid_y(op: &'static str, n: usize) -> Result<u32> {
    if n == 0 || n > 65_535 {
        return Err(Error::invalid(op, format!("{n} blocks do not fit grid.y (1 ..= 65535)")));
    }
    Ok(n as u32)
}

// ---- helpers ------------------------------------------------------------------------------------

fn same_gpu<G: Gpu>(gpu: &Arc<G>, buf: &GpuBuffer) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(gpu), Arc::as_ptr(buf.gpu()))
}

/// The device address of `t`, after checking that it lives on `gpu`, has `dtype` and at least
/// `numel` elements.
fn dptr<G: Gpu>(
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

fn opt_dptr<G: Gpu>(
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

fn launch<G: Gpu, P: Pod>(gpu: &G, symbol: &'static str, cfg: LaunchConfig, p: &P) -> Result<()> {
    if cfg.shared_bytes > DEFAULT_DYNAMIC_SHARED {
        gpu.opt_in_dynamic_shared(symbol, cfg.shared_bytes)?;
    }
    // SAFETY: every launcher below packs `P` as the exact mirror of the kernel's struct (size
    // asserted here and in the .cu source) and has checked that each pointer addresses a live
    // buffer of this Gpu large enough for what the kernel touches under `cfg`.
    unsafe { gpu.launch(symbol, cfg, bytemuck::bytes_of(p)) }
}

// ---- add_rms_norm -------------------------------------------------------------------------------

/// Forward of RMSNorm over the last axis of `x [rows, h]`, fused with the residual add when `r`
/// is given: `sum = x + r` (written when `sum` is given), `y = w ⊙ sum · rstd`.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_fwd<G: Gpu>(
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

/// Backward of [`add_rms_norm_fwd`] from the saved `sum` (or `x` of the plain norm) and `rstd`:
/// `g = dsum + rstd · (dy ⊙ w − x̂ · mean(dy ⊙ w ⊙ x̂))`, `dx += g`, `dr += g` (when given),
/// `dw += Σ_rows dy ⊙ x̂` (chunks of rows summed in order: deterministic).
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm_bwd<G: Gpu>(
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

// ---- AdamW --------------------------------------------------------------------------------------

/// One multi-tensor AdamW step over every parameter in ONE launch (PyTorch semantics, see
/// `adamw.cu`); the per-tensor table is uploaded to a workspace.
pub fn adamw_step<G: Gpu>(gpu: &Arc<G>, params: &[AdamWParam], hp: AdamW) -> Result<()> {
    const OP: &str = "adamw_step";
    if hp.step == 0 {
        return Err(Error::invalid(OP, "step is 1-based (bias correction divides by 1 − β^step)"));
    }
    let step = i32::try_from(hp.step)
        .map_err(|_| Error::invalid(OP, format!("step {} is out of range", hp.step)))?;
    let f = DType::F32;
    let mut table = Vec::with_capacity(params.len());
    let mut blocks = 0usize;
    for p in params {
        let n = p.param.numel();
        let row = AdamWTensor {
            param: dptr(gpu, OP, &p.param, f, n)?,
            grad: dptr(gpu, OP, &p.grad, f, n)?,
            m: dptr(gpu, OP, &p.m, f, n)?,
            v: dptr(gpu, OP, &p.v, f, n)?,
            copy: opt_dptr(gpu, OP, p.copy.as_ref(), DType::BF16, n)?,
            n: n as u64,
            block_start: blocks as u64,
            decay: 1.0 - hp.lr * p.weight_decay,
            pad: 0,
        };
        for (name, t) in [("grad", &p.grad), ("m", &p.m), ("v", &p.v)] {
            if t.shares_storage(&p.param) {
                return Err(Error::invalid(
                    OP,
                    format!("{name} shares storage with the parameter"),
                ));
            }
        }
        if n > 0 {
            table.push(row);
            blocks += n.div_ceil(ADAMW_ELEMS_PER_BLOCK);
        }
    }
    if table.is_empty() {
        return Ok(());
    }
    // The same f32 arithmetic as the CPU reference.
    let bc1 = 1.0f32 - hp.beta1.powi(step);
    let bc2_sqrt = (1.0f32 - hp.beta2.powi(step)).sqrt();
    let ws = workspace(gpu, std::mem::size_of_val(table.as_slice()))?;
    // SAFETY: the workspace holds exactly the table's bytes.
    unsafe { gpu.upload(ws.ptr(), bytemuck::cast_slice(&table))? };
    let p = AdamWParams {
        tensors: ws.ptr(),
        count: table.len() as u64,
        elems_per_block: ADAMW_ELEMS_PER_BLOCK as u64,
        beta1: hp.beta1,
        beta2: hp.beta2,
        eps: hp.eps,
        grad_scale: hp.grad_scale,
        step_size: hp.lr / bc1,
        bc2_sqrt,
    };
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    let cfg = LaunchConfig {
        grid: Dim3::x(grid_x(OP, blocks)?),
        block: Dim3::x(ADAMW_BLOCK),
        shared_bytes: 0,
    };
    launch(gpu.as_ref(), "adamw_step_f32", cfg, &p)
}

// ---- softmax cross entropy ----------------------------------------------------------------------

/// How targets are stored on the device (`STEEL_TARGETS_*` of `cross_entropy.cu`).
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

// ---- the mma tile GEMM test kernel --------------------------------------------------------------

/// `c [m, n] = a [m, k] · b [n, k]ᵀ` with the 64×64 ldmatrix/mma.sync tile kernel (bf16 in,
/// fp32 out). Groundwork for flash attention; production GEMMs go to [`Gpu::gemm`].
pub fn mma_tile_gemm<G: Gpu>(gpu: &Arc<G>, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<()> {
    const OP: &str = "mma_tile_gemm";
    let (&[m, k], &[n, k2]) = (a.shape(), b.shape()) else {
        return Err(Error::shape(
            OP,
            format!("a {:?} and b {:?} must be 2-D", a.shape(), b.shape()),
        ));
    };
    if k != k2 || c.shape() != [m, n] {
        return Err(Error::shape(
            OP,
            format!("a {:?}, b {:?} and c {:?} do not fit a·bᵀ", a.shape(), b.shape(), c.shape()),
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let p = MmaTileGemmParams {
        a: dptr(gpu, OP, a, DType::BF16, m * k)?,
        b: dptr(gpu, OP, b, DType::BF16, n * k)?,
        c: dptr(gpu, OP, c, DType::F32, m * n)?,
        m: m as u64,
        n: n as u64,
        k: k as u64,
    };
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    let cfg = LaunchConfig {
        grid: Dim3::xy(grid_x(OP, n.div_ceil(MMA_TILE))?, grid_y(OP, m.div_ceil(MMA_TILE))?),
        block: Dim3::x(MMA_BLOCK),
        shared_bytes: 0,
    };
    launch(gpu.as_ref(), "mma_tile_gemm_bf16", cfg, &p)
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
