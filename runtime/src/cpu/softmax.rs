//! Softmax along any axis. A tensor is viewed as `[outer, n, inner]` around the axis: the last
//! axis gives `inner = 1` (the soft-MoE combine weights), the token axis of `[B, T, slots]`
//! gives `inner = slots` (the dispatch weights, normalised over the tokens of a sequence).

use super::{check_cpu, distinct, same_dtype, same_shape, slice, slice_mut, with_float};
use crate::{Error, Result, Tensor};
use rayon::prelude::*;

/// `(outer, n, inner)` of `shape` around `axis`.
pub(crate) fn around(
    op: &'static str,
    shape: &[usize],
    axis: usize,
) -> Result<(usize, usize, usize)> {
    if axis >= shape.len() {
        return Err(Error::shape(op, format!("axis {axis} out of range for {shape:?}")));
    }
    Ok((shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product()))
}

pub(crate) fn softmax_fwd(x: &Tensor, axis: usize) -> Result<Tensor> {
    const OP: &str = "softmax_fwd";
    check_cpu(OP, &[x])?;
    let (_, n, inner) = around(OP, x.shape(), axis)?;
    with_float!(OP, x.dtype(), T => {
        let g = x.cpu_read()?;
        let xs = slice::<T>(OP, &g)?;
        let mut y = vec![T::zero(); x.numel()];
        y.par_chunks_mut((n * inner).max(1)).zip(xs.par_chunks((n * inner).max(1))).for_each(|(y, x)| {
            for c in 0..inner {
                let m = (0..n).map(|i| x[i * inner + c]).fold(T::neg_infinity(), T::max);
                let mut s = T::zero();
                for i in 0..n {
                    let e = (x[i * inner + c] - m).exp();
                    y[i * inner + c] = e;
                    s += e;
                }
                for i in 0..n {
                    y[i * inner + c] /= s;
                }
            }
        });
        Tensor::from_vec(y, x.shape())
    })
}

pub(crate) fn softmax_bwd(y: &Tensor, dy: &Tensor, axis: usize, dx: &Tensor) -> Result<()> {
    const OP: &str = "softmax_bwd";
    check_cpu(OP, &[y, dy, dx])?;
    distinct(OP, &[dx], &[y, dy])?;
    same_shape(OP, y, dy)?;
    same_shape(OP, y, dx)?;
    let (_, n, inner) = around(OP, y.shape(), axis)?;
    let dt = same_dtype(OP, &[y, dy, dx])?;
    with_float!(OP, dt, T => {
        let (yg, gg) = (y.cpu_read()?, dy.cpu_read()?);
        let (ys, gs) = (slice::<T>(OP, &yg)?, slice::<T>(OP, &gg)?);
        let mut dg = dx.cpu_write()?;
        let blk = (n * inner).max(1);
        slice_mut::<T>(OP, &mut dg)?.par_chunks_mut(blk).zip(ys.par_chunks(blk).zip(gs.par_chunks(blk))).for_each(
            |(d, (y, g))| {
                for c in 0..inner {
                    let dot: T = (0..n).map(|i| y[i * inner + c] * g[i * inner + c]).fold(T::zero(), |a, b| a + b);
                    for i in 0..n {
                        let k = i * inner + c;
                        d[k] += y[k] * (g[k] - dot);
                    }
                }
            },
        );
        Ok(())
    })
}
