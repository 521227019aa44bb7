//! Flash attention on the GPU (`kernels-cu/attention.cu`; reference `cpu/attention.rs`): the
//! parameter structs, the launch configurations, the launchers and the `GpuBackend` ops.
//!
//! The CPU backend's contract: `q [B, Tq, Hq, D]`, `k, v [B, Tk, Hkv, D]`, `Tq ≤ Tk` with the
//! queries at the end of the keys, causal, `Hkv | Hq`; `o [B, Tq, Hq, D]` and the f32
//! `lse [B, Hq, Tq]`. D is any multiple of 8 up to 128; the kernels pad it to the next multiple of
//! 16 in shared memory and registers only (`padded_head_dim`).
//!
//! Dtypes (docs/ARCHITECTURE.md, "GPU dtype policy"): the tensor cores take bf16, so BF16 q/k/v
//! go straight in and F32 ones are rounded to bf16 first (their results carry bf16 error); `o`
//! has q's dtype. The backward takes `d_o` F32 or BF16 (rounded to bf16 for the tensor cores and
//! for δ alike) and accumulates into F32 `dq, dk, dv`.
//!
//! Determinism: no atomics. The forward writes each output once; the backward runs δ =
//! rowsum(dO ⊙ O), then one block per KV tile for dK/dV (its query heads and query tiles in a
//! fixed order, accumulated in registers) and one block per query tile for dQ, each adding its
//! registers into the f32 gradient once.

use super::backend::{distinct, GpuBackend};
use super::launch::{dptr, grid_x, grid_y, launch};
use super::{elementwise, DevicePtr, Dim3, Gpu, LaunchConfig, NvtxRange};
use crate::cpu::attention::Dims;
use crate::{DType, Error, Result, Tensor};
use bytemuck::{Pod, Zeroable};

// ---- parameter structs (mirrors of attention.cu) ----------------------------------------------

/// `AttentionFwdParams` of `attention.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AttentionFwdParams {
    q: DevicePtr,   // [B, Tq, Hq, D] bf16
    k: DevicePtr,   // [B, Tk, Hkv, D] bf16
    v: DevicePtr,   // [B, Tk, Hkv, D] bf16
    o: DevicePtr,   // [B, Tq, Hq, D] bf16 or f32
    lse: DevicePtr, // [B, Hq, Tq] f32
    batch: u64,
    tq: u64,
    tk: u64,
    hq: u64,
    hkv: u64,
    d: u64,
    scale_log2: f32,
    o_f32: u32,
}
const _: () = assert!(std::mem::size_of::<AttentionFwdParams>() == 96);

/// `AttentionBwdParams` of `attention.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AttentionBwdParams {
    q: DevicePtr,     // [B, Tq, Hq, D] bf16
    k: DevicePtr,     // [B, Tk, Hkv, D] bf16
    v: DevicePtr,     // [B, Tk, Hkv, D] bf16
    d_o: DevicePtr,   // [B, Tq, Hq, D] bf16
    lse: DevicePtr,   // [B, Hq, Tq] f32
    delta: DevicePtr, // [B, Hq, Tq] f32
    dq: DevicePtr,    // [B, Tq, Hq, D] f32, +=
    dk: DevicePtr,    // [B, Tk, Hkv, D] f32, +=
    dv: DevicePtr,    // [B, Tk, Hkv, D] f32, +=
    batch: u64,
    tq: u64,
    tk: u64,
    hq: u64,
    hkv: u64,
    d: u64,
    scale: f32,
    scale_log2: f32,
}
const _: () = assert!(std::mem::size_of::<AttentionBwdParams>() == 128);

/// `AttentionDeltaParams` of `attention.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AttentionDeltaParams {
    d_o: DevicePtr,   // [B, Tq, Hq, D] bf16
    o: DevicePtr,     // [B, Tq, Hq, D] bf16
    delta: DevicePtr, // [B, Hq, Tq] f32
    batch: u64,
    tq: u64,
    hq: u64,
    d: u64,
}
const _: () = assert!(std::mem::size_of::<AttentionDeltaParams>() == 56);

// ---- launch configuration ---------------------------------------------------------------------

