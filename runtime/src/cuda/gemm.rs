//! GEMM on cuBLASLt: bf16 or fp32 in, fp32 accumulate, bf16 or fp32 out, transposes, strided
//! batches and a bias epilogue.
//!
//! Steel's tensors are row-major; cuBLASLt is column-major. A row-major `[r, c]` matrix is the
//! column-major `c × r` matrix with leading dimension `c`, so the row-major product
//! `D = op(A)·op(B)` (`[m, n]`) is computed as the column-major `Dᵀ = op(B)ᵀ·op(A)ᵀ` (`n × m`):
//! cuBLASLt's "A" is our `B` and its "B" is our `A`, and no data moves. The bias `[n]` is then a
//! vector over the rows of the column-major `Dᵀ`, which is what `CUBLASLT_EPILOGUE_BIAS` adds.
//!
//! [`plan`] builds every layout and descriptor value from the shape and nothing else (a pure
//! function), refusing what cuBLASLt refuses: its type table (with `CUBLAS_COMPUTE_32F` and an
//! fp32 scale, bf16 inputs go with a bf16 or fp32 output, fp32 inputs with an fp32 output only).
//! [`alignments`] derives the `MIN_ALIGNMENT_{A,B,C,D}_BYTES` preferences from the real pointers
//! (and batch strides), and [`check_alignment`] refuses an operand not aligned to its element;
//! `CudaGpu` and `EmuGpu` both run all three, so the emulator refuses exactly what a device would.
//! [`interpret`] executes a plan on the CPU with cuBLASLt's column-major semantics, which is how
//! CI checks the layouts without a GPU; [`LtGemm`] hands a plan to cuBLASLt, caching descriptors
//! and the chosen algorithm per (shape, alignment).

use super::libs::{self, CudaLib};
use super::{CudaError, Result};
use crate::{DType, Transpose};
use cudarc::cublaslt::{result as lt, sys};
use std::ffi::c_void;

/// cuBLASLt's workspace: 32 MiB, NVIDIA's recommendation for Hopper.
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// A row-major (batched) GEMM: `out[b] = alpha · op(a[b]) · op(b[b]) (+ bias) (+ beta · out[b])`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmShape {
    /// Rows of `op(a)` and of the output.
    pub m: usize,
    /// Columns of `op(b)` and of the output.
    pub n: usize,
    /// The contracted dimension.
    pub k: usize,
    /// Number of products.
    pub batch: usize,
    /// `a` is `[m, k]`, or `[k, m]` when transposed.
    pub trans_a: Transpose,
    /// `b` is `[k, n]`, or `[n, k]` when transposed.
    pub trans_b: Transpose,
    /// Elements between consecutive batch items of `a`; 0 broadcasts one matrix.
    pub a_batch_stride: usize,
    pub b_batch_stride: usize,
    /// Elements between consecutive outputs; at least `m·n` when `batch > 1`.
    pub out_batch_stride: usize,
    /// `BF16` or `F32`, both operands.
    pub input: DType,
    /// `BF16` or `F32`.
    pub output: DType,
    /// A bias `[n]` (of the output dtype), the same for every batch item.
    pub bias: bool,
}

impl GemmShape {
    /// A contiguous problem: `batch` products stored back to back (or one broadcast operand).
    #[allow(clippy::too_many_arguments)]
    pub fn contiguous(
        m: usize,
        n: usize,
        k: usize,
        batch: usize,
        trans_a: Transpose,
        trans_b: Transpose,
        broadcast_a: bool,
        broadcast_b: bool,
        input: DType,
        output: DType,
        bias: bool,
    ) -> GemmShape {
        GemmShape {
            m,
            n,
            k,
            batch,
            trans_a,
            trans_b,
            a_batch_stride: if broadcast_a { 0 } else { m * k },
            b_batch_stride: if broadcast_b { 0 } else { k * n },
            out_batch_stride: m * n,
            input,
            output,
            bias,
        }
    }
}

/// cuBLASLt's operation on a stored matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LtOp {
    N,
    T,
}

/// A column-major matrix layout (`cublasLtMatrixLayout_t`): the STORED matrix, before the op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LtLayout {
    pub dtype: DType,
    pub rows: u64,
    pub cols: u64,
    /// Leading dimension (elements between columns).
    pub ld: i64,
    /// `CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT`.
    pub batch: i32,
    /// `CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET`, elements.
    pub batch_stride: i64,
}

