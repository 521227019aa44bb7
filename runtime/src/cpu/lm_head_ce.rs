//! The lm_head projection fused with softmax cross entropy, in chunks of tokens.
//!
//! For each chunk of `chunk_tokens` rows of `x [N, H]`: `logits = x wᵀ` (`[chunk, V]`), then per
//! row `lse = log Σ_j exp(logits_j)` (max subtracted) and `nll = lse − logits[target]`. Rows whose
//! target equals `ignore_index` count nothing. The loss returned is the SUM over counted rows;
//! the caller divides by the count it wants (all targets ignored: sum 0, count 0, never NaN).
//! Backward recomputes each chunk's logits and turns them in place into
//! `dlogits = g · (softmax − onehot)`, then `dx += dlogits w`, `dw += dlogitsᵀ x`.

use super::gemm::{gemm_batched, MatMut, MatRef};
use super::matmul::widened;
use super::{check_cpu, distinct, slice, slice_mut, with_float, Float};
use crate::backend::{CrossEntropy, CrossEntropyOut};
use crate::{CpuStorage, DType, Error, Result, Tensor};
use rayon::prelude::*;

/// Tokens, hidden width and vocabulary of an lm_head + cross-entropy problem.
pub(crate) struct Dims {
    pub(crate) n: usize,
    pub(crate) h: usize,
    pub(crate) v: usize,
}

/// Checks the shapes (and that x and w share a dtype) of an lm_head + cross-entropy problem.
pub(crate) fn dims(
    op: &'static str,
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    spec: CrossEntropy,
) -> Result<Dims> {
    let (&[n, h], &[v, h2]) = (x.shape(), w.shape()) else {
        return Err(Error::shape(
            op,
            format!(
                "x must be [tokens, hidden] and w [vocab, hidden], got {:?} and {:?}",
                x.shape(),
                w.shape()
            ),
        ));
    };
    if h != h2 || targets.numel() != n {
        return Err(Error::shape(
            op,
            format!(
                "x {:?}, w {:?} and targets {:?} do not fit",
                x.shape(),
                w.shape(),
                targets.shape()
            ),
        ));
    }
    if spec.chunk_tokens == 0 {
        return Err(Error::invalid(op, "chunk_tokens must be at least 1"));
    }
    if x.dtype() != w.dtype() {
        return Err(Error::dtype(
            op,
            w.dtype(),
            format!("x is {}: x and w must share a dtype", x.dtype()),
        ));
    }
    Ok(Dims { n, h, v })
}

/// Targets as i64, each either `ignore_index` or a valid class.
fn read_targets(op: &'static str, targets: &Tensor, v: usize, ignore: i64) -> Result<Vec<i64>> {
    let g = targets.cpu_read()?;
    let t: Vec<i64> = match &*g {
        CpuStorage::I32(x) => x.iter().map(|&a| a as i64).collect(),
        CpuStorage::U32(x) => x.iter().map(|&a| a as i64).collect(),
        CpuStorage::U16(x) => x.iter().map(|&a| a as i64).collect(),
        other => return Err(Error::dtype(op, other.dtype(), "targets must be I32, U32 or U16")),
    };
    if let Some((i, &bad)) =
        t.iter().enumerate().find(|(_, &a)| a != ignore && (a < 0 || a as usize >= v))
    {
        return Err(Error::invalid(
            op,
            format!(
                "target {bad} at position {i} is outside 0..{v} and not the ignore index {ignore}"
            ),
        ));
    }
    Ok(t)
}