/// Queries (or keys) per tile and per block: 4 warps of 16 rows.
pub const ATTENTION_TILE: usize = 64;
/// Threads per block of the forward, dK/dV and dQ kernels.
pub const ATTENTION_BLOCK: u32 = 128;
/// Threads per block of the δ kernel (one thread per row).
pub const DELTA_BLOCK: u32 = 256;
/// The most blocks of a δ launch; the kernel strides over the rest.
pub const DELTA_MAX_BLOCKS: usize = 4096;
/// The largest head_dim the kernels take.
pub const MAX_HEAD_DIM: usize = 128;

/// The head_dim of the shared-memory tiles and registers: D rounded up to the mma k-step, 16.
pub fn padded_head_dim(d: usize) -> usize {
    d.div_ceil(16) * 16
}

/// Bytes of one 64-row shared tile of padded head_dim `dp` (rows of `dp + 8` bf16).
fn tile_bytes(dp: usize) -> usize {
    ATTENTION_TILE * (dp + 8) * 2
}

/// Dynamic shared memory of the forward kernel: Q, and K and V double-buffered.
pub fn fwd_shared_bytes(d: usize) -> usize {
    5 * tile_bytes(padded_head_dim(d))
}

/// Dynamic shared memory of the dK/dV kernel: K, V, Q and dO double-buffered, lse and δ of two
/// query tiles.
pub fn dkdv_shared_bytes(d: usize) -> usize {
    6 * tile_bytes(padded_head_dim(d)) + 4 * ATTENTION_TILE * 4
}

/// Dynamic shared memory of the dQ kernel: Q, dO, and K and V double-buffered.
pub fn dq_shared_bytes(d: usize) -> usize {
    6 * tile_bytes(padded_head_dim(d))
}

fn shared(op: &'static str, bytes: usize) -> Result<u32> {
    u32::try_from(bytes).map_err(|_| Error::invalid(op, format!("{bytes} bytes of shared memory")))
}

/// The CPU's shape checks passed; the kernels also need a head_dim that is a multiple of 8 up to
/// 128.
fn head_dim_limit(op: &'static str, dm: Dims) -> Result<Dims> {
    let d = dm.d;
    if d == 0 || !d.is_multiple_of(8) || d > MAX_HEAD_DIM {
        return Err(Error::shape(
            op,
            format!(
                "the GPU kernels take a head_dim that is a multiple of 8 up to {MAX_HEAD_DIM}, \
                 got {d}"
            ),
        ));
    }
    Ok(dm)
}

fn same_qkv_dtype(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return Err(Error::dtype(
            op,
            k.dtype(),
            format!("q, k and v must share a dtype (q is {})", q.dtype()),
        ));
    }
    Ok(())
}

/// `t` as bf16: itself when BF16, a rounded copy when F32.
fn as_bf16<G: Gpu>(be: &GpuBackend<G>, op: &'static str, t: &Tensor, what: &str) -> Result<Tensor> {
    match t.dtype() {
        DType::BF16 => Ok(t.clone()),
        DType::F32 => elementwise::cast(be, t, DType::BF16),
        other => Err(Error::dtype(op, other, format!("{what} must be BF16 or F32"))),
    }
}

/// The kernels of one padded head_dim, in launch order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionKernels {
    pub fwd: &'static str,
    /// One kernel per KV tile: dK and dV together up to head_dim 96, apart (dV, then dK) above,
    /// where both accumulators do not fit in registers beside the tiles.
    pub kv: &'static [&'static str],
    pub dq: &'static str,
}

