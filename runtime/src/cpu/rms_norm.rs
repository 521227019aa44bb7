//! RMSNorm over the last axis, plain and fused with the residual add.
//!
//! Forward: `rstd = 1 / sqrt(mean(x²) + eps)` (eps inside the root), `y = w ⊙ (x · rstd)`
//! (HF multiplies the weight last). Backward with `x̂ = x · rstd`, `g = dy ⊙ w`:
//! `dx = rstd · (g − x̂ · mean(g ⊙ x̂))`, `dw = Σ_rows dy ⊙ x̂`.

use super::{check_cpu, distinct, same_dtype, slice, slice_mut, with_float, Float, ROW_BLOCK};
use crate::{Error, Result, Tensor};
use rayon::prelude::*;

/// The hidden width of a norm over the last axis of `x` with weight `w [h]`.
pub(crate) fn hidden(op: &'static str, x: &Tensor, w: &Tensor) -> Result<usize> {
    let h = *x.shape().last().ok_or_else(|| Error::shape(op, "x must have ≥ 1 axis"))?;
    if w.shape() != [h] {
        return Err(Error::shape(
            op,
            format!("weight must be [{h}] for x {:?}, got {:?}", x.shape(), w.shape()),
        ));
    }
    Ok(h)
}

fn forward_rows<T: Float>(xs: &[T], w: &[T], h: usize, eps: T, y: &mut [T], rstd: &mut [T]) {
    y.par_chunks_mut(h).zip(rstd.par_iter_mut()).zip(xs.par_chunks(h)).for_each(|((y, r), x)| {
        let ms = x.iter().map(|&v| v * v).fold(T::zero(), |a, b| a + b) / T::from_f64(h as f64);
        *r = T::one() / (ms + eps).sqrt();
        for j in 0..h {
            y[j] = w[j] * (x[j] * *r);
        }
    });
}

pub(crate) fn rms_norm_fwd(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    const OP: &str = "rms_norm_fwd";
    check_cpu(OP, &[x, w])?;
    let h = hidden(OP, x, w)?;
    let dt = same_dtype(OP, &[x, w])?;
    let rows = x.numel() / h.max(1);
    with_float!(OP, dt, T => {
        let (xg, wg) = (x.cpu_read()?, w.cpu_read()?);
        let mut y = vec![T::zero(); x.numel()];
        let mut rstd = vec![T::zero(); rows];
        forward_rows(slice::<T>(OP, &xg)?, slice::<T>(OP, &wg)?, h, T::from_f64(eps), &mut y, &mut rstd);
        Ok((Tensor::from_vec(y, x.shape())?, Tensor::from_vec(rstd, &x.shape()[..x.dims() - 1])?))
    })
}

pub(crate) fn add_rms_norm_fwd(
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "add_rms_norm_fwd";
    check_cpu(OP, &[x, r, w])?;
    super::same_shape(OP, x, r)?;
    let h = hidden(OP, x, w)?;
    let dt = same_dtype(OP, &[x, r, w])?;
    let rows = x.numel() / h.max(1);
    with_float!(OP, dt, T => {
        let (xg, rg, wg) = (x.cpu_read()?, r.cpu_read()?, w.cpu_read()?);
        let (xs, rs) = (slice::<T>(OP, &xg)?, slice::<T>(OP, &rg)?);
        let sum: Vec<T> = xs.par_iter().zip(rs.par_iter()).with_min_len(super::ELEM_CHUNK).map(|(&a, &b)| a + b).collect();
        let mut y = vec![T::zero(); x.numel()];
        let mut rstd = vec![T::zero(); rows];
        forward_rows(&sum, slice::<T>(OP, &wg)?, h, T::from_f64(eps), &mut y, &mut rstd);
        Ok((
            Tensor::from_vec(sum, x.shape())?,
            Tensor::from_vec(y, x.shape())?,
            Tensor::from_vec(rstd, &x.shape()[..x.dims() - 1])?,
        ))
    })
}

