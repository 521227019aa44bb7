//! `matmul`, `matmul_into` and `sum_rows_into` on the GPU: the GEMMs are `Gpu::gemm_ex`
//! (cuBLASLt on a device, the cuBLASLt model's CPU GEMM under the emulator); the bias gradient
//! and the empty product's bias rows are `kernels-cu/matmul.cu`. Reference `cpu/matmul.rs`.

use super::backend::{distinct, ptr, GpuBackend};
use super::elementwise::{launch_scale_fwd, value_suffix};
use super::launch::{grid_x, grid_y, launch, workspace};
use super::{DevicePtr, Dim3, LaunchConfig};
use super::{Gpu, NvtxRange};
use crate::backend::{Backend, Matmul};
use crate::cuda::gemm::{GemmPtrs, GemmShape};
use crate::{DType, Error, Result, Tensor};
use bytemuck::{Pod, Zeroable};

/// The operand dtype of a GPU GEMM: both F32 or both BF16.
fn gemm_input(op: &'static str, a: &Tensor, b: &Tensor) -> Result<DType> {
    match (a.dtype(), b.dtype()) {
        (DType::F32, DType::F32) => Ok(DType::F32),
        (DType::BF16, DType::BF16) => Ok(DType::BF16),
        (x, y) => Err(Error::dtype(
            op,
            y,
            format!("a is {x}: GPU GEMM operands are both F32 or both BF16"),
        )),
    }
}

pub(super) fn matmul<G: Gpu>(
    be: &GpuBackend<G>,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    spec: Matmul,
    out: Option<DType>,
) -> Result<Tensor> {
    const OP: &str = "matmul";
    be.on_device(OP, &[a, b])?;
    let g = crate::cpu::matmul::geometry(OP, a, b, spec)?;
    let input = gemm_input(OP, a, b)?;
    let output = out.unwrap_or(a.dtype());
    if !matches!(output, DType::F32 | DType::BF16) {
        return Err(Error::dtype(OP, output, "the GPU GEMM writes F32 or BF16"));
    }
    if input == DType::F32 && output == DType::BF16 {
        return Err(Error::dtype(
            OP,
            output,
            "cuBLASLt has no fp32-inputs → bf16-output GEMM: ask for F32 and cast, or give \
             BF16 inputs",
        ));
    }
    if let Some(bias) = bias {
        be.on_device(OP, &[bias])?;
        if bias.shape() != [g.n] || bias.dtype() != output {
            return Err(Error::shape(
                OP,
                format!(
                    "bias must be [{}] {output} (the output dtype), got {:?} {}",
                    g.n,
                    bias.shape(),
                    bias.dtype()
                ),
            ));
        }
    }
    let c = be.empty(&g.out_shape, output)?;
    let shape = GemmShape {
        m: g.m,
        n: g.n,
        k: g.k,
        batch: g.batch,
        trans_a: spec.trans_a,
        trans_b: spec.trans_b,
        a_batch_stride: if g.a_batched { g.m * g.k } else { 0 },
        b_batch_stride: if g.b_batched { g.k * g.n } else { 0 },
        out_batch_stride: g.m * g.n,
        input,
        output,
        bias: bias.is_some(),
    };
    let _range = NvtxRange::new(be.gpu().as_ref(), OP);
    if g.m * g.n * g.batch == 0 {
        return Ok(c);
    }
    if g.k == 0 {
        // cuBLASLt does not take k = 0; the product is empty: out = bias (every row) or 0.
        match bias {
            Some(bias) => broadcast_rows(be, bias, &c, g.batch * g.m, g.n)?,
            None => be.fill(&c, 0.0)?,
        }
        return Ok(c);
    }
    let ptrs = GemmPtrs { a: ptr(a), b: ptr(b), out: ptr(&c), bias: bias.map(ptr) };
    // SAFETY: the geometry checked a, b (and the bias) against the shape; c was allocated
    // for it and is fresh.
    unsafe { be.gpu().gemm_ex(&shape, ptrs, spec.alpha, 0.0)? };
    Ok(c)
}

