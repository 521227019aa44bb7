//! `y = x / max(‖x‖₂, eps)` along an axis (torch `F.normalize`): per token over the hidden axis
//! for the soft-MoE inputs, per slot column over the hidden axis (axis 0) for `phi`.
//! Backward: for `‖x‖ > eps`, `dx = (dy − y · Σ y ⊙ dy) / ‖x‖`; otherwise the divisor is the
//! constant eps and `dx = dy / eps`.

use super::softmax::around;
use super::{check_cpu, distinct, same_dtype, same_shape, slice, slice_mut, with_float};
use crate::{Error, Result, Tensor};
use rayon::prelude::*;

pub(crate) fn l2_normalize_fwd(x: &Tensor, axis: usize, eps: f64) -> Result<(Tensor, Tensor)> {
    const OP: &str = "l2_normalize_fwd";
    check_cpu(OP, &[x])?;
    let (outer, n, inner) = around(OP, x.shape(), axis)?;
    let mut norm_shape = x.shape().to_vec();
    norm_shape.remove(axis);
    with_float!(OP, x.dtype(), T => {
        let g = x.cpu_read()?;
        let xs = slice::<T>(OP, &g)?;
        let mut y = vec![T::zero(); x.numel()];
        let mut norms = vec![T::zero(); outer * inner];
        let e = T::from_f64(eps);
        let blk = (n * inner).max(1);
        y.par_chunks_mut(blk).zip(norms.par_chunks_mut(inner.max(1))).zip(xs.par_chunks(blk)).for_each(|((y, nr), x)| {
            for c in 0..inner {
                let ss = (0..n).map(|i| x[i * inner + c] * x[i * inner + c]).fold(T::zero(), |a, b| a + b);
                let norm = ss.sqrt();
                nr[c] = norm;
                let d = norm.max(e);
                for i in 0..n {
                    y[i * inner + c] = x[i * inner + c] / d;
                }
            }
        });
        Ok((Tensor::from_vec(y, x.shape())?, Tensor::from_vec(norms, &norm_shape)?))
    })
}

pub(crate) fn l2_normalize_bwd(
    y: &Tensor,
    norm: &Tensor,
    dy: &Tensor,
    axis: usize,
    eps: f64,
    dx: &Tensor,
) -> Result<()> {
    const OP: &str = "l2_normalize_bwd";
    check_cpu(OP, &[y, norm, dy, dx])?;
    distinct(OP, &[dx], &[y, norm, dy])?;
    same_shape(OP, y, dy)?;
    same_shape(OP, y, dx)?;
    let (outer, n, inner) = around(OP, y.shape(), axis)?;
    if norm.numel() != outer * inner {
        return Err(Error::shape(
            OP,
            format!("norm {:?} does not match y {:?} at axis {axis}", norm.shape(), y.shape()),
        ));
    }
    let dt = same_dtype(OP, &[y, norm, dy, dx])?;
    with_float!(OP, dt, T => {
        let (yg, ng, gg) = (y.cpu_read()?, norm.cpu_read()?, dy.cpu_read()?);
        let (ys, ns, gs) = (slice::<T>(OP, &yg)?, slice::<T>(OP, &ng)?, slice::<T>(OP, &gg)?);
        let mut dg = dx.cpu_write()?;
        let e = T::from_f64(eps);
        let blk = (n * inner).max(1);
        slice_mut::<T>(OP, &mut dg)?
            .par_chunks_mut(blk)
            .zip(ys.par_chunks(blk).zip(gs.par_chunks(blk)).zip(ns.par_chunks(inner.max(1))))
            .for_each(|(d, ((y, g), nr))| {
                for c in 0..inner {
                    if nr[c] > e {
                        let dot = (0..n).map(|i| y[i * inner + c] * g[i * inner + c]).fold(T::zero(), |a, b| a + b);
                        for i in 0..n {
                            let k = i * inner + c;
                            d[k] += (g[k] - y[k] * dot) / nr[c];
                        }
                    } else {
                        for i in 0..n {
                            let k = i * inner + c;
                            d[k] += g[k] / e;
                        }
                    }
                }
            });
        Ok(())
    })
}
