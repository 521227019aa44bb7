//! The soft-MoE routing and its two mixes (DESIGN §1), per row of T tokens and S slots:
//!
//! - `route`: `X̂ = X / max(‖X‖, eps)` per token, `Φ̂ = scale · Φ / max(‖Φ‖, eps)` per slot
//!   column, `L = X̂ Φ̂ [T, S]`, `D = softmax_T(L)` (each slot's column over the row's tokens),
//!   `C = softmax_S(L)` (each token's row over the slots).
//! - `dispatch`: `X̃ = Dᵀ X̂ [S, d]`; `combine`: `Y = C Ỹ [T, d]`.
//!
//! Backward of the routing: `dL = D ⊙ (dD − Σ_t D ⊙ dD) + C ⊙ (dC − Σ_s C ⊙ dC)`, then
//! `dX̂ = d_xn + dL Φ̂ᵀ` through the token norm, and `dΦ̂ = X̂ᵀ dL` (over every token of the
//! batch) through the scale and the column norm. Every sum runs in a fixed order (over tokens
//! in token order), so results do not depend on the thread count.
//!
//! The shape checks are shared with the GPU launchers (`route_dims`, `mix_dims`).

use super::{check_cpu, distinct, same_dtype, same_shape, slice, slice_mut, with_float};
use crate::backend::SoftMoeRoute;
use crate::{Error, Result, Tensor};
use rayon::prelude::*;

/// The sizes of a soft-MoE call: `b` rows of `t` tokens of width `d`, `s` slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MoeDims {
    pub b: usize,
    pub t: usize,
    pub d: usize,
    pub s: usize,
}

fn nonempty(op: &'static str, m: MoeDims) -> Result<MoeDims> {
    if m.b == 0 || m.t == 0 || m.d == 0 || m.s == 0 {
        return Err(Error::shape(
            op,
            format!(
                "the soft-MoE needs at least one row, token, hidden unit and slot (B {}, T {}, d {}, S {})",
                m.b, m.t, m.d, m.s
            ),
        ));
    }
    Ok(m)
}

/// The shapes of the routing: `x [B, T, d]`, `phi [d, S]`, `scale [1]`.
pub(crate) fn route_dims(
    op: &'static str,
    x: &Tensor,
    phi: &Tensor,
    scale: &Tensor,
) -> Result<MoeDims> {
    let (&[b, t, d], &[d2, s]) = (x.shape(), phi.shape()) else {
        return Err(Error::shape(
            op,
            format!(
                "x must be [batch, seq, hidden] and phi [hidden, slots], got {:?} and {:?}",
                x.shape(),
                phi.shape()
            ),
        ));
    };
    if d != d2 || scale.numel() != 1 {
        return Err(Error::shape(
            op,
            format!(
                "phi {:?} and scale {:?} do not fit x {:?} (phi [hidden, slots], scale [1])",
                phi.shape(),
                scale.shape(),
                x.shape()
            ),
        ));
    }
    nonempty(op, MoeDims { b, t, d, s })
}

/// The value inputs of the routing's backward, in one order for both backends' checks.
pub(crate) fn route_bwd_inputs<'a>(
    r: &'a SoftMoeRoute,
    phi: &'a Tensor,
    scale: &'a Tensor,
    d_xn: &'a Tensor,
    d_dispatch: &'a Tensor,
    d_combine: &'a Tensor,
) -> [&'a Tensor; 10] {
    [
        &r.xn,
        &r.x_norm,
        &r.phi_norm,
        &r.dispatch,
        &r.combine,
        phi,
        scale,
        d_xn,
        d_dispatch,
        d_combine,
    ]
}