fn compute_dtype(x: &Tensor) -> DType {
    if x.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `logits [rows, V] = x[r0..r0+rows] · wᵀ`.
fn chunk_logits<T: Float>(xs: &[T], ws: &[T], dm: &Dims, r0: usize, rows: usize, logits: &mut [T]) {
    // SAFETY: x holds N·H, w holds V·H and logits rows·V elements; rows r0..r0+rows < N.
    unsafe {
        gemm_batched(
            1,
            rows,
            dm.v,
            dm.h,
            T::one(),
            MatRef { ptr: xs.as_ptr().add(r0 * dm.h), rs: dm.h as isize, cs: 1 },
            0,
            MatRef { ptr: ws.as_ptr(), rs: 1, cs: dm.h as isize },
            0,
            T::zero(),
            MatMut { ptr: logits.as_mut_ptr(), rs: dm.v as isize, cs: 1 },
            0,
        );
    }
}

/// `dx[r0..] += dlogits · w` and `dw += dlogitsᵀ · x[r0..]` for one chunk.
#[allow(clippy::too_many_arguments)]
fn chunk_grads<T: Float>(
    xs: &[T],
    ws: &[T],
    dm: &Dims,
    r0: usize,
    rows: usize,
    lgt: &[T],
    dxs: &mut [T],
    dws: &mut [T],
) {
    assert!(
        lgt.len() >= rows * dm.v && dxs.len() >= (r0 + rows) * dm.h && dws.len() >= dm.v * dm.h
    );
    // SAFETY: dlogits is rows·V, w is V·H, dx rows r0.. are inside N·H, x rows likewise,
    // dw is V·H; dx/dw are exclusively borrowed and do not alias the inputs (checked).
    unsafe {
        gemm_batched(
            1,
            rows,
            dm.h,
            dm.v,
            T::one(),
            MatRef { ptr: lgt.as_ptr(), rs: dm.v as isize, cs: 1 },
            0,
            MatRef { ptr: ws.as_ptr(), rs: dm.h as isize, cs: 1 },
            0,
            T::one(),
            MatMut { ptr: dxs.as_mut_ptr().add(r0 * dm.h), rs: dm.h as isize, cs: 1 },
            0,
        );
        gemm_batched(
            1,
            dm.v,
            dm.h,
            rows,
            T::one(),
            MatRef { ptr: lgt.as_ptr(), rs: 1, cs: dm.v as isize },
            0,
            MatRef { ptr: xs.as_ptr().add(r0 * dm.h), rs: dm.h as isize, cs: 1 },
            0,
            T::one(),
            MatMut { ptr: dws.as_mut_ptr(), rs: dm.h as isize, cs: 1 },
            0,
        );
    }
}

fn log_sum_exp<T: Float>(row: &[T]) -> T {
    let m = row.iter().copied().fold(T::neg_infinity(), T::max);
    let s = row.iter().map(|&l| (l - m).exp()).fold(T::zero(), |a, b| a + b);
    m + s.ln()
}

pub(crate) fn lm_head_ce_fwd(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    spec: CrossEntropy,
) -> Result<CrossEntropyOut> {
    const OP: &str = "lm_head_ce_fwd";
    check_cpu(OP, &[x, w, targets])?;
    let dm = dims(OP, x, w, targets, spec)?;
    let tg = read_targets(OP, targets, dm.v, spec.ignore_index)?;
    let count = tg.iter().filter(|&&t| t != spec.ignore_index).count();
    with_float!(OP, compute_dtype(x), T => {
        let (xv, wv) = (widened::<T>(OP, x)?, widened::<T>(OP, w)?);
        let (xs, ws) = (xv.get(), wv.get());
        let mut lse = vec![T::zero(); dm.n];
        let mut nll = vec![0f64; dm.n];
        let mut logits = vec![T::zero(); spec.chunk_tokens.min(dm.n) * dm.v];
        for r0 in (0..dm.n).step_by(spec.chunk_tokens) {
            let rows = spec.chunk_tokens.min(dm.n - r0);
            let lg = &mut logits[..rows * dm.v];
            chunk_logits(xs, ws, &dm, r0, rows, lg);
            lg.par_chunks(dm.v.max(1))
                .zip(lse[r0..r0 + rows].par_iter_mut().zip(nll[r0..r0 + rows].par_iter_mut()))
                .zip(tg[r0..r0 + rows].par_iter())
                .for_each(|((row, (l, nl)), &t)| {
                    if t != spec.ignore_index {
                        *l = log_sum_exp(row);
                        *nl = (*l - row[t as usize]).as_f64();
                    }
                });
        }
        // Summed in token order, in f64.
        let total: f64 = nll.iter().sum();
        Ok(CrossEntropyOut {
            loss_sum: Tensor::from_vec(vec![T::from_f64(total)], &[1])?,
            lse: Tensor::from_vec(lse, &[dm.n])?,
            count,
        })
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn lm_head_ce_bwd(
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
    check_cpu(OP, &[x, w, targets, lse, dloss, dx, dw])?;
    distinct(OP, &[dx, dw], &[x, w, targets, lse, dloss])?;
    let dm = dims(OP, x, w, targets, spec)?;
    let tg = read_targets(OP, targets, dm.v, spec.ignore_index)?;
    let cd = compute_dtype(x);
    for t in [lse, dloss, dx, dw] {
        if t.dtype() != cd {
            return Err(Error::dtype(
                OP,
                t.dtype(),
                format!("lse, dloss and the gradients must be {cd}"),
            ));
        }
    }
    if lse.numel() != dm.n
        || dloss.numel() != 1
        || dx.shape() != x.shape()
        || dw.shape() != w.shape()
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
    with_float!(OP, cd, T => {
        let (xv, wv) = (widened::<T>(OP, x)?, widened::<T>(OP, w)?);
        let (xs, ws) = (xv.get(), wv.get());
        let (lg_, dlg) = (lse.cpu_read()?, dloss.cpu_read()?);
        let ls = slice::<T>(OP, &lg_)?;
        let g = slice::<T>(OP, &dlg)?[0] * T::from_f64(scale);
        let (mut dxg, mut dwg) = (dx.cpu_write()?, dw.cpu_write()?);
        let (dxs, dws) = (slice_mut::<T>(OP, &mut dxg)?, slice_mut::<T>(OP, &mut dwg)?);
        let mut logits = vec![T::zero(); spec.chunk_tokens.min(dm.n) * dm.v];
        for r0 in (0..dm.n).step_by(spec.chunk_tokens) {
            let rows = spec.chunk_tokens.min(dm.n - r0);
            let lgt = &mut logits[..rows * dm.v];
            chunk_logits(xs, ws, &dm, r0, rows, lgt);
            lgt.par_chunks_mut(dm.v.max(1)).zip(ls[r0..r0 + rows].par_iter()).zip(tg[r0..r0 + rows].par_iter()).for_each(
                |((row, &l), &t)| {
                    if t == spec.ignore_index {
                        row.iter_mut().for_each(|x| *x = T::zero());
                    } else {
                        row.iter_mut().for_each(|x| *x = (*x - l).exp() * g);
                        row[t as usize] -= g;
                    }
                },
            );
            chunk_grads(xs, ws, &dm, r0, rows, lgt, dxs, dws);
        }
        Ok(())
    })
}

pub(crate) fn lm_head_ce_fwd_bwd(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    scale: f64,
    spec: CrossEntropy,
    dx: &Tensor,
    dw: &Tensor,
) -> Result<CrossEntropyOut> {
    const OP: &str = "lm_head_ce_fwd_bwd";
    check_cpu(OP, &[x, w, targets, dx, dw])?;
    distinct(OP, &[dx, dw], &[x, w, targets])?;
    let dm = dims(OP, x, w, targets, spec)?;
    let tg = read_targets(OP, targets, dm.v, spec.ignore_index)?;
    let count = tg.iter().filter(|&&t| t != spec.ignore_index).count();
    let cd = compute_dtype(x);
    for t in [dx, dw] {
        if t.dtype() != cd {
            return Err(Error::dtype(OP, t.dtype(), format!("the gradients must be {cd}")));
        }
    }
    if dx.shape() != x.shape() || dw.shape() != w.shape() {
        return Err(Error::shape(
            OP,
            format!("dx {:?} or dw {:?} do not fit x and w", dx.shape(), dw.shape()),
        ));
    }
    with_float!(OP, cd, T => {
        let (xv, wv) = (widened::<T>(OP, x)?, widened::<T>(OP, w)?);
        let (xs, ws) = (xv.get(), wv.get());
        let g = T::from_f64(scale);
        let (mut dxg, mut dwg) = (dx.cpu_write()?, dw.cpu_write()?);
        let (dxs, dws) = (slice_mut::<T>(OP, &mut dxg)?, slice_mut::<T>(OP, &mut dwg)?);
        let mut lse = vec![T::zero(); dm.n];
        let mut nll = vec![0f64; dm.n];
        let mut logits = vec![T::zero(); spec.chunk_tokens.min(dm.n) * dm.v];
        for r0 in (0..dm.n).step_by(spec.chunk_tokens) {
            let rows = spec.chunk_tokens.min(dm.n - r0);
            let lgt = &mut logits[..rows * dm.v];
            chunk_logits(xs, ws, &dm, r0, rows, lgt);
            lgt.par_chunks_mut(dm.v.max(1))
                .zip(lse[r0..r0 + rows].par_iter_mut().zip(nll[r0..r0 + rows].par_iter_mut()))
                .zip(tg[r0..r0 + rows].par_iter())
                .for_each(|((row, (l, nl)), &t)| {
                    if t == spec.ignore_index {
                        row.iter_mut().for_each(|x| *x = T::zero());
                    } else {
                        // the same expressions as the forward and the backward
                        *l = log_sum_exp(row);
                        *nl = (*l - row[t as usize]).as_f64();
                        let lv = *l;
                        row.iter_mut().for_each(|x| *x = (*x - lv).exp() * g);
                        row[t as usize] -= g;
                    }
                });
            chunk_grads(xs, ws, &dm, r0, rows, lgt, dxs, dws);
        }
        let total: f64 = nll.iter().sum();
        Ok(CrossEntropyOut {
            loss_sum: Tensor::from_vec(vec![T::from_f64(total)], &[1])?,
            lse: Tensor::from_vec(lse, &[dm.n])?,
            count,
        })
    })
}