/// Everything cuBLASLt is told about one GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LtPlan {
    /// cuBLASLt's `m, n, k` (`m` = our `n`, `n` = our `m`).
    pub m: u64,
    pub n: u64,
    pub k: u64,
    /// `CUBLASLT_MATMUL_DESC_TRANSA`/`TRANSB`.
    pub op_a: LtOp,
    pub op_b: LtOp,
    /// cuBLASLt's A: our `b`.
    pub a: LtLayout,
    /// cuBLASLt's B: our `a`.
    pub b: LtLayout,
    /// C (read with `beta`) and D (written): our output.
    pub c: LtLayout,
    pub d: LtLayout,
    /// `CUBLASLT_EPILOGUE_BIAS` (else `DEFAULT`).
    pub bias: bool,
    /// `CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE`: 0, one bias for every batch item.
    pub bias_batch_stride: i64,
}

/// The cuBLASLt layouts and descriptor values of a row-major GEMM (see the module header).
pub fn plan(s: &GemmShape) -> Result<LtPlan> {
    let bad = |msg: String| Err(CudaError::invalid("gemm", msg));
    for (what, dt) in [("input", s.input), ("output", s.output)] {
        if !matches!(dt, DType::BF16 | DType::F32) {
            return bad(format!("{what} dtype {dt} (cuBLASLt path takes bf16 or f32)"));
        }
    }
    if s.input == DType::F32 && s.output == DType::BF16 {
        // No algorithm exists for it: the heuristic is where cuBLASLt says so.
        return Err(CudaError::cublas_status(
            "cublasLtMatmulAlgoGetHeuristic",
            "CUBLAS_STATUS_NOT_SUPPORTED",
            "fp32 inputs with a bf16 output: cuBLASLt's type table (CUBLAS_COMPUTE_32F, scale \
             CUDA_R_32F) pairs CUDA_R_32F A/B only with a CUDA_R_32F C/D; ask for an F32 output \
             and cast it, or give bf16 inputs",
        ));
    }
    if s.m == 0 || s.n == 0 || s.k == 0 || s.batch == 0 {
        return bad(format!("empty product m={} n={} k={} batch={}", s.m, s.n, s.k, s.batch));
    }
    if s.batch > 1 && s.out_batch_stride < s.m * s.n {
        return bad(format!(
            "output batch stride {} overlaps outputs of {}x{} (batch items must not be summed \
             into one output by cuBLASLt; accumulate them one by one)",
            s.out_batch_stride, s.m, s.n
        ));
    }
    let to_i32 = |v: usize| {
        i32::try_from(v).map_err(|_| CudaError::invalid("gemm", format!("batch {v} exceeds i32")))
    };
    let batch = to_i32(s.batch)?;
    let (m, n, k) = (s.m as u64, s.n as u64, s.k as u64);
    // Our b, row-major [k, n] = column-major n×k (ld n), used as is; transposed [n, k] =
    // column-major k×n (ld k), used transposed. Either way op(A_lt) is n×k.
    let (a_rows, a_cols, op_a) = match s.trans_b {
        Transpose::No => (n, k, LtOp::N),
        Transpose::Yes => (k, n, LtOp::T),
    };
    // Our a, row-major [m, k] = column-major k×m (ld k), as is; transposed [k, m] =
    // column-major m×k (ld m), transposed. op(B_lt) is k×m.
    let (b_rows, b_cols, op_b) = match s.trans_a {
        Transpose::No => (k, m, LtOp::N),
        Transpose::Yes => (m, k, LtOp::T),
    };
    let layout = |dtype, rows: u64, cols: u64, stride: usize| LtLayout {
        dtype,
        rows,
        cols,
        ld: rows as i64,
        batch,
        batch_stride: if s.batch > 1 { stride as i64 } else { 0 },
    };
    let out = layout(s.output, n, m, s.out_batch_stride);
    Ok(LtPlan {
        m: n,
        n: m,
        k,
        op_a,
        op_b,
        a: layout(s.input, a_rows, a_cols, s.b_batch_stride),
        b: layout(s.input, b_rows, b_cols, s.a_batch_stride),
        c: out,
        d: out,
        bias: s.bias,
        bias_batch_stride: 0,
    })
}

