//! The E double-SwiGLU ("senet") experts of the soft MoE, all in one op (DESIGN §1). Expert e
//! maps its rows `x[e] [R, d]`:
//!
//! ```text
//! a1 = x W_gate_upᵀ   b1 = x W_upᵀ     u = silu(a1) ⊙ b1        (d → f)
//! a2 = u W_gate_downᵀ b2 = u W_downᵀ   y = silu(a2) ⊙ b2        (f → d)
//! ```
//!
//! Backward, with `silu'(a) = σ(a) (1 + a (1 − σ(a)))`:
//!
//! ```text
//! da2 = dy ⊙ b2 ⊙ silu'(a2)   db2 = dy ⊙ silu(a2)
//! du  = da2 W_gate_down + db2 W_down      dW_gate_down += da2ᵀ u    dW_down += db2ᵀ u
//! da1 = du ⊙ b1 ⊙ silu'(a1)   db1 = du ⊙ silu(a1)
//! dx += da1 W_gate_up + db1 W_up          dW_gate_up += da1ᵀ x      dW_up += db1ᵀ x
//! ```
//!
//! Every sum runs in a fixed order (rows in order, the reduced axis in order). With BF16 values
//! (through the backend's widening) the core computes in f32 and rounds `u` to bf16 before the
//! second stage reads it, as the GPU kernel stores it.

use super::{check_cpu, distinct, same_shape, slice, slice_mut, with_float};
use crate::backend::{ExpertWeights, ExpertsOut};
use crate::{Error, Result, Tensor};
use rayon::prelude::*;

/// The sizes of an experts call: `e` experts of `r` rows, width `d`, inner width `f`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ExpertDims {
    pub e: usize,
    pub r: usize,
    pub d: usize,
    pub f: usize,
}

/// The shapes of `x [E, R, d]` and the weights (each slice E tensors; `gate_up`, `up` `[f, d]`,
/// `gate_down`, `down` `[d, f]`), shared with the GPU launchers.
pub(crate) fn experts_dims(
    op: &'static str,
    x: &Tensor,
    w: ExpertWeights<'_>,
) -> Result<ExpertDims> {
    let &[e, r, d] = x.shape() else {
        return Err(Error::shape(
            op,
            format!("x must be [experts, rows, hidden], got {:?}", x.shape()),
        ));
    };
    let lens = [w.gate_up.len(), w.up.len(), w.gate_down.len(), w.down.len()];
    if lens.iter().any(|&n| n != e) {
        return Err(Error::shape(
            op,
            format!("x has {e} experts but the weight lists hold {lens:?} tensors"),
        ));
    }
    if e == 0 || d == 0 {
        return Err(Error::shape(
            op,
            format!("x {:?} needs at least one expert and a non-empty hidden axis", x.shape()),
        ));
    }
    let f = match w.gate_up[0].shape() {
        &[f, d2] if d2 == d && f > 0 => f,
        s => return Err(Error::shape(op, format!("gate_up[0] {s:?} is not [inner, {d}]"))),
    };
    for i in 0..e {
        for (name, t, want) in [
            ("gate_up", &w.gate_up[i], [f, d]),
            ("up", &w.up[i], [f, d]),
            ("gate_down", &w.gate_down[i], [d, f]),
            ("down", &w.down[i], [d, f]),
        ] {
            if t.shape() != want {
                return Err(Error::shape(
                    op,
                    format!("{name}[{i}] {:?} is not {want:?}", t.shape()),
                ));
            }
        }
    }
    Ok(ExpertDims { e, r, d, f })
}

/// The shapes of the saved activations of `experts_fwd` for `m`.
pub(crate) fn saved_dims(op: &'static str, s: &ExpertsOut, m: ExpertDims) -> Result<()> {
    let (inner, outer) = ([m.e, m.r, m.f], [m.e, m.r, m.d]);
    for (name, t, want) in [
        ("y", &s.y, outer),
        ("a1", &s.a1, inner),
        ("b1", &s.b1, inner),
        ("u", &s.u, inner),
        ("a2", &s.a2, outer),
        ("b2", &s.b2, outer),
    ] {
        if t.shape() != want {
            return Err(Error::shape(op, format!("saved {name} {:?} is not {want:?}", t.shape())));
        }
    }
    Ok(())
}