/// The kernels for head_dim `d` (a multiple of 8 up to 128: one set per multiple of 16).
pub fn attention_kernels(d: usize) -> AttentionKernels {
    const K: [AttentionKernels; 8] = [
        AttentionKernels {
            fwd: "attention_fwd_d16",
            kv: &["attention_bwd_dkdv_d16"],
            dq: "attention_bwd_dq_d16",
        },
        AttentionKernels {
            fwd: "attention_fwd_d32",
            kv: &["attention_bwd_dkdv_d32"],
            dq: "attention_bwd_dq_d32",
        },
        AttentionKernels {
            fwd: "attention_fwd_d48",
            kv: &["attention_bwd_dkdv_d48"],
            dq: "attention_bwd_dq_d48",
        },
        AttentionKernels {
            fwd: "attention_fwd_d64",
            kv: &["attention_bwd_dkdv_d64"],
            dq: "attention_bwd_dq_d64",
        },
        AttentionKernels {
            fwd: "attention_fwd_d80",
            kv: &["attention_bwd_dkdv_d80"],
            dq: "attention_bwd_dq_d80",
        },
        AttentionKernels {
            fwd: "attention_fwd_d96",
            kv: &["attention_bwd_dkdv_d96"],
            dq: "attention_bwd_dq_d96",
        },
        AttentionKernels {
            fwd: "attention_fwd_d112",
            kv: &["attention_bwd_dv_d112", "attention_bwd_dk_d112"],
            dq: "attention_bwd_dq_d112",
        },
        AttentionKernels {
            fwd: "attention_fwd_d128",
            kv: &["attention_bwd_dv_d128", "attention_bwd_dk_d128"],
            dq: "attention_bwd_dq_d128",
        },
    ];
    K[(padded_head_dim(d) / 16).clamp(1, 8) - 1]
}

/// The grid of a kernel over query tiles (forward, dQ): `(q tiles, B·Hq)`, heaviest tiles
/// scheduled first by the kernels.
pub fn query_grid(b: usize, tq: usize, hq: usize) -> Result<Dim3> {
    const OP: &str = "attention";
    Ok(Dim3::xy(grid_x(OP, tq.div_ceil(ATTENTION_TILE))?, grid_y(OP, b * hq)?))
}

/// The grid of the dK/dV kernels: `(kv tiles, B·Hkv)`.
pub fn kv_grid(b: usize, tk: usize, hkv: usize) -> Result<Dim3> {
    const OP: &str = "attention_bwd";
    Ok(Dim3::xy(grid_x(OP, tk.div_ceil(ATTENTION_TILE))?, grid_y(OP, b * hkv)?))
}

/// The grid of the δ kernel over `rows = B·Tq·Hq` rows (a grid-stride loop past the cap).
pub fn delta_grid(rows: usize) -> u32 {
    rows.div_ceil(DELTA_BLOCK as usize).clamp(1, DELTA_MAX_BLOCKS) as u32
}

// ---- the ops ------------------------------------------------------------------------------------