/// The alignment, in bytes, cuBLASLt may assume of each of its operands
/// (`CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_{A,B,C,D}_BYTES`): cuBLASLt's A is our `b`, its B our `a`,
/// C and D our output. Each is a power of two, at most 256 (cuBLASLt's default assumption).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LtAlign {
    pub a: u32,
    pub b: u32,
    pub c: u32,
    pub d: u32,
}

/// The largest power of two ≤ 256 dividing `ptr` and, for a batched operand, its stride in bytes:
/// the alignment every batch item keeps.
fn alignment(ptr: u64, stride_bytes: u64, batched: bool) -> u32 {
    let mut bits = ptr | 256;
    if batched && stride_bytes != 0 {
        bits |= stride_bytes;
    }
    1 << bits.trailing_zeros().min(8)
}

/// The alignments of a GEMM's operands, from the real pointers and the batch strides.
pub fn alignments(s: &GemmShape, p: &GemmPtrs) -> LtAlign {
    let (ie, oe) = (s.input.size_in_bytes() as u64, s.output.size_in_bytes() as u64);
    let batched = s.batch > 1;
    let out = alignment(p.out, s.out_batch_stride as u64 * oe, batched);
    LtAlign {
        a: alignment(p.b, s.b_batch_stride as u64 * ie, batched),
        b: alignment(p.a, s.a_batch_stride as u64 * ie, batched),
        c: out,
        d: out,
    }
}

/// An operand aligned to less than its element: no cuBLASLt algorithm takes it (the heuristic
/// returns `CUBLAS_STATUS_NOT_SUPPORTED`).
pub fn check_alignment(s: &GemmShape, al: &LtAlign) -> Result<()> {
    let (ie, oe) = (s.input.size_in_bytes() as u32, s.output.size_in_bytes() as u32);
    for (what, got, need) in [("a", al.b, ie), ("b", al.a, ie), ("the output", al.d, oe)] {
        if got < need {
            return Err(CudaError::cublas_status(
                "cublasLtMatmulAlgoGetHeuristic",
                "CUBLAS_STATUS_NOT_SUPPORTED",
                format!("operand {what} is only {got}-byte aligned; its elements need {need}"),
            ));
        }
    }
    Ok(())
}

/// Element `(r, c)` of batch item `batch` of a stored column-major matrix.
fn at(l: &LtLayout, data: &[f32], batch: usize, r: u64, c: u64) -> f32 {
    data[batch * l.batch_stride as usize + c as usize * l.ld as usize + r as usize]
}

/// Element `(i, j)` of `op(X)`.
fn op_at(l: &LtLayout, op: LtOp, data: &[f32], batch: usize, i: u64, j: u64) -> f32 {
    match op {
        LtOp::N => at(l, data, batch, i, j),
        LtOp::T => at(l, data, batch, j, i),
    }
}

/// The number of elements a layout spans (all batch items).
pub fn span(l: &LtLayout) -> usize {
    (l.batch as usize - 1) * l.batch_stride as usize
        + (l.cols as usize - 1) * l.ld as usize
        + l.rows as usize
}

/// Executes a plan on the CPU exactly as cuBLASLt defines it, column-major:
/// `D = alpha · op(A)·op(B) + beta · C (+ bias over D's rows)`, for every batch item, in f32
/// (bf16 data is passed in already widened). `a` and `b` are cuBLASLt's operands (our `b` and
/// `a`); `c` is the prior output (its contents matter only when `beta ≠ 0`).
pub fn interpret(
    p: &LtPlan,
    a: &[f32],
    b: &[f32],
    c: &[f32],
    bias: Option<&[f32]>,
    alpha: f32,
    beta: f32,
) -> Vec<f32> {
    let mut d = c.to_vec();
    d.resize(span(&p.d).max(c.len()), 0.0);
    for batch in 0..p.d.batch as usize {
        for j in 0..p.n {
            for i in 0..p.m {
                let mut acc = 0f32;
                for q in 0..p.k {
                    acc +=
                        op_at(&p.a, p.op_a, a, batch, i, q) * op_at(&p.b, p.op_b, b, batch, q, j);
                }
                let mut v = alpha * acc;
                if beta != 0.0 {
                    v += beta * at(&p.c, c, batch, i, j);
                }
                if p.bias {
                    if let Some(bias) = bias {
                        v += bias[batch * p.bias_batch_stride as usize + i as usize];
                    }
                }
                d[batch * p.d.batch_stride as usize + j as usize * p.d.ld as usize + i as usize] =
                    v;
            }
        }
    }
    d
}