/// The operands of `experts_bwd` for both backends' checks: `(inputs, outputs)` — x, dy, the
/// saved activations and the weights; dx and the weight gradients.
pub(crate) fn bwd_operands<'a>(
    x: &'a Tensor,
    w: &ExpertWeights<'a>,
    saved: &'a ExpertsOut,
    dy: &'a Tensor,
    dx: &'a Tensor,
    dw: &ExpertWeights<'a>,
) -> (Vec<&'a Tensor>, Vec<&'a Tensor>) {
    let mut ins = vec![x, dy, &saved.y, &saved.a1, &saved.b1, &saved.u, &saved.a2, &saved.b2];
    ins.extend(all_weights(w));
    let mut outs = vec![dx];
    outs.extend(all_weights(dw));
    (ins, outs)
}

/// The shapes of `experts_bwd` (both backends): x and the weights as `experts_dims`, the saved
/// activations of that call, dy and dx like x, the gradients like the weights, and no output
/// sharing storage with any operand.
pub(crate) fn bwd_dims(
    op: &'static str,
    x: &Tensor,
    w: ExpertWeights<'_>,
    saved: &ExpertsOut,
    dy: &Tensor,
    dx: &Tensor,
    dw: ExpertWeights<'_>,
) -> Result<ExpertDims> {
    let m = experts_dims(op, x, w)?;
    experts_dims(op, dx, dw)?;
    saved_dims(op, saved, m)?;
    same_shape(op, x, dy)?;
    same_shape(op, x, dx)?;
    let (ins, outs) = bwd_operands(x, &w, saved, dy, dx, &dw);
    distinct(op, &outs, &ins)?;
    Ok(m)
}

/// Every tensor of the weight lists, in the order gate_up, up, gate_down, down.
pub(crate) fn all_weights<'a>(w: &ExpertWeights<'a>) -> Vec<&'a Tensor> {
    w.gate_up.iter().chain(w.up).chain(w.gate_down).chain(w.down).collect()
}

#[inline]
fn sigmoid<T: super::Float>(a: T) -> T {
    T::one() / (T::one() + (-a).exp())
}

/// `x` rounded to bf16 and back (the storage of a BF16 intermediate).
fn round_bf16<T: super::Float>(x: T) -> T {
    T::from_f64(half::bf16::from_f64(x.to_f64().unwrap_or(f64::NAN)).to_f64())
}

/// The four weight lists' slices of expert `i`: `[gate_up, up, gate_down, down]`.
fn expert<'a, T>(ws: &'a [&'a [T]], e: usize, i: usize) -> [&'a [T]; 4] {
    [ws[i], ws[e + i], ws[2 * e + i], ws[3 * e + i]]
}

