//! Causal scaled-dot-product attention on `[B, T, heads, D]` tensors, MHA and GQA, with
//! `Tq ≤ Tk` for KV-cache decoding: query i is at position `Tk − Tq + i` and sees keys
//! `0 ..= Tk − Tq + i`. Query head h reads KV head `h / (Hq / Hkv)`.
//!
//! Forward per (batch, query head): `S = scale · Q Kᵀ`, `lse_i = log Σ_j exp(S_ij)` over the
//! visible keys, `P = exp(S − lse)`, `O = P V`.
//! Backward per (batch, KV head), its query heads in order (so dK and dV accumulate in a fixed
//! order): `dV += Pᵀ dO`, `dP = dO Vᵀ`, `δ_i = Σ_d dO_id O_id`, `dS = P ⊙ (dP − δ)`,
//! `dQ += scale · dS K`, `dK += scale · dSᵀ Q`.

use super::gemm::{gemm_serial, MatMut, MatRef};
use super::{
    check_cpu, distinct, same_dtype, same_shape, slice, slice_mut, with_float, Float, SendPtr,
};
use crate::{Error, Result, Tensor};
use rayon::prelude::*;

/// The shapes of an attention call (shared with the GPU launchers).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub tq: usize,
    pub tk: usize,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
}

/// Checks the shapes of `q`, `k`, `v` against each other (the `Backend` contract).
pub(crate) fn dims(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Dims> {
    let (&[b, tq, hq, d], &[b2, tk, hkv, d2]) = (q.shape(), k.shape()) else {
        return Err(Error::shape(
            op,
            format!(
                "q and k must be [batch, seq, heads, head_dim], got {:?} and {:?}",
                q.shape(),
                k.shape()
            ),
        ));
    };
    same_shape(op, k, v)?;
    if b != b2 || d != d2 || tq > tk || hkv == 0 || hq % hkv != 0 {
        return Err(Error::shape(
            op,
            format!("q {:?} does not fit k/v {:?} (same batch and head_dim, Tq ≤ Tk, KV heads dividing query heads)", q.shape(), k.shape()),
        ));
    }
    Ok(Dims { b, tq, tk, hq, hkv, d })
}

/// The shapes of a backward call `[q, k, v, o, lse, d_o, dq, dk, dv]`: `dims` of q, k, v, then o,
/// d_o and dq like q, dk and dv like k, lse `[B, Hq, Tq]` (both backends).
pub(crate) fn bwd_dims(op: &'static str, t: [&Tensor; 9]) -> Result<Dims> {
    let [q, k, v, o, lse, d_o, dq, dk, dv] = t;
    let dm = dims(op, q, k, v)?;
    for (a, like) in [(o, q), (d_o, q), (dq, q), (dk, k), (dv, v)] {
        same_shape(op, like, a)?;
    }
    let Dims { b, hq, tq, .. } = dm;
    if lse.shape() != [b, hq, tq] {
        return Err(Error::shape(
            op,
            format!("lse must be [{b}, {hq}, {tq}], got {:?}", lse.shape()),
        ));
    }
    Ok(dm)
}

/// `S = scale · Q_h K_gᵀ` into `s [Tq, Tk]`, then `P = exp(S − lse)` on visible keys (0 elsewhere).
/// With `lse = None` the row statistics are computed and returned.
///
/// # Safety
/// `q` and `k` must point at the (b, h) / (b, g) head of valid tensors of dims `dm`.
unsafe fn probabilities<T: Float>(
    dm: Dims,
    q: *const T,
    k: *const T,
    scale: T,
    s: &mut [T],
    lse: Option<&[T]>,
) -> Vec<T> {
    let Dims { tq, tk, hq, hkv, d, .. } = dm;
    gemm_serial(
        tq,
        tk,
        d,
        scale,
        MatRef { ptr: q, rs: (hq * d) as isize, cs: 1 },
        MatRef { ptr: k, rs: 1, cs: (hkv * d) as isize },
        T::zero(),
        MatMut { ptr: s.as_mut_ptr(), rs: tk as isize, cs: 1 },
    );
    let off = tk - tq;
    let mut out = Vec::with_capacity(tq);
    for i in 0..tq {
        let row = &mut s[i * tk..(i + 1) * tk];
        let visible = off + i + 1;
        let l = match lse {
            Some(l) => l[i],
            None => {
                let m = row[..visible].iter().copied().fold(T::neg_infinity(), T::max);
                let sum =
                    row[..visible].iter().map(|&x| (x - m).exp()).fold(T::zero(), |a, b| a + b);
                m + sum.ln()
            }
        };
        for x in &mut row[..visible] {
            *x = (*x - l).exp();
        }
        row[visible..].iter_mut().for_each(|x| *x = T::zero());
        out.push(l);
    }
    out
}

pub(crate) fn attention_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "attention_fwd";
    check_cpu(OP, &[q, k, v])?;
    let dm = dims(OP, q, k, v)?;
    let dt = same_dtype(OP, &[q, k, v])?;
    let Dims { b, tq, tk, hq, hkv, d } = dm;
    let rep = hq / hkv;
    with_float!(OP, dt, T => {
        let (qg, kg, vg) = (q.cpu_read()?, k.cpu_read()?, v.cpu_read()?);
        let (qs, ks, vs) = (slice::<T>(OP, &qg)?, slice::<T>(OP, &kg)?, slice::<T>(OP, &vg)?);
        let mut o = vec![T::zero(); q.numel()];
        let mut lse = vec![T::zero(); b * hq * tq];
        let op = SendPtr(o.as_mut_ptr());
        let sc = T::from_f64(scale);
        lse.par_chunks_mut(tq.max(1)).enumerate().for_each(|(bh, lse_row)| {
            let (bi, h) = (bh / hq, bh % hq);
            let g = h / rep;
            let mut s = vec![T::zero(); tq * tk];
            // SAFETY: offsets stay inside q/k/v/o (dims checked); task (bi, h) writes only the
            // h-th head of batch bi of `o`, so tasks write disjoint elements.
            unsafe {
                let qh = qs.as_ptr().add(bi * tq * hq * d + h * d);
                let kh = ks.as_ptr().add(bi * tk * hkv * d + g * d);
                let vh = vs.as_ptr().add(bi * tk * hkv * d + g * d);
                let stats = probabilities(dm, qh, kh, sc, &mut s, None);
                lse_row.copy_from_slice(&stats);
                gemm_serial(
                    tq,
                    d,
                    tk,
                    T::one(),
                    MatRef { ptr: s.as_ptr(), rs: tk as isize, cs: 1 },
                    MatRef { ptr: vh, rs: (hkv * d) as isize, cs: 1 },
                    T::zero(),
                    MatMut { ptr: op.get().add(bi * tq * hq * d + h * d), rs: (hq * d) as isize, cs: 1 },
                );
            }
        });
        Ok((Tensor::from_vec(o, q.shape())?, Tensor::from_vec(lse, &[b, hq, tq])?))
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_bwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    scale: f64,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
) -> Result<()> {
    const OP: &str = "attention_bwd";
    check_cpu(OP, &[q, k, v, o, lse, d_o, dq, dk, dv])?;
    distinct(OP, &[dq, dk, dv], &[q, k, v, o, lse, d_o])?;
    let dm = bwd_dims(OP, [q, k, v, o, lse, d_o, dq, dk, dv])?;
    let Dims { b, tq, tk, hq, hkv, d } = dm;
    let dt = same_dtype(OP, &[q, k, v, o, lse, d_o, dq, dk, dv])?;
    let rep = hq / hkv;
    with_float!(OP, dt, T => {
        let (qg, kg, vg, og, lg, gg) = (q.cpu_read()?, k.cpu_read()?, v.cpu_read()?, o.cpu_read()?, lse.cpu_read()?, d_o.cpu_read()?);
        let (qs, ks, vs) = (slice::<T>(OP, &qg)?, slice::<T>(OP, &kg)?, slice::<T>(OP, &vg)?);
        let (os, ls, gs) = (slice::<T>(OP, &og)?, slice::<T>(OP, &lg)?, slice::<T>(OP, &gg)?);
        let (mut dqg, mut dkg, mut dvg) = (dq.cpu_write()?, dk.cpu_write()?, dv.cpu_write()?);
        let dqp = SendPtr(slice_mut::<T>(OP, &mut dqg)?.as_mut_ptr());
        let dkp = SendPtr(slice_mut::<T>(OP, &mut dkg)?.as_mut_ptr());
        let dvp = SendPtr(slice_mut::<T>(OP, &mut dvg)?.as_mut_ptr());
        let sc = T::from_f64(scale);
        (0..b * hkv).into_par_iter().for_each(|bg| {
            let (bi, g) = (bg / hkv, bg % hkv);
            let mut p = vec![T::zero(); tq * tk];
            let mut dp = vec![T::zero(); tq * tk];
            let kv_off = bi * tk * hkv * d + g * d;
            let kv_rs = (hkv * d) as isize;
            let q_rs = (hq * d) as isize;
            for h in g * rep..(g + 1) * rep {
                let q_off = bi * tq * hq * d + h * d;
                let lse_row = &ls[(bi * hq + h) * tq..(bi * hq + h + 1) * tq];
                // SAFETY: offsets stay inside the tensors (dims checked). Task (bi, g) writes
                // dq only for its own query heads and dk/dv only for KV head g of batch bi, so
                // tasks write disjoint elements; p and dp are task-local.
                unsafe {
                    probabilities(dm, qs.as_ptr().add(q_off), ks.as_ptr().add(kv_off), sc, &mut p, Some(lse_row));
                    // dV += Pᵀ dO
                    gemm_serial(
                        tk,
                        d,
                        tq,
                        T::one(),
                        MatRef { ptr: p.as_ptr(), rs: 1, cs: tk as isize },
                        MatRef { ptr: gs.as_ptr().add(q_off), rs: q_rs, cs: 1 },
                        T::one(),
                        MatMut { ptr: dvp.get().add(kv_off), rs: kv_rs, cs: 1 },
                    );
                    // dP = dO Vᵀ
                    gemm_serial(
                        tq,
                        tk,
                        d,
                        T::one(),
                        MatRef { ptr: gs.as_ptr().add(q_off), rs: q_rs, cs: 1 },
                        MatRef { ptr: vs.as_ptr().add(kv_off), rs: 1, cs: kv_rs },
                        T::zero(),
                        MatMut { ptr: dp.as_mut_ptr(), rs: tk as isize, cs: 1 },
                    );
                    // dS = P ⊙ (dP − δ), in place in dp.
                    for i in 0..tq {
                        let base = q_off + i * hq * d;
                        let delta = (0..d).map(|c| gs[base + c] * os[base + c]).fold(T::zero(), |a, b| a + b);
                        for j in 0..tk {
                            let idx = i * tk + j;
                            dp[idx] = p[idx] * (dp[idx] - delta);
                        }
                    }
                    // dQ += scale · dS K
                    gemm_serial(
                        tq,
                        d,
                        tk,
                        sc,
                        MatRef { ptr: dp.as_ptr(), rs: tk as isize, cs: 1 },
                        MatRef { ptr: ks.as_ptr().add(kv_off), rs: kv_rs, cs: 1 },
                        T::one(),
                        MatMut { ptr: dqp.get().add(q_off), rs: q_rs, cs: 1 },
                    );
                    // dK += scale · dSᵀ Q
                    gemm_serial(
                        tk,
                        d,
                        tq,
                        sc,
                        MatRef { ptr: dp.as_ptr(), rs: 1, cs: tk as isize },
                        MatRef { ptr: qs.as_ptr().add(q_off), rs: q_rs, cs: 1 },
                        T::one(),
                        MatMut { ptr: dkp.get().add(kv_off), rs: kv_rs, cs: 1 },
                    );
                }
            }
        });
        Ok(())
    })
}