fn data_type(dt: DType) -> sys::cudaDataType {
    match dt {
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        _ => sys::cudaDataType::CUDA_R_32F,
    }
}

/// `cublasOperation_t` (an `int32` attribute): `CUBLAS_OP_N` = 0, `CUBLAS_OP_T` = 1.
fn operation(op: LtOp) -> i32 {
    match op {
        LtOp::N => 0,
        LtOp::T => 1,
    }
}

/// Device pointers of one GEMM (our operands: `a`, `b`, the output, an optional bias).
#[derive(Clone, Copy, Debug)]
pub struct GemmPtrs {
    pub a: u64,
    pub b: u64,
    pub out: u64,
    pub bias: Option<u64>,
}

struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.0);
        }
    }
}
struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.0);
        }
    }
}
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_pref(self.0);
        }
    }
}

fn make_layout(l: &LtLayout) -> Result<Layout> {
    let e = |e| CudaError::cublas("cublasLtMatrixLayoutSetAttribute", e);
    let raw = lt::create_matrix_layout(data_type(l.dtype), l.rows, l.cols, l.ld)
        .map_err(|e| CudaError::cublas("cublasLtMatrixLayoutCreate", e))?;
    let layout = Layout(raw);
    if l.batch > 1 {
        // SAFETY: `layout` is live; the attribute values are an i32 and an i64, as documented.
        unsafe {
            lt::set_matrix_layout_attribute(
                layout.0,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                &l.batch as *const i32 as *const c_void,
                std::mem::size_of::<i32>(),
            )
            .map_err(e)?;
            lt::set_matrix_layout_attribute(
                layout.0,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                &l.batch_stride as *const i64 as *const c_void,
                std::mem::size_of::<i64>(),
            )
            .map_err(e)?;
        }
    }
    Ok(layout)
}

/// The descriptors and the algorithm of one (plan, alignment), built once and reused: cuBLASLt
/// reads them on the host at each call, so only the bias pointer changes between calls.
struct Cached {
    desc: Desc,
    a: Layout,
    b: Layout,
    c: Layout,
    d: Layout,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// A cuBLASLt handle and its plans.
pub struct LtGemm {
    handle: sys::cublasLtHandle_t,
    plans: std::collections::HashMap<(LtPlan, LtAlign), Cached>,
}

// SAFETY: a cuBLASLt handle and its descriptors may be used from any thread as long as calls
// are not concurrent; `LtGemm::matmul` takes `&mut self`.
unsafe impl Send for LtGemm {}

impl LtGemm {
    /// Loads cuBLASLt (an error when it is missing) and creates a handle.
    pub fn new() -> Result<LtGemm> {
        libs::require(CudaLib::CublasLt)?;
        let handle = lt::create_handle().map_err(|e| CudaError::cublas("cublasLtCreate", e))?;
        Ok(LtGemm { handle, plans: std::collections::HashMap::new() })
    }

    /// The plans built so far (one per shape and alignment).
    pub fn cached_plans(&self) -> usize {
        self.plans.len()
    }