/// The forward. `bf16_inner`: round `u` to bf16 before the second stage (BF16 values).
pub(crate) fn experts_fwd(
    x: &Tensor,
    w: ExpertWeights<'_>,
    bf16_inner: bool,
) -> Result<ExpertsOut> {
    const OP: &str = "experts_fwd";
    let weights = all_weights(&w);
    check_cpu(OP, &[x])?;
    check_cpu(OP, &weights)?;
    let m = experts_dims(OP, x, w)?;
    let ExpertDims { e, r, d, f } = m;
    let dt = x.dtype();
    if let Some(t) = weights.iter().find(|t| t.dtype() != dt) {
        return Err(Error::dtype(OP, t.dtype(), format!("the expert weights must be {dt}, as x")));
    }
    with_float!(OP, dt, T => {
        let xg = x.cpu_read()?;
        let xs = slice::<T>(OP, &xg)?;
        let guards: Vec<_> = weights.iter().map(|t| t.cpu_read()).collect::<Result<_>>()?;
        let ws: Vec<&[T]> = guards.iter().map(|g| slice::<T>(OP, g)).collect::<Result<_>>()?;
        let rows = e * r;
        let (mut a1, mut b1, mut u) = (vec![T::zero(); rows * f], vec![T::zero(); rows * f], vec![T::zero(); rows * f]);
        let (mut a2, mut b2, mut y) = (vec![T::zero(); rows * d], vec![T::zero(); rows * d], vec![T::zero(); rows * d]);
        a1.par_chunks_mut(f.max(1))
            .zip(b1.par_chunks_mut(f.max(1)))
            .zip(u.par_chunks_mut(f.max(1)))
            .zip(a2.par_chunks_mut(d).zip(b2.par_chunks_mut(d)).zip(y.par_chunks_mut(d)))
            .enumerate()
            .for_each(|(row, (((a1, b1), u), ((a2, b2), y)))| {
                let [gu, up, gd, dn] = expert(&ws, e, row / r.max(1));
                let xr = &xs[row * d..(row + 1) * d];
                for j in 0..f {
                    let wa = &gu[j * d..(j + 1) * d];
                    let wb = &up[j * d..(j + 1) * d];
                    a1[j] = xr.iter().zip(wa).map(|(&p, &q)| p * q).sum();
                    b1[j] = xr.iter().zip(wb).map(|(&p, &q)| p * q).sum();
                    let v = a1[j] * sigmoid(a1[j]) * b1[j];
                    u[j] = if bf16_inner { round_bf16(v) } else { v };
                }
                for c in 0..d {
                    let wa = &gd[c * f..(c + 1) * f];
                    let wb = &dn[c * f..(c + 1) * f];
                    a2[c] = u.iter().zip(wa).map(|(&p, &q)| p * q).sum();
                    b2[c] = u.iter().zip(wb).map(|(&p, &q)| p * q).sum();
                    y[c] = a2[c] * sigmoid(a2[c]) * b2[c];
                }
            });
        let (inner, outer) = ([e, r, f], [e, r, d]);
        Ok(ExpertsOut {
            y: Tensor::from_vec(y, &outer)?,
            a1: Tensor::from_vec(a1, &inner)?,
            b1: Tensor::from_vec(b1, &inner)?,
            u: Tensor::from_vec(u, &inner)?,
            a2: Tensor::from_vec(a2, &outer)?,
            b2: Tensor::from_vec(b2, &outer)?,
        })
    })
}

/// `(g_gate, g_up)` of a SwiGLU `silu(a) ⊙ b` at upstream gradient `g`.
#[inline]
fn swiglu_grads<T: super::Float>(a: T, b: T, g: T) -> (T, T) {
    let s = sigmoid(a);
    (g * b * s * (T::one() + a * (T::one() - s)), g * a * s)
}

