//! Strided GEMM on the CPU through the `gemm` crate, tiled deterministically.
//!
//! `c = alpha · a · b + beta · c` for row/column-strided matrices. The output is cut into tiles
//! of at most `TILE_M × TILE_N` by a rule that depends only on (m, n); each tile is one
//! single-threaded `gemm` call over the whole k dimension, and tiles run in parallel. The
//! summation order of every output element is therefore fixed by the shape alone.

use super::{Float, SendPtr};
use rayon::prelude::*;

const TILE_M: usize = 256;
const TILE_N: usize = 1024;
/// Products smaller than this many multiply-adds run as one tile.
const SMALL: usize = 1 << 18;

/// A matrix operand: base pointer, row stride and column stride, in elements.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

#[derive(Clone, Copy)]
pub(crate) struct MatMut<T> {
    pub ptr: *mut T,
    pub rs: isize,
    pub cs: isize,
}

/// One single-threaded GEMM call. `beta == 0` never reads `c` (so uninitialised or NaN
/// contents are fine).
///
/// # Safety
/// The pointers with their strides must address valid `m×k`, `k×n` and `m×n` matrices, and
/// `c` must not overlap `a` or `b` nor be written by anyone else during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_serial<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    alpha: T,
    a: MatRef<T>,
    b: MatRef<T>,
    beta: T,
    c: MatMut<T>,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // The product is empty: c = beta · c.
        for i in 0..m {
            for j in 0..n {
                let p = c.ptr.offset(i as isize * c.rs + j as isize * c.cs);
                *p = if beta == T::zero() { T::zero() } else { *p * beta };
            }
        }
        return;
    }
    // The `gemm` crate computes dst = alpha·dst + beta·lhs·rhs: its names are swapped.
    gemm::gemm(
        m,
        n,
        k,
        c.ptr,
        c.cs,
        c.rs,
        beta != T::zero(),
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        beta,
        alpha,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// A batch of GEMMs, `c_i = alpha · a_i · b_i + beta · c_i`, where operand i starts at
/// `base + i · batch_stride` (a stride of 0 broadcasts one operand). Tiles of all batch entries
/// run in parallel.
///
/// # Safety
/// As `gemm_serial` for every batch entry; distinct entries of `c` must not overlap.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_batched<T: Float>(
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    alpha: T,
    a: MatRef<T>,
    a_bs: isize,
    b: MatRef<T>,
    b_bs: isize,
    beta: T,
    c: MatMut<T>,
    c_bs: isize,
) {
    let (tm, tn) = if m * n * k.max(1) <= SMALL { (m.max(1), n.max(1)) } else { (TILE_M, TILE_N) };
    let mt = m.div_ceil(tm);
    let nt = n.div_ceil(tn);
    let tiles = batch * mt * nt;
    let (ap, bp, cp) = (SendPtr(a.ptr as *mut T), SendPtr(b.ptr as *mut T), SendPtr(c.ptr));
    let run = move |t: usize| {
        let (bi, rest) = (t / (mt * nt), t % (mt * nt));
        let (i0, j0) = ((rest / nt) * tm, (rest % nt) * tn);
        let (mm, nn) = (tm.min(m - i0), tn.min(n - j0));
        // SAFETY: tile t covers rows i0..i0+mm and columns j0..j0+nn of batch entry bi only;
        // tiles are disjoint, and the caller guarantees the operands are valid.
        unsafe {
            let at = MatRef { ptr: ap.get().offset(bi as isize * a_bs + i0 as isize * a.rs), ..a };
            let bt = MatRef { ptr: bp.get().offset(bi as isize * b_bs + j0 as isize * b.cs), ..b };
            let ct = MatMut {
                ptr: cp.get().offset(bi as isize * c_bs + i0 as isize * c.rs + j0 as isize * c.cs),
                ..c
            };
            gemm_serial(mm, nn, k, alpha, at, bt, beta, ct);
        }
    };
    if tiles <= 1 {
        (0..tiles).for_each(run);
    } else {
        (0..tiles).into_par_iter().for_each(run);
    }
}