/// The shapes of the routing's backward: the saved route of `route_dims(x, phi, scale)`, and
/// `d_xn`/`dx` like `xn`, `d_dispatch`/`d_combine` like the weights, `dphi` like `phi`,
/// `dscale` like `scale`; the three outputs share storage with nothing.
#[allow(clippy::too_many_arguments)]
pub(crate) fn route_bwd_dims(
    op: &'static str,
    r: &SoftMoeRoute,
    phi: &Tensor,
    scale: &Tensor,
    d_xn: &Tensor,
    d_dispatch: &Tensor,
    d_combine: &Tensor,
    dx: &Tensor,
    dphi: &Tensor,
    dscale: &Tensor,
) -> Result<MoeDims> {
    let m = route_dims(op, &r.xn, phi, scale)?;
    let MoeDims { b, t, s, .. } = m;
    for (w, name) in [(&r.dispatch, "dispatch"), (&r.combine, "combine")] {
        if w.shape() != [b, t, s] {
            return Err(Error::shape(op, format!("{name} {:?} is not [{b}, {t}, {s}]", w.shape())));
        }
    }
    if r.x_norm.shape() != [b, t] || r.phi_norm.shape() != [s] {
        return Err(Error::shape(
            op,
            format!(
                "x_norm {:?} / phi_norm {:?} are not [{b}, {t}] / [{s}]",
                r.x_norm.shape(),
                r.phi_norm.shape()
            ),
        ));
    }
    for (g, like) in [
        (d_xn, &r.xn),
        (dx, &r.xn),
        (d_dispatch, &r.dispatch),
        (d_combine, &r.dispatch),
        (dphi, phi),
    ] {
        same_shape(op, like, g)?;
    }
    if dscale.numel() != 1 {
        return Err(Error::shape(op, format!("dscale {:?} must hold one element", dscale.shape())));
    }
    distinct(
        op,
        &[dx, dphi, dscale],
        &route_bwd_inputs(r, phi, scale, d_xn, d_dispatch, d_combine),
    )?;
    Ok(m)
}

/// The shapes of a mix: routing weights `w [B, T, S]` and `x [B, rows, d]` with
/// `rows = T` (`tokens_side`: the token activations) or `rows = S` (the slot activations).
pub(crate) fn mix_dims(
    op: &'static str,
    w: &Tensor,
    x: &Tensor,
    tokens_side: bool,
) -> Result<MoeDims> {
    let (&[b, t, s], &[b2, rows, d]) = (w.shape(), x.shape()) else {
        return Err(Error::shape(
            op,
            format!("the routing weights must be [batch, seq, slots] and the activations 3-D, got {:?} and {:?}", w.shape(), x.shape()),
        ));
    };
    let want = if tokens_side { t } else { s };
    if b != b2 || rows != want {
        let side = if tokens_side { "[batch, seq, hidden]" } else { "[batch, slots, hidden]" };
        return Err(Error::shape(
            op,
            format!("{:?} does not fit the weights {:?} (expected {side})", x.shape(), w.shape()),
        ));
    }
    nonempty(op, MoeDims { b, t, d, s })
}

