//! Token embedding on the GPU (`kernels-cu/embedding.cu`; reference `cpu/embedding.rs`): the
//! parameter structs, the launchers, and the `GpuBackend` ops.
//!
//! - `embedding_fwd(ids, table)`: ids I32 or U32 of any shape, table `[V, H]` F32 or BF16; the
//!   output `[..ids, H]` has the table's dtype (a row copy, 128-bit vectors on 16-byte aligned
//!   rows). U16 ids, accepted by the CPU backend, are refused here (`Error::dtype`).
//! - `embedding_bwd(ids, dy, dtable)`: dy F32 `[..ids, H]`, dtable F32 `[V, H]`,
//!   `dtable[ids[i]] += dy[i]`. Deterministic without float atomics: the token positions are
//!   radix-sorted by id on the device (stable, integer counts only), then one block per id and
//!   column strip adds that id's rows in increasing token order to dtable — the CPU's order, so
//!   the result is **bit-identical** to the reference.
//!
//! Invalid ids (negative, or ≥ V): the kernels never dereference them; they record the smallest
//! such token position in a 4-byte device flag (integer `atomicMin`), which the op downloads
//! before it returns (one host synchronisation per call) and reports as `Error::invalid` naming
//! the op and the position, as the CPU backend does. The backward checks the flag after the sort
//! and before the accumulation, so on error `dtable` is left untouched; the forward's output is
//! dropped.

use super::backend::{distinct, GpuBackend};
use super::launch::{dptr, grid_x, grid_y, launch, workspace, MAX_GRID_X};
use super::{DevicePtr, Dim3, Fill, Gpu, GpuBuffer, LaunchConfig, NvtxRange};
use crate::{DType, Error, Result, Tensor};
use bytemuck::{Pod, Zeroable};
use std::sync::Arc;

// ---- parameter structs (mirrors of embedding.cu) ------------------------------------------------

/// How the kernels read an id word (`IdKind` of `embedding.cu`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdKind {
    I32 = 0,
    U32 = 1,
}

impl IdKind {
    fn of(op: &'static str, ids: &Tensor) -> Result<IdKind> {
        match ids.dtype() {
            DType::I32 => Ok(IdKind::I32),
            DType::U32 => Ok(IdKind::U32),
            other => Err(Error::dtype(op, other, "ids must be I32 or U32 on the GPU")),
        }
    }
}

/// `EmbeddingFwdParams` of `embedding.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct EmbeddingFwdParams {
    ids: DevicePtr,   // (n)
    table: DevicePtr, // (vocab, h)
    out: DevicePtr,   // (n, h)
    err: DevicePtr,   // (1) u32
    n: u64,
    vocab: u64,
    h: u64,
    kind: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<EmbeddingFwdParams>() == 64);

/// `EmbeddingHistParams` of `embedding.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct EmbeddingHistParams {
    ids: DevicePtr,  // (n)
    src: DevicePtr,  // (n) or 0
    hist: DevicePtr, // (BUCKETS, tiles)
    err: DevicePtr,  // (1) or 0
    n: u64,
    vocab: u64,
    shift: u32,
    kind: u32,
}
const _: () = assert!(std::mem::size_of::<EmbeddingHistParams>() == 56);

/// `EmbeddingScanParams` of `embedding.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct EmbeddingScanParams {
    hist: DevicePtr, // (len)
    len: u64,
}
const _: () = assert!(std::mem::size_of::<EmbeddingScanParams>() == 16);

/// `EmbeddingScatterParams` of `embedding.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct EmbeddingScatterParams {
    ids: DevicePtr,  // (n)
    src: DevicePtr,  // (n) or 0
    dst: DevicePtr,  // (n)
    hist: DevicePtr, // (BUCKETS, tiles)
    n: u64,
    shift: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<EmbeddingScatterParams>() == 48);