    /// Descriptors, layouts and the heuristic's algorithm for `plan` with operands aligned as
    /// `al` and `workspace` bytes of scratch.
    fn build(&self, plan: &LtPlan, al: &LtAlign, workspace: usize) -> Result<Cached> {
        let set = |e| CudaError::cublas("cublasLtMatmulDescSetAttribute", e);
        let desc = Desc(
            lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType::CUDA_R_32F,
            )
            .map_err(|e| CudaError::cublas("cublasLtMatmulDescCreate", e))?,
        );
        let (op_a, op_b) = (operation(plan.op_a), operation(plan.op_b));
        let epilogue = if plan.bias {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        use sys::cublasLtMatmulDescAttributes_t as A;
        // SAFETY: `desc` is live; every value has the type and size the attribute documents.
        unsafe {
            let attr = |a, p: *const c_void, n| lt::set_matmul_desc_attribute(desc.0, a, p, n);
            attr(A::CUBLASLT_MATMUL_DESC_TRANSA, &op_a as *const _ as *const c_void, 4)
                .map_err(set)?;
            attr(A::CUBLASLT_MATMUL_DESC_TRANSB, &op_b as *const _ as *const c_void, 4)
                .map_err(set)?;
            attr(A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue as *const _ as *const c_void, 4)
                .map_err(set)?;
            if plan.bias {
                attr(
                    A::CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE,
                    &plan.bias_batch_stride as *const i64 as _,
                    8,
                )
                .map_err(set)?;
            }
        }
        let (a, b, c) = (make_layout(&plan.a)?, make_layout(&plan.b)?, make_layout(&plan.c)?);
        let d = make_layout(&plan.d)?;
        let pref = Pref(
            lt::create_matmul_pref()
                .map_err(|e| CudaError::cublas("cublasLtMatmulPreferenceCreate", e))?,
        );
        let ws = workspace as u64;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let pset = |e| CudaError::cublas("cublasLtMatmulPreferenceSetAttribute", e);
        // SAFETY: all descriptors are live; the values are a u64 and u32s, as documented; the
        // heuristic only reads them.
        let heuristic = unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
            .map_err(pset)?;
            for (attr, v) in [
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, al.a),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, al.b),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, al.c),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, al.d),
            ] {
                lt::set_matmul_pref_attribute(pref.0, attr, &v as *const u32 as *const c_void, 4)
                    .map_err(pset)?;
            }
            lt::get_matmul_algo_heuristic(self.handle, desc.0, a.0, b.0, c.0, d.0, pref.0)
                .map_err(|e| CudaError::cublas("cublasLtMatmulAlgoGetHeuristic", e))?
        };
        Ok(Cached { desc, a, b, c, d, algo: heuristic.algo })
    }

    /// Queues the GEMM of `plan` on `stream` (fp32 compute and scale), its operands aligned as
    /// `al` (from [`alignments`]), with `workspace` bytes of scratch at `workspace_ptr`. The
    /// descriptors and the algorithm are built on the first call per (plan, alignment) and reused.
    /// The caller keeps every pointer alive until the stream passes.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &mut self,
        plan: &LtPlan,
        al: &LtAlign,
        ptrs: GemmPtrs,
        alpha: f32,
        beta: f32,
        workspace_ptr: u64,
        workspace: usize,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<()> {
        let bias_ptr = ptrs.bias.unwrap_or(0);
        if plan.bias && bias_ptr == 0 {
            return Err(CudaError::invalid("gemm", "the plan has a bias but no bias pointer"));
        }
        let key = (*plan, *al);
        if !self.plans.contains_key(&key) {
            let built = self.build(plan, al, workspace)?;
            self.plans.insert(key, built);
        }
        let c = &self.plans[&key];
        if plan.bias {
            // SAFETY: `c.desc` is live; the value is a device pointer (u64), as documented.
            unsafe {
                lt::set_matmul_desc_attribute(
                    c.desc.0,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bias_ptr as *const u64 as *const c_void,
                    8,
                )
            }
            .map_err(|e| CudaError::cublas("cublasLtMatmulDescSetAttribute", e))?;
        }
        // SAFETY: the pointers are device allocations of at least the layouts' spans (the
        // caller's contract) aligned as `al` says; cuBLASLt's A is our b and its B our a (module
        // header); C and D are the output, read with beta and written in place in stream order.
        unsafe {
            lt::matmul(
                self.handle,
                c.desc.0,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                ptrs.b as *const c_void,
                c.a.0,
                ptrs.a as *const c_void,
                c.b.0,
                ptrs.out as *const c_void,
                c.c.0,
                ptrs.out as *mut c_void,
                c.d.0,
                &c.algo,
                workspace_ptr as *mut c_void,
                workspace,
                stream as sys::cudaStream_t,
            )
            .map_err(|e| CudaError::cublas("cublasLtMatmul", e))
        }
    }
}

impl Drop for LtGemm {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: the handle was created in `new` and is destroyed once, after its plans.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