pub(crate) fn soft_moe_route_fwd(
    x: &Tensor,
    phi: &Tensor,
    scale: &Tensor,
    eps: f64,
) -> Result<SoftMoeRoute> {
    const OP: &str = "soft_moe_route_fwd";
    check_cpu(OP, &[x, phi, scale])?;
    let MoeDims { b, t, d, s } = route_dims(OP, x, phi, scale)?;
    let dt = same_dtype(OP, &[x, phi, scale])?;
    with_float!(OP, dt, T => {
        let (xg, pg, sg) = (x.cpu_read()?, phi.cpu_read()?, scale.cpu_read()?);
        let (xs, ps, sc) = (slice::<T>(OP, &xg)?, slice::<T>(OP, &pg)?, slice::<T>(OP, &sg)?[0]);
        let e = T::from_f64(eps);
        let pn: Vec<T> = (0..s).map(|j| (0..d).map(|c| ps[c * s + j] * ps[c * s + j]).sum::<T>().sqrt()).collect();
        let phis: Vec<T> = (0..d * s).map(|i| sc * ps[i] / pn[i % s].max(e)).collect();
        let mut xn = vec![T::zero(); b * t * d];
        let mut xnorm = vec![T::zero(); b * t];
        let mut logits = vec![T::zero(); b * t * s];
        xn.par_chunks_mut(d)
            .zip(xnorm.par_iter_mut())
            .zip(logits.par_chunks_mut(s))
            .zip(xs.par_chunks(d))
            .for_each(|(((y, nr), l), x)| {
                let norm = x.iter().map(|&v| v * v).sum::<T>().sqrt();
                *nr = norm;
                let div = norm.max(e);
                for (y, &v) in y.iter_mut().zip(x) {
                    *y = v / div;
                }
                for (j, l) in l.iter_mut().enumerate() {
                    *l = (0..d).map(|c| y[c] * phis[c * s + j]).sum();
                }
            });
        let mut dispatch = vec![T::zero(); b * t * s];
        dispatch.par_chunks_mut(t * s).zip(logits.par_chunks(t * s)).for_each(|(dr, lr)| {
            for j in 0..s {
                let m = (0..t).map(|i| lr[i * s + j]).fold(T::neg_infinity(), T::max);
                let mut z = T::zero();
                for i in 0..t {
                    let v = (lr[i * s + j] - m).exp();
                    dr[i * s + j] = v;
                    z += v;
                }
                for i in 0..t {
                    dr[i * s + j] /= z;
                }
            }
        });
        let mut combine = vec![T::zero(); b * t * s];
        combine.par_chunks_mut(s).zip(logits.par_chunks(s)).for_each(|(cr, lr)| {
            let m = lr.iter().copied().fold(T::neg_infinity(), T::max);
            let mut z = T::zero();
            for (c, &l) in cr.iter_mut().zip(lr) {
                *c = (l - m).exp();
                z += *c;
            }
            for c in cr.iter_mut() {
                *c /= z;
            }
        });
        Ok(SoftMoeRoute {
            xn: Tensor::from_vec(xn, &[b, t, d])?,
            x_norm: Tensor::from_vec(xnorm, &[b, t])?,
            phi_norm: Tensor::from_vec(pn, &[s])?,
            dispatch: Tensor::from_vec(dispatch, &[b, t, s])?,
            combine: Tensor::from_vec(combine, &[b, t, s])?,
        })
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn soft_moe_route_bwd(
    r: &SoftMoeRoute,
    phi: &Tensor,
    scale: &Tensor,
    d_xn: &Tensor,
    d_dispatch: &Tensor,
    d_combine: &Tensor,
    eps: f64,
    dx: &Tensor,
    dphi: &Tensor,
    dscale: &Tensor,
) -> Result<()> {
    const OP: &str = "soft_moe_route_bwd";
    let ins = route_bwd_inputs(r, phi, scale, d_xn, d_dispatch, d_combine);
    check_cpu(OP, &ins)?;
    check_cpu(OP, &[dx, dphi, dscale])?;
    let MoeDims { b, t, d, s } =
        route_bwd_dims(OP, r, phi, scale, d_xn, d_dispatch, d_combine, dx, dphi, dscale)?;
    let mut all = ins.to_vec();
    all.extend([dx, dphi, dscale]);
    let dt = same_dtype(OP, &all)?;
    with_float!(OP, dt, T => {
        let g: Vec<_> = ins.iter().map(|t| t.cpu_read()).collect::<Result<_>>()?;
        let v: Vec<&[T]> = g.iter().map(|g| slice::<T>(OP, g)).collect::<Result<_>>()?;
        let (xn, xnorm, pn, dd, cc, ps, sc, gxn, gd, gc) = (v[0], v[1], v[2], v[3], v[4], v[5], v[6][0], v[7], v[8], v[9]);
        let e = T::from_f64(eps);
        let phin: Vec<T> = (0..d * s).map(|i| ps[i] / pn[i % s].max(e)).collect();
        // Σ_t D ⊙ dD per (row, slot), in token order.
        let mut cs = vec![T::zero(); b * s];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..s {
                    let k = (bi * t + i) * s + j;
                    cs[bi * s + j] += dd[k] * gd[k];
                }
            }
        }
        let mut dl = vec![T::zero(); b * t * s];
        dl.par_chunks_mut(s).enumerate().for_each(|(tok, dl)| {
            let o = tok * s;
            let rs: T = (0..s).map(|j| cc[o + j] * gc[o + j]).sum();
            let bi = tok / t;
            for j in 0..s {
                dl[j] = dd[o + j] * (gd[o + j] - cs[bi * s + j]) + cc[o + j] * (gc[o + j] - rs);
            }
        });
        {
            let mut dxg = dx.cpu_write()?;
            let dxs = slice_mut::<T>(OP, &mut dxg)?;
            dxs.par_chunks_mut(d).enumerate().for_each(|(tok, dxr)| {
                let (y, gy, l) = (&xn[tok * d..(tok + 1) * d], &gxn[tok * d..(tok + 1) * d], &dl[tok * s..(tok + 1) * s]);
                let grad = |c: usize| gy[c] + (0..s).map(|j| l[j] * sc * phin[c * s + j]).sum::<T>();
                let norm = xnorm[tok];
                if norm > e {
                    let dot: T = (0..d).map(|c| y[c] * grad(c)).sum();
                    for (c, dx) in dxr.iter_mut().enumerate() {
                        *dx += (grad(c) - y[c] * dot) / norm;
                    }
                } else {
                    for (c, dx) in dxr.iter_mut().enumerate() {
                        *dx += grad(c) / e;
                    }
                }
            });
        }
        // dΦ̂ = X̂ᵀ dL over every token (in token order), per hidden unit.
        let mut dphis = vec![T::zero(); d * s];
        dphis.par_chunks_mut(s).enumerate().for_each(|(c, acc)| {
            for tok in 0..b * t {
                let x = xn[tok * d + c];
                for j in 0..s {
                    acc[j] += x * dl[tok * s + j];
                }
            }
        });
        let ds: T = (0..d * s).map(|i| dphis[i] * phin[i]).sum();
        slice_mut::<T>(OP, &mut *dscale.cpu_write()?)?[0] += ds;
        let mut dpg = dphi.cpu_write()?;
        let dps = slice_mut::<T>(OP, &mut dpg)?;
        for j in 0..s {
            if pn[j] > e {
                let dot: T = (0..d).map(|c| phin[c * s + j] * sc * dphis[c * s + j]).sum();
                for c in 0..d {
                    dps[c * s + j] += (sc * dphis[c * s + j] - phin[c * s + j] * dot) / pn[j];
                }
            } else {
                for c in 0..d {
                    dps[c * s + j] += sc * dphis[c * s + j] / e;
                }
            }
        }
        Ok(())
    })
}

/// `out[b, j, c] = Σ_t w[b, t, j] · x[b, t, c]`, per row in token order (the dispatch mix, and
/// the slot side of the combine backward).
fn tokens_to_slots<T: super::Float>(w: &[T], x: &[T], m: MoeDims) -> Vec<T> {
    let MoeDims { t, d, s, .. } = m;
    let mut out = vec![T::zero(); m.b * s * d];
    out.par_chunks_mut(s * d).enumerate().for_each(|(bi, o)| {
        for i in 0..t {
            let xr = &x[(bi * t + i) * d..(bi * t + i + 1) * d];
            for j in 0..s {
                let wv = w[(bi * t + i) * s + j];
                for (o, &xv) in o[j * d..(j + 1) * d].iter_mut().zip(xr) {
                    *o += wv * xv;
                }
            }
        }
    });
    out
}

pub(crate) fn soft_moe_dispatch_fwd(dispatch: &Tensor, xn: &Tensor) -> Result<Tensor> {
    const OP: &str = "soft_moe_dispatch_fwd";
    check_cpu(OP, &[dispatch, xn])?;
    let m = mix_dims(OP, dispatch, xn, true)?;
    let dt = same_dtype(OP, &[dispatch, xn])?;
    with_float!(OP, dt, T => {
        let (wg, xg) = (dispatch.cpu_read()?, xn.cpu_read()?);
        let out = tokens_to_slots(slice::<T>(OP, &wg)?, slice::<T>(OP, &xg)?, m);
        Tensor::from_vec(out, &[m.b, m.s, m.d])
    })
}

/// With `out`: `out[tok, c] += Σ_j w[tok, j] · y[b, j, c]`; with `dw`: `dw[tok, j] += Σ_c
/// a[tok, c] · y[b, j, c]`. The token side of both mixes (the combine forward into zeros, and
/// the backward of each).
fn slots_to_tokens<T: super::Float>(
    w: &[T],
    y: &[T],
    m: MoeDims,
    out: Option<&mut [T]>,
    dw: Option<(&[T], &mut [T])>,
) {
    let MoeDims { t, d, s, .. } = m;
    let slots = |tok: usize| &y[(tok / t) * s * d..(tok / t + 1) * s * d];
    if let Some(out) = out {
        out.par_chunks_mut(d).enumerate().for_each(|(tok, o)| {
            let (yb, wr) = (slots(tok), &w[tok * s..(tok + 1) * s]);
            for (c, o) in o.iter_mut().enumerate() {
                *o += wr.iter().enumerate().map(|(j, &wv)| wv * yb[j * d + c]).sum::<T>();
            }
        });
    }
    if let Some((a, dw)) = dw {
        dw.par_chunks_mut(s).enumerate().for_each(|(tok, g)| {
            let (yb, ar) = (slots(tok), &a[tok * d..(tok + 1) * d]);
            for (j, g) in g.iter_mut().enumerate() {
                *g += ar.iter().zip(&yb[j * d..(j + 1) * d]).map(|(&p, &q)| p * q).sum::<T>();
            }
        });
    }
}

pub(crate) fn soft_moe_dispatch_bwd(
    dispatch: &Tensor,
    xn: &Tensor,
    d_slots: &Tensor,
    d_dispatch: &Tensor,
    d_xn: &Tensor,
) -> Result<()> {
    const OP: &str = "soft_moe_dispatch_bwd";
    check_cpu(OP, &[dispatch, xn, d_slots, d_dispatch, d_xn])?;
    distinct(OP, &[d_dispatch, d_xn], &[dispatch, xn, d_slots])?;
    let m = mix_dims(OP, dispatch, xn, true)?;
    mix_dims(OP, dispatch, d_slots, false)?;
    same_shape(OP, dispatch, d_dispatch)?;
    same_shape(OP, xn, d_xn)?;
    let dt = same_dtype(OP, &[dispatch, xn, d_slots, d_dispatch, d_xn])?;
    with_float!(OP, dt, T => {
        let (wg, xg, yg) = (dispatch.cpu_read()?, xn.cpu_read()?, d_slots.cpu_read()?);
        let (mut dwg, mut dxg) = (d_dispatch.cpu_write()?, d_xn.cpu_write()?);
        slots_to_tokens(
            slice::<T>(OP, &wg)?,
            slice::<T>(OP, &yg)?,
            m,
            Some(slice_mut::<T>(OP, &mut dxg)?),
            Some((slice::<T>(OP, &xg)?, slice_mut::<T>(OP, &mut dwg)?)),
        );
        Ok(())
    })
}

pub(crate) fn soft_moe_combine_fwd(combine: &Tensor, ys: &Tensor) -> Result<Tensor> {
    const OP: &str = "soft_moe_combine_fwd";
    check_cpu(OP, &[combine, ys])?;
    let m = mix_dims(OP, combine, ys, false)?;
    let dt = same_dtype(OP, &[combine, ys])?;
    with_float!(OP, dt, T => {
        let (wg, yg) = (combine.cpu_read()?, ys.cpu_read()?);
        let mut out = vec![T::zero(); m.b * m.t * m.d];
        slots_to_tokens(slice::<T>(OP, &wg)?, slice::<T>(OP, &yg)?, m, Some(&mut out), None);
        Tensor::from_vec(out, &[m.b, m.t, m.d])
    })
}

pub(crate) fn soft_moe_combine_bwd(
    combine: &Tensor,
    ys: &Tensor,
    dy: &Tensor,
    d_combine: &Tensor,
    d_ys: &Tensor,
) -> Result<()> {
    const OP: &str = "soft_moe_combine_bwd";
    check_cpu(OP, &[combine, ys, dy, d_combine, d_ys])?;
    distinct(OP, &[d_combine, d_ys], &[combine, ys, dy])?;
    let m = mix_dims(OP, combine, ys, false)?;
    mix_dims(OP, combine, dy, true)?;
    same_shape(OP, combine, d_combine)?;
    same_shape(OP, ys, d_ys)?;
    let dt = same_dtype(OP, &[combine, ys, dy, d_combine, d_ys])?;
    with_float!(OP, dt, T => {
        let (wg, yg, gg) = (combine.cpu_read()?, ys.cpu_read()?, dy.cpu_read()?);
        let (w, y, g) = (slice::<T>(OP, &wg)?, slice::<T>(OP, &yg)?, slice::<T>(OP, &gg)?);
        let mut dwg = d_combine.cpu_write()?;
        slots_to_tokens(w, y, m, None, Some((g, slice_mut::<T>(OP, &mut dwg)?)));
        let sum = tokens_to_slots(w, g, m);
        let mut dyg = d_ys.cpu_write()?;
        for (o, v) in slice_mut::<T>(OP, &mut dyg)?.iter_mut().zip(sum) {
            *o += v;
        }
        Ok(())
    })
}