/// `EmbeddingAccumParams` of `embedding.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct EmbeddingAccumParams {
    ids: DevicePtr,    // (n)
    order: DevicePtr,  // (n)
    dy: DevicePtr,     // (n, h)
    dtable: DevicePtr, // (vocab, h)
    n: u64,
    vocab: u64,
    h: u64,
    kind: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<EmbeddingAccumParams>() == 64);

// ---- launch configurations --------------------------------------------------------------------

/// Threads per block of the gather (one block per token): one warp per 128 elements of the row,
/// between 1 and 4 warps (`__launch_bounds__(128)`; H = 1792 → 128 threads).
pub fn fwd_block(h: usize) -> u32 {
    32 * h.div_ceil(128).clamp(1, 4) as u32
}

/// Keys per tile of the radix sort = threads of its hist and scatter kernels (`SORT_BLOCK`).
pub const SORT_BLOCK: u32 = 256;
/// Bits of the id sorted per pass (`RADIX_BITS`), and the digits per pass.
pub const RADIX_BITS: u32 = 8;
pub const BUCKETS: usize = 1 << RADIX_BITS;
/// Threads of the one-block offset scan (`SCAN_BLOCK`).
pub const SCAN_BLOCK: u32 = 1024;

/// Radix passes for ids below `vocab`: enough digits to cover `vocab − 1` (at least one).
pub fn sort_passes(vocab: usize) -> u32 {
    let bits = usize::BITS - vocab.saturating_sub(1).leading_zeros();
    bits.div_ceil(RADIX_BITS).max(1)
}

/// Threads per block of the accumulation (one column each; 1 to 8 warps), and the column strips
/// (grid.y) that cover `h`.
pub fn accum_block(h: usize) -> (u32, usize) {
    let block = 32 * h.div_ceil(32).clamp(1, 8);
    (block as u32, h.div_ceil(block))
}

// ---- launchers ----------------------------------------------------------------------------------

/// The flag's "no invalid id" value.
const NO_ERROR: u32 = u32::MAX;

/// A fresh 4-byte invalid-id flag.
fn error_flag<G: Gpu>(gpu: &Arc<G>) -> Result<GpuBuffer> {
    let err = workspace(gpu, 4)?;
    // SAFETY: the buffer holds one u32.
    unsafe { gpu.memset(err.ptr(), Fill::U32(NO_ERROR), 1)? };
    Ok(err)
}

/// Downloads the flag; when it names a position, downloads that id too and reports it as the CPU
/// backend does (`Error::invalid`: "id X at position P is outside 0..V").
fn check_flag<G: Gpu>(
    gpu: &Arc<G>,
    op: &'static str,
    err: &GpuBuffer,
    ids: DevicePtr,
    kind: IdKind,
    vocab: usize,
) -> Result<()> {
    let mut word = [0u8; 4];
    // SAFETY: the buffer holds one u32.
    unsafe { gpu.download(err.ptr(), &mut word)? };
    let pos = u32::from_le_bytes(word);
    if pos == NO_ERROR {
        return Ok(());
    }
    // SAFETY: the kernels record only positions below n, and `ids` holds n 4-byte words.
    unsafe { gpu.download(ids + 4 * pos as u64, &mut word)? };
    let id = match kind {
        IdKind::I32 => i32::from_le_bytes(word) as i64,
        IdKind::U32 => u32::from_le_bytes(word) as i64,
    };
    Err(Error::invalid(op, format!("id {id} at position {pos} is outside 0..{vocab}")))
}

fn token_count(op: &'static str, ids: &Tensor) -> Result<usize> {
    let n = ids.numel();
    if n >= NO_ERROR as usize {
        return Err(Error::invalid(op, format!("{n} ids: at most 2^32 − 2 per call")));
    }
    Ok(n)
}

