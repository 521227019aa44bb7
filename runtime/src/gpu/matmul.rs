//! `matmul` and `matmul_into` on the GPU: `Gpu::gemm_ex` (cuBLASLt on a device, the cuBLASLt
//! model's CPU GEMM under the emulator); reference `cpu/matmul.rs`.

use super::backend::{distinct, not_yet, ptr, GpuBackend};
use super::{Gpu, NvtxRange};
use crate::backend::{Backend, Matmul};
use crate::cuda::gemm::{GemmPtrs, GemmShape};
use crate::{DType, Error, Result, Tensor};

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
        // cuBLASLt does not take k = 0; the product is empty: out = bias or 0.
        be.fill(&c, 0.0)?;
        return match bias {
            Some(_) => Err(not_yet("matmul with k = 0 and a bias")),
            None => Ok(c),
        };
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
    let summed = out.shape() == [g.m, g.n] && g.batch > 1;
    if !summed && out.shape() != g.out_shape.as_slice() {
        return Err(Error::shape(
            OP,
            format!(
                "out is {:?}, the product {:?} (or [{}, {}] summed)",
                out.shape(),
                g.out_shape,
                g.m,
                g.n
            ),
        ));
    }
    if g.m * g.n == 0 {
        return Ok(());
    }
    if g.k == 0 || g.batch == 0 {
        return if spec.beta == 1.0 {
            Ok(())
        } else {
            Err(not_yet("matmul_into with an empty product and beta ≠ 1"))
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