/// The backward (F32 or F64 throughout: the backend widens BF16 values first).
pub(crate) fn experts_bwd(
    x: &Tensor,
    w: ExpertWeights<'_>,
    saved: &ExpertsOut,
    dy: &Tensor,
    dx: &Tensor,
    dw: ExpertWeights<'_>,
) -> Result<()> {
    const OP: &str = "experts_bwd";
    let (ins, outs) = bwd_operands(x, &w, saved, dy, dx, &dw);
    check_cpu(OP, &ins)?;
    check_cpu(OP, &outs)?;
    let m = bwd_dims(OP, x, w, saved, dy, dx, dw)?;
    let ExpertDims { e, r, d, f } = m;
    let dt = x.dtype();
    for t in ins.iter().chain(&outs) {
        if t.dtype() != dt {
            return Err(Error::dtype(
                OP,
                t.dtype(),
                format!("every operand must be {dt} here (the backend widens BF16 values)"),
            ));
        }
    }
    with_float!(OP, dt, T => {
        let (xg, gg) = (x.cpu_read()?, dy.cpu_read()?);
        let (xs, gs) = (slice::<T>(OP, &xg)?, slice::<T>(OP, &gg)?);
        let acts = [&saved.a1, &saved.b1, &saved.u, &saved.a2, &saved.b2];
        let ag: Vec<_> = acts.iter().map(|t| t.cpu_read()).collect::<Result<_>>()?;
        let av: Vec<&[T]> = ag.iter().map(|g| slice::<T>(OP, g)).collect::<Result<_>>()?;
        let (a1, b1, u, a2, b2) = (av[0], av[1], av[2], av[3], av[4]);
        let wg: Vec<_> = all_weights(&w).iter().map(|t| t.cpu_read()).collect::<Result<_>>()?;
        let ws: Vec<&[T]> = wg.iter().map(|g| slice::<T>(OP, g)).collect::<Result<_>>()?;
        let mut dgs: Vec<_> = outs[1..].iter().map(|t| t.cpu_write()).collect::<Result<_>>()?;
        let mut dws: Vec<&mut [T]> = dgs.iter_mut().map(|g| slice_mut::<T>(OP, g)).collect::<Result<_>>()?;
        let mut dxg = dx.cpu_write()?;
        let dxs = slice_mut::<T>(OP, &mut dxg)?;
        // Regroup the gradient buffers by expert: [gate_up, up, gate_down, down] each.
        let mut by_expert: Vec<Vec<&mut [T]>> = (0..e).map(|_| Vec::with_capacity(4)).collect();
        for (k, g) in dws.drain(..).enumerate() {
            by_expert[k % e].push(g);
        }
        by_expert.into_par_iter().zip(dxs.par_chunks_mut((r * d).max(1))).enumerate().for_each(|(i, (mut g, dx))| {
            let [gu, up, gd, dn] = expert(&ws, e, i);
            let row0 = i * r;
            let (mut da2, mut db2) = (vec![T::zero(); r * d], vec![T::zero(); r * d]);
            for k in 0..r * d {
                let q = row0 * d + k;
                (da2[k], db2[k]) = swiglu_grads(a2[q], b2[q], gs[q]);
            }
            let (mut da1, mut db1) = (vec![T::zero(); r * f], vec![T::zero(); r * f]);
            for ri in 0..r {
                for j in 0..f {
                    let du: T = (0..d).map(|c| da2[ri * d + c] * gd[c * f + j] + db2[ri * d + c] * dn[c * f + j]).sum();
                    let q = (row0 + ri) * f + j;
                    (da1[ri * f + j], db1[ri * f + j]) = swiglu_grads(a1[q], b1[q], du);
                }
            }
            let (dgu, rest) = g.split_at_mut(1);
            let (dup, rest) = rest.split_at_mut(1);
            let (dgd, ddn) = rest.split_at_mut(1);
            let (dgu, dup, dgd, ddn) = (&mut *dgu[0], &mut *dup[0], &mut *dgd[0], &mut *ddn[0]);
            for c in 0..d {
                for j in 0..f {
                    let uu = |ri: usize| u[(row0 + ri) * f + j];
                    dgd[c * f + j] += (0..r).map(|ri| da2[ri * d + c] * uu(ri)).sum::<T>();
                    ddn[c * f + j] += (0..r).map(|ri| db2[ri * d + c] * uu(ri)).sum::<T>();
                }
            }
            for j in 0..f {
                for c in 0..d {
                    let xx = |ri: usize| xs[(row0 + ri) * d + c];
                    dgu[j * d + c] += (0..r).map(|ri| da1[ri * f + j] * xx(ri)).sum::<T>();
                    dup[j * d + c] += (0..r).map(|ri| db1[ri * f + j] * xx(ri)).sum::<T>();
                }
            }
            for ri in 0..r {
                for c in 0..d {
                    dx[ri * d + c] += (0..f).map(|j| da1[ri * f + j] * gu[j * d + c] + db1[ri * f + j] * up[j * d + c]).sum::<T>();
                }
            }
        });
        Ok(())
    })
}