/// `out[i] = table[ids[i]]` for `out [n, h]` of the table's dtype (F32 or BF16). Invalid ids are
/// reported as `Error::invalid` with the first bad position (the call synchronises to read the
/// flag).
///
/// With `prechecked` (the caller validated the ids on the host) the flag is not read back, so
/// the call does not synchronise; an invalid id still never leaves the table.
pub fn launch_embedding_fwd<G: Gpu>(
    gpu: &Arc<G>,
    ids: &Tensor,
    table: &Tensor,
    out: &Tensor,
    prechecked: bool,
) -> Result<()> {
    const OP: &str = "embedding_fwd";
    let (vocab, h) = crate::cpu::embedding::table_dims(OP, table)?;
    let kind = IdKind::of(OP, ids)?;
    let n = token_count(OP, ids)?;
    let (dt, symbol) = match table.dtype() {
        DType::F32 => (DType::F32, "embedding_fwd_f32"),
        DType::BF16 => (DType::BF16, "embedding_fwd_bf16"),
        other => return Err(Error::dtype(OP, other, "the table must be F32 or BF16")),
    };
    let (ids_p, table_p, out_p) = (
        dptr(gpu, OP, ids, ids.dtype(), n)?,
        dptr(gpu, OP, table, dt, vocab * h)?,
        dptr(gpu, OP, out, dt, n * h)?,
    );
    if n == 0 {
        return Ok(());
    }
    let err = error_flag(gpu)?;
    let p = EmbeddingFwdParams {
        ids: ids_p,
        table: table_p,
        out: out_p,
        err: err.ptr(),
        n: n as u64,
        vocab: vocab as u64,
        h: h as u64,
        kind: kind as u32,
        pad: 0,
    };
    {
        let _range = NvtxRange::new(gpu.as_ref(), OP);
        let cfg = LaunchConfig {
            grid: Dim3::x(grid_x(OP, n.min(MAX_GRID_X))?),
            block: Dim3::x(fwd_block(h)),
            shared_bytes: 0,
        };
        launch(gpu.as_ref(), symbol, cfg, &p)?;
    }
    if prechecked {
        return Ok(());
    }
    check_flag(gpu, OP, &err, ids_p, kind, vocab)
}