pub(super) fn matmul_into<G: Gpu>(
    be: &GpuBackend<G>,
    a: &Tensor,
    b: &Tensor,
    spec: Matmul,
    out: &Tensor,
) -> Result<()> {
    const OP: &str = "matmul_into";
    be.on_device(OP, &[a, b, out])?;
    distinct(OP, &[out], &[a, b])?;
    let g = crate::cpu::matmul::geometry(OP, a, b, spec)?;
    let input = gemm_input(OP, a, b)?;
    if !matches!(out.dtype(), DType::F32 | DType::BF16) {
        return Err(Error::dtype(OP, out.dtype(), "the GPU GEMM writes F32 or BF16"));
    }
    let summed = crate::cpu::matmul::into_summed(OP, &g, out)?;
    if g.m * g.n == 0 {
        return Ok(());
    }
    if g.k == 0 || g.batch == 0 {
        // The product is empty: out = beta · out (0 when beta = 0, whatever out held).
        let _range = NvtxRange::new(be.gpu().as_ref(), OP);
        return if spec.beta == 1.0 {
            Ok(())
        } else if spec.beta == 0.0 {
            be.fill(out, 0.0)
        } else {
            // SAFETY: in place over out's numel elements: each element is read, then written, by
            // one thread.
            unsafe {
                launch_scale_fwd(
                    be.gpu(),
                    out.dtype(),
                    ptr(out),
                    0,
                    spec.beta,
                    ptr(out),
                    out.numel(),
                )
            }
        };
    }
    let _range = NvtxRange::new(be.gpu().as_ref(), OP);
    let es = input.size_in_bytes() as u64;
    // Summed batches accumulate one product at a time into the same matrix, in batch order
    // (beta applies to the first only), as the CPU reference does.
    let items: Vec<(u64, u64, u64, usize, f32)> = if summed {
        (0..g.batch as u64)
            .map(|i| {
                let ao = if g.a_batched { i * (g.m * g.k) as u64 * es } else { 0 };
                let bo = if g.b_batched { i * (g.k * g.n) as u64 * es } else { 0 };
                (ao, bo, 0, 1, if i == 0 { spec.beta } else { 1.0 })
            })
            .collect()
    } else {
        vec![(0, 0, 0, g.batch, spec.beta)]
    };
    for (ao, bo, oo, batch, beta) in items {
        let shape = GemmShape {
            m: g.m,
            n: g.n,
            k: g.k,
            batch,
            trans_a: spec.trans_a,
            trans_b: spec.trans_b,
            a_batch_stride: if g.a_batched && batch > 1 { g.m * g.k } else { 0 },
            b_batch_stride: if g.b_batched && batch > 1 { g.k * g.n } else { 0 },
            out_batch_stride: g.m * g.n,
            input,
            output: out.dtype(),
            bias: false,
        };
        let ptrs = GemmPtrs { a: ptr(a) + ao, b: ptr(b) + bo, out: ptr(out) + oo, bias: None };
        // SAFETY: the geometry checked a and b against the shape; out holds the product
        // (or one [m, n] matrix when summed) and overlaps neither input.
        unsafe { be.gpu().gemm_ex(&shape, ptrs, spec.alpha, beta)? };
    }
    Ok(())
}

// ---- sum_rows_into and the bias rows of an empty product (matmul.cu) -------------------------------

/// `SumRowsPartialParams` of `matmul.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SumRowsPartialParams {
    x: DevicePtr,       // (rows, cols)
    partial: DevicePtr, // (chunks, cols) f32
    rows: u64,
    cols: u64,
    rows_per_chunk: u64,
}
const _: () = assert!(std::mem::size_of::<SumRowsPartialParams>() == 40);

/// `SumRowsReduceParams` of `matmul.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SumRowsReduceParams {
    partial: DevicePtr, // (chunks, cols) f32
    out: DevicePtr,     // (cols) f32, +=
    chunks: u64,
    cols: u64,
}
const _: () = assert!(std::mem::size_of::<SumRowsReduceParams>() == 32);