/// Shared backward: `g = dsum + rms_norm_bwd(dy)` is added into every tensor of `outs`
/// (`[dx]` for the plain norm, `[dx, dr]` for the fused residual add).
pub(crate) fn rms_norm_bwd(
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    dsum: Option<&Tensor>,
    outs: &[&Tensor],
    dw: &Tensor,
) -> Result<()> {
    const OP: &str = "rms_norm_bwd";
    let mut ins = vec![x, w, rstd, dy];
    ins.extend(dsum);
    check_cpu(OP, &ins)?;
    check_cpu(OP, outs)?;
    let mut all_outs = outs.to_vec();
    all_outs.push(dw);
    distinct(OP, &all_outs, &ins)?;
    let h = hidden(OP, x, w)?;
    let rows = x.numel() / h.max(1);
    if rstd.numel() != rows {
        return Err(Error::shape(
            OP,
            format!("rstd {:?} does not match x {:?}", rstd.shape(), x.shape()),
        ));
    }
    for t in outs.iter().chain([&dy]).chain(dsum.as_ref()) {
        super::same_shape(OP, x, t)?;
    }
    super::same_shape(OP, w, dw)?;
    let mut dts = ins.clone();
    dts.extend(&all_outs);
    let dt = same_dtype(OP, &dts)?;
    with_float!(OP, dt, T => {
        let (xg, wg, rg, gg) = (x.cpu_read()?, w.cpu_read()?, rstd.cpu_read()?, dy.cpu_read()?);
        let (xs, ws, rs, gs) = (slice::<T>(OP, &xg)?, slice::<T>(OP, &wg)?, slice::<T>(OP, &rg)?, slice::<T>(OP, &gg)?);
        let dsg = match dsum {
            Some(t) => Some(t.cpu_read()?),
            None => None,
        };
        let ds = match &dsg {
            Some(g) => Some(slice::<T>(OP, g)?),
            None => None,
        };
        let hh = T::from_f64(h as f64);
        // The input gradient of each row, computed once, added into every output.
        let mut grad = vec![T::zero(); x.numel()];
        grad.par_chunks_mut(h).enumerate().for_each(|(i, gx)| {
            let (xr, gr, r) = (&xs[i * h..(i + 1) * h], &gs[i * h..(i + 1) * h], rs[i]);
            let mut dot = T::zero();
            for j in 0..h {
                dot += gr[j] * ws[j] * (xr[j] * r);
            }
            let mean = dot / hh;
            for j in 0..h {
                gx[j] = r * (gr[j] * ws[j] - xr[j] * r * mean);
                if let Some(ds) = ds {
                    gx[j] += ds[i * h + j];
                }
            }
        });
        for out in outs {
            let mut og = out.cpu_write()?;
            slice_mut::<T>(OP, &mut og)?
                .par_chunks_mut(super::ELEM_CHUNK)
                .zip(grad.par_chunks(super::ELEM_CHUNK))
                .for_each(|(o, g)| o.iter_mut().zip(g).for_each(|(o, &g)| *o += g));
        }
        // dw: per block of rows a partial sum, blocks combined in order.
        let partials: Vec<Vec<T>> = (0..rows.div_ceil(ROW_BLOCK))
            .into_par_iter()
            .map(|b| {
                let mut acc = vec![T::zero(); h];
                for i in b * ROW_BLOCK..((b + 1) * ROW_BLOCK).min(rows) {
                    let r = rs[i];
                    for j in 0..h {
                        acc[j] += gs[i * h + j] * (xs[i * h + j] * r);
                    }
                }
                acc
            })
            .collect();
        let mut dwg = dw.cpu_write()?;
        let dws = slice_mut::<T>(OP, &mut dwg)?;
        for p in &partials {
            dws.iter_mut().zip(p).for_each(|(d, &v)| *d += v);
        }
        Ok(())
    })
}