/// `dtable[ids[i]] += dy[i]` (dy `[n, h]`, dtable `[vocab, h]`, both F32), every row summed in
/// increasing token order (bit-identical to the CPU reference). Invalid ids are reported as
/// `Error::invalid` before dtable is touched (the call synchronises once, after the sort), unless
/// `prechecked` (as for the forward: nothing read back; an invalid id's row is never written).
pub fn launch_embedding_bwd<G: Gpu>(
    gpu: &Arc<G>,
    ids: &Tensor,
    dy: &Tensor,
    dtable: &Tensor,
    prechecked: bool,
) -> Result<()> {
    const OP: &str = "embedding_bwd";
    let (vocab, h) = crate::cpu::embedding::table_dims(OP, dtable)?;
    let kind = IdKind::of(OP, ids)?;
    let n = token_count(OP, ids)?;
    let f = DType::F32;
    if dy.numel() != n * h {
        return Err(Error::shape(
            OP,
            format!("dy {:?} does not match {n} ids × hidden {h}", dy.shape()),
        ));
    }
    let (ids_p, dy_p, dtable_p) = (
        dptr(gpu, OP, ids, ids.dtype(), n)?,
        dptr(gpu, OP, dy, f, n * h)?,
        dptr(gpu, OP, dtable, f, vocab * h)?,
    );
    if n == 0 {
        return Ok(());
    }
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    let err = error_flag(gpu)?;
    let tiles = n.div_ceil(SORT_BLOCK as usize);
    let hist = workspace(gpu, BUCKETS * tiles * 4)?;
    let orders = [workspace(gpu, n * 4)?, workspace(gpu, n * 4)?];
    let tile_cfg = LaunchConfig {
        grid: Dim3::x(grid_x(OP, tiles)?),
        block: Dim3::x(SORT_BLOCK),
        shared_bytes: 0,
    };
    let scan_cfg = LaunchConfig { grid: Dim3::x(1), block: Dim3::x(SCAN_BLOCK), shared_bytes: 0 };
    let mut src: DevicePtr = 0;
    {
        let _sort = NvtxRange::new(gpu.as_ref(), "sort");
        for pass in 0..sort_passes(vocab) {
            let dst = orders[pass as usize % 2].ptr();
            let shift = pass * RADIX_BITS;
            let ph = EmbeddingHistParams {
                ids: ids_p,
                src,
                hist: hist.ptr(),
                err: if pass == 0 { err.ptr() } else { 0 },
                n: n as u64,
                vocab: vocab as u64,
                shift,
                kind: kind as u32,
            };
            launch(gpu.as_ref(), "embedding_bwd_hist_u32", tile_cfg, &ph)?;
            let ps = EmbeddingScanParams { hist: hist.ptr(), len: (BUCKETS * tiles) as u64 };
            launch(gpu.as_ref(), "embedding_bwd_scan_u32", scan_cfg, &ps)?;
            let pc = EmbeddingScatterParams {
                ids: ids_p,
                src,
                dst,
                hist: hist.ptr(),
                n: n as u64,
                shift,
                pad: 0,
            };
            launch(gpu.as_ref(), "embedding_bwd_scatter_u32", tile_cfg, &pc)?;
            src = dst;
        }
    }
    if !prechecked {
        check_flag(gpu, OP, &err, ids_p, kind, vocab)?;
    }
    if h == 0 {
        return Ok(());
    }
    let (block, strips) = accum_block(h);
    let pa = EmbeddingAccumParams {
        ids: ids_p,
        order: src,
        dy: dy_p,
        dtable: dtable_p,
        n: n as u64,
        vocab: vocab as u64,
        h: h as u64,
        kind: kind as u32,
        pad: 0,
    };
    let _accum = NvtxRange::new(gpu.as_ref(), "accum");
    let cfg = LaunchConfig {
        grid: Dim3::xy(grid_x(OP, n)?, grid_y(OP, strips)?),
        block: Dim3::x(block),
        shared_bytes: 0,
    };
    launch(gpu.as_ref(), "embedding_bwd_accum_f32", cfg, &pa)
}

// ---- the GpuBackend ops ----------------------------------------------------------------------

pub(super) fn embedding_fwd<G: Gpu>(
    be: &GpuBackend<G>,
    ids: &Tensor,
    table: &Tensor,
    prechecked: bool,
) -> Result<Tensor> {
    const OP: &str = "embedding_fwd";
    be.on_device(OP, &[ids, table])?;
    let (_, h) = crate::cpu::embedding::table_dims(OP, table)?;
    IdKind::of(OP, ids)?;
    if !matches!(table.dtype(), DType::F32 | DType::BF16) {
        return Err(Error::dtype(OP, table.dtype(), "the table must be F32 or BF16"));
    }
    let mut shape = ids.shape().to_vec();
    shape.push(h);
    let out = be.empty(&shape, table.dtype())?;
    launch_embedding_fwd(be.gpu(), ids, table, &out, prechecked)?;
    Ok(out)
}

pub(super) fn embedding_bwd<G: Gpu>(
    be: &GpuBackend<G>,
    ids: &Tensor,
    dy: &Tensor,
    dtable: &Tensor,
    prechecked: bool,
) -> Result<()> {
    const OP: &str = "embedding_bwd";
    be.on_device(OP, &[ids, dy, dtable])?;
    distinct(OP, &[dtable], &[ids, dy])?;
    for t in [dy, dtable] {
        if t.dtype() != DType::F32 {
            return Err(Error::dtype(OP, t.dtype(), "dy and dtable must be F32"));
        }
    }
    launch_embedding_bwd(be.gpu(), ids, dy, dtable, prechecked)
}