pub(super) fn attention_fwd<G: Gpu>(
    be: &GpuBackend<G>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "attention_fwd";
    be.on_device(OP, &[q, k, v])?;
    let Dims { b, tq, tk, hq, hkv, d } =
        head_dim_limit(OP, crate::cpu::attention::dims(OP, q, k, v)?)?;
    same_qkv_dtype(OP, q, k, v)?;
    let (o_dtype, o_f32) = match q.dtype() {
        DType::BF16 => (DType::BF16, 0),
        DType::F32 => (DType::F32, 1),
        other => return Err(Error::dtype(OP, other, "q, k and v must be BF16 or F32")),
    };
    let o = be.empty(q.shape(), o_dtype)?;
    let lse = be.empty(&[b, hq, tq], DType::F32)?;
    if b == 0 || tq == 0 || hq == 0 {
        return Ok((o, lse));
    }
    let _range = NvtxRange::new(be.gpu().as_ref(), OP);
    let (q16, k16, v16) =
        (as_bf16(be, OP, q, "q")?, as_bf16(be, OP, k, "k")?, as_bf16(be, OP, v, "v")?);
    let gpu = be.gpu();
    let p = AttentionFwdParams {
        q: dptr(gpu, OP, &q16, DType::BF16, q.numel())?,
        k: dptr(gpu, OP, &k16, DType::BF16, k.numel())?,
        v: dptr(gpu, OP, &v16, DType::BF16, v.numel())?,
        o: dptr(gpu, OP, &o, o_dtype, q.numel())?,
        lse: dptr(gpu, OP, &lse, DType::F32, b * hq * tq)?,
        batch: b as u64,
        tq: tq as u64,
        tk: tk as u64,
        hq: hq as u64,
        hkv: hkv as u64,
        d: d as u64,
        scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
        o_f32,
    };
    let cfg = LaunchConfig {
        grid: query_grid(b, tq, hq)?,
        block: Dim3::x(ATTENTION_BLOCK),
        shared_bytes: shared(OP, fwd_shared_bytes(d))?,
    };
    launch(gpu.as_ref(), attention_kernels(d).fwd, cfg, &p)?;
    Ok((o, lse))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_bwd<G: Gpu>(
    be: &GpuBackend<G>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    scale: f64,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
) -> Result<()> {
    const OP: &str = "attention_bwd";
    be.on_device(OP, &[q, k, v, o, lse, d_o, dq, dk, dv])?;
    distinct(OP, &[dq, dk, dv], &[q, k, v, o, lse, d_o])?;
    let Dims { b, tq, tk, hq, hkv, d } = head_dim_limit(
        OP,
        crate::cpu::attention::bwd_dims(OP, [q, k, v, o, lse, d_o, dq, dk, dv])?,
    )?;
    same_qkv_dtype(OP, q, k, v)?;
    if lse.dtype() != DType::F32 {
        return Err(Error::dtype(OP, lse.dtype(), "lse must be F32"));
    }
    for (t, name) in [(dq, "dq"), (dk, "dk"), (dv, "dv")] {
        if t.dtype() != DType::F32 {
            return Err(Error::dtype(
                OP,
                t.dtype(),
                format!("{name} must be F32 (gradients accumulate in f32)"),
            ));
        }
    }
    if b == 0 || tq == 0 || hq == 0 {
        return Ok(());
    }
    let _range = NvtxRange::new(be.gpu().as_ref(), OP);
    let (q16, k16, v16) =
        (as_bf16(be, OP, q, "q")?, as_bf16(be, OP, k, "k")?, as_bf16(be, OP, v, "v")?);
    let (o16, do16) = (as_bf16(be, OP, o, "o")?, as_bf16(be, OP, d_o, "d_o")?);
    let gpu = be.gpu();
    let rows = b * tq * hq;
    let delta = be.empty(&[b, hq, tq], DType::F32)?;
    let dp = AttentionDeltaParams {
        d_o: dptr(gpu, OP, &do16, DType::BF16, q.numel())?,
        o: dptr(gpu, OP, &o16, DType::BF16, q.numel())?,
        delta: dptr(gpu, OP, &delta, DType::F32, rows)?,
        batch: b as u64,
        tq: tq as u64,
        hq: hq as u64,
        d: d as u64,
    };
    let delta_cfg = LaunchConfig {
        grid: Dim3::x(delta_grid(rows)),
        block: Dim3::x(DELTA_BLOCK),
        shared_bytes: 0,
    };
    launch(gpu.as_ref(), "attention_bwd_delta", delta_cfg, &dp)?;
    let p = AttentionBwdParams {
        q: dptr(gpu, OP, &q16, DType::BF16, q.numel())?,
        k: dptr(gpu, OP, &k16, DType::BF16, k.numel())?,
        v: dptr(gpu, OP, &v16, DType::BF16, v.numel())?,
        d_o: dptr(gpu, OP, &do16, DType::BF16, q.numel())?,
        lse: dptr(gpu, OP, lse, DType::F32, rows)?,
        delta: dptr(gpu, OP, &delta, DType::F32, rows)?,
        dq: dptr(gpu, OP, dq, DType::F32, q.numel())?,
        dk: dptr(gpu, OP, dk, DType::F32, k.numel())?,
        dv: dptr(gpu, OP, dv, DType::F32, v.numel())?,
        batch: b as u64,
        tq: tq as u64,
        tk: tk as u64,
        hq: hq as u64,
        hkv: hkv as u64,
        d: d as u64,
        scale: scale as f32,
        scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
    };
    let block = Dim3::x(ATTENTION_BLOCK);
    let dkdv_cfg = LaunchConfig {
        grid: kv_grid(b, tk, hkv)?,
        block,
        shared_bytes: shared(OP, dkdv_shared_bytes(d))?,
    };
    let kernels = attention_kernels(d);
    for symbol in kernels.kv {
        launch(gpu.as_ref(), symbol, dkdv_cfg, &p)?;
    }
    let dq_cfg = LaunchConfig {
        grid: query_grid(b, tq, hq)?,
        block,
        shared_bytes: shared(OP, dq_shared_bytes(d))?,
    };
    launch(gpu.as_ref(), kernels.dq, dq_cfg, &p)
}