/// `BroadcastRowsParams` of `matmul.cu`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct BroadcastRowsParams {
    bias: DevicePtr, // (n)
    out: DevicePtr,  // (rows, n)
    rows: u64,
    n: u64,
}
const _: () = assert!(std::mem::size_of::<BroadcastRowsParams>() == 32);

/// Rows per partial sum of `sum_rows_into` (as the CPU's `ROW_BLOCK`: the same order of adds).
pub const SUM_ROWS_PER_CHUNK: usize = 64;
/// Threads per block of the column kernels (one thread per column).
pub const SUM_ROWS_BLOCK: u32 = 128;

/// `out[c] += Σ_r x[r, c]`: per-64-row partial sums in row order, then the partials in chunk
/// order — the CPU reference's order, so f32 results are bit-identical.
pub(super) fn sum_rows_into<G: Gpu>(be: &GpuBackend<G>, x: &Tensor, out: &Tensor) -> Result<()> {
    const OP: &str = "sum_rows_into";
    be.on_device(OP, &[x, out])?;
    distinct(OP, &[out], &[x])?;
    let cols = *x.shape().last().ok_or_else(|| Error::shape(OP, "x must have ≥ 1 axis"))?;
    if out.shape() != [cols] {
        return Err(Error::shape(OP, format!("out must be [{cols}], got {:?}", out.shape())));
    }
    let suffix = value_suffix(OP, x.dtype())?;
    if out.dtype() != DType::F32 {
        return Err(Error::dtype(OP, out.dtype(), "out (a bias gradient) must be F32"));
    }
    let rows = x.numel().checked_div(cols).unwrap_or(0);
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let gpu = be.gpu();
    let _range = NvtxRange::new(gpu.as_ref(), OP);
    let chunks = rows.div_ceil(SUM_ROWS_PER_CHUNK);
    let partial = workspace(gpu, chunks * cols * 4)?;
    let col_blocks = grid_x(OP, cols.div_ceil(SUM_ROWS_BLOCK as usize))?;
    let p = SumRowsPartialParams {
        x: ptr(x),
        partial: partial.ptr(),
        rows: rows as u64,
        cols: cols as u64,
        rows_per_chunk: SUM_ROWS_PER_CHUNK as u64,
    };
    let cfg = LaunchConfig {
        grid: Dim3::xy(col_blocks, grid_y(OP, chunks)?),
        block: Dim3::x(SUM_ROWS_BLOCK),
        shared_bytes: 0,
    };
    let symbol = if suffix == "f32" { "sum_rows_partial_f32" } else { "sum_rows_partial_bf16" };
    launch(gpu.as_ref(), symbol, cfg, &p)?;
    let r = SumRowsReduceParams {
        partial: partial.ptr(),
        out: ptr(out),
        chunks: chunks as u64,
        cols: cols as u64,
    };
    let cfg =
        LaunchConfig { grid: Dim3::x(col_blocks), block: Dim3::x(SUM_ROWS_BLOCK), shared_bytes: 0 };
    launch(gpu.as_ref(), "sum_rows_reduce_f32", cfg, &r)
}

/// Every one of the `rows` rows of `out [rows, n]` becomes `bias [n]` (same dtype).
fn broadcast_rows<G: Gpu>(
    be: &GpuBackend<G>,
    bias: &Tensor,
    out: &Tensor,
    rows: usize,
    n: usize,
) -> Result<()> {
    const OP: &str = "matmul";
    let symbol = match out.dtype().size_in_bytes() {
        2 => "broadcast_rows_u16",
        _ => "broadcast_rows_u32",
    };
    let p = BroadcastRowsParams { bias: ptr(bias), out: ptr(out), rows: rows as u64, n: n as u64 };
    let cfg = LaunchConfig {
        grid: Dim3::x(grid_x(OP, (rows * n).div_ceil(2048))?),
        block: Dim3::x(256),
        shared_bytes: 0,
    };
    launch(be.gpu().as_ref(), symbol, cfg, &p)
}
