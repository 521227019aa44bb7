//! Elementwise ops: fill, cast, add, add_assign, scale, scale_by (learned scalar), swiglu.

use super::{
    check_cpu, distinct, same_dtype, same_shape, slice, slice_mut, with_any, with_float, Float,
    ELEM_CHUNK,
};
use crate::{CpuStorage, DType, Element, Error, Result, Tensor};
use rayon::prelude::*;

pub(crate) fn fill(t: &Tensor, value: f64) -> Result<()> {
    check_cpu("fill", &[t])?;
    let mut g = t.cpu_write()?;
    with_any!(t.dtype(), T => {
        let v = T::from_f64(value);
        slice_mut::<T>("fill", &mut g)?.par_chunks_mut(ELEM_CHUNK).for_each(|c| c.fill(v));
    });
    Ok(())
}

/// Converts every element; float→float rounds to nearest even, float→int truncates.
pub(crate) fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    check_cpu("cast", &[t])?;
    let g = t.cpu_read()?;
    fn conv<S: Element, D: Element>(src: &[S]) -> Vec<D> {
        src.par_iter().with_min_len(ELEM_CHUNK).map(|&x| D::from_f64(x.as_f64())).collect()
    }
    let storage = match (&*g, dtype) {
        // f32 → bf16 directly (identical to going through f64, but cheaper).
        (CpuStorage::F32(v), DType::BF16) => CpuStorage::BF16(
            v.par_iter().with_min_len(ELEM_CHUNK).map(|&x| half::bf16::from_f32(x)).collect(),
        ),
        (CpuStorage::BF16(v), DType::F32) => {
            CpuStorage::F32(v.par_iter().with_min_len(ELEM_CHUNK).map(|x| x.to_f32()).collect())
        }
        (src, dst) => with_any!(src.dtype(), S => {
            let s = slice::<S>("cast", src)?;
            with_any!(dst, D => CpuStorage::from_vec(conv::<S, D>(s)))
        }),
    };
    Tensor::from_cpu_storage(storage, t.shape())
}

/// Applies `f(out_chunk, a_chunk, b_chunk)` over aligned fixed-size chunks.
fn zip2<T: Float>(out: &mut [T], a: &[T], b: &[T], f: impl Fn(&mut T, T, T) + Sync) {
    out.par_chunks_mut(ELEM_CHUNK)
        .zip(a.par_chunks(ELEM_CHUNK))
        .zip(b.par_chunks(ELEM_CHUNK))
        .for_each(|((o, a), b)| o.iter_mut().zip(a).zip(b).for_each(|((o, &a), &b)| f(o, a, b)));
}

pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "add";
    check_cpu(OP, &[a, b])?;
    same_shape(OP, a, b)?;
    let dt = same_dtype(OP, &[a, b])?;
    with_float!(OP, dt, T => {
        let (ag, bg) = (a.cpu_read()?, b.cpu_read()?);
        let mut out = vec![T::zero(); a.numel()];
        zip2(&mut out, slice::<T>(OP, &ag)?, slice::<T>(OP, &bg)?, |o, x, y| *o = x + y);
        Tensor::from_vec(out, a.shape())
    })
}

pub(crate) fn add_assign(dst: &Tensor, src: &Tensor) -> Result<()> {
    const OP: &str = "add_assign";
    check_cpu(OP, &[dst, src])?;
    distinct(OP, &[dst], &[src])?;
    if dst.numel() != src.numel() {
        return Err(Error::shape(OP, format!("{:?} += {:?}", dst.shape(), src.shape())));
    }
    let dt = same_dtype(OP, &[dst, src])?;
    with_float!(OP, dt, T => {
        let sg = src.cpu_read()?;
        let s = slice::<T>(OP, &sg)?;
        let mut dg = dst.cpu_write()?;
        slice_mut::<T>(OP, &mut dg)?
            .par_chunks_mut(ELEM_CHUNK)
            .zip(s.par_chunks(ELEM_CHUNK))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d += s));
        Ok(())
    })
}

fn map1<T: Float>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    x.par_iter().with_min_len(ELEM_CHUNK).map(|&v| f(v)).collect()
}

pub(crate) fn scale(x: &Tensor, alpha: f64) -> Result<Tensor> {
    const OP: &str = "scale";
    check_cpu(OP, &[x])?;
    with_float!(OP, x.dtype(), T => {
        let g = x.cpu_read()?;
        let a = T::from_f64(alpha);
        Tensor::from_vec(map1(slice::<T>(OP, &g)?, |v| v * a), x.shape())
    })
}

fn scalar_of<T: Float>(op: &'static str, s: &Tensor) -> Result<T> {
    if s.numel() != 1 {
        return Err(Error::shape(
            op,
            format!("the scale must have one element, got {:?}", s.shape()),
        ));
    }
    let g = s.cpu_read()?;
    Ok(slice::<T>(op, &g)?[0])
}

pub(crate) fn scale_by_fwd(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    const OP: &str = "scale_by_fwd";
    check_cpu(OP, &[x, s])?;
    let dt = same_dtype(OP, &[x, s])?;
    with_float!(OP, dt, T => {
        let a = scalar_of::<T>(OP, s)?;
        let g = x.cpu_read()?;
        Tensor::from_vec(map1(slice::<T>(OP, &g)?, |v| v * a), x.shape())
    })
}

pub(crate) fn scale_by_bwd(
    x: &Tensor,
    s: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
    ds: &Tensor,
) -> Result<()> {
    const OP: &str = "scale_by_bwd";
    check_cpu(OP, &[x, s, dy, dx, ds])?;
    distinct(OP, &[dx, ds], &[x, s, dy])?;
    same_shape(OP, x, dy)?;
    same_shape(OP, x, dx)?;
    if ds.numel() != 1 {
        return Err(Error::shape(OP, format!("ds must have one element, got {:?}", ds.shape())));
    }
    let dt = same_dtype(OP, &[x, s, dy, dx, ds])?;
    with_float!(OP, dt, T => {
        let a = scalar_of::<T>(OP, s)?;
        let (xg, dyg) = (x.cpu_read()?, dy.cpu_read()?);
        let (xs, dys) = (slice::<T>(OP, &xg)?, slice::<T>(OP, &dyg)?);
        {
            let mut dxg = dx.cpu_write()?;
            zip2(slice_mut::<T>(OP, &mut dxg)?, dys, dys, |d, g, _| *d += a * g);
        }
        // Σ x·dy in f64, fixed chunks combined in order.
        let partials: Vec<f64> = xs
            .par_chunks(ELEM_CHUNK)
            .zip(dys.par_chunks(ELEM_CHUNK))
            .map(|(x, g)| x.iter().zip(g).map(|(&x, &g)| x.as_f64() * g.as_f64()).sum::<f64>())
            .collect();
        let total: f64 = partials.iter().sum();
        let mut dsg = ds.cpu_write()?;
        slice_mut::<T>(OP, &mut dsg)?[0] += T::from_f64(total);
        Ok(())
    })
}

#[inline]
fn sigmoid<T: Float>(a: T) -> T {
    T::one() / (T::one() + (-a).exp())
}

pub(crate) fn swiglu_fwd(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "swiglu_fwd";
    check_cpu(OP, &[a, b])?;
    same_shape(OP, a, b)?;
    let dt = same_dtype(OP, &[a, b])?;
    with_float!(OP, dt, T => {
        let (ag, bg) = (a.cpu_read()?, b.cpu_read()?);
        let mut out = vec![T::zero(); a.numel()];
        zip2(&mut out, slice::<T>(OP, &ag)?, slice::<T>(OP, &bg)?, |o, a, b| *o = a * sigmoid(a) * b);
        Tensor::from_vec(out, a.shape())
    })
}

pub(crate) fn swiglu_bwd(
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    da: &Tensor,
    db: &Tensor,
) -> Result<()> {
    const OP: &str = "swiglu_bwd";
    check_cpu(OP, &[a, b, dy, da, db])?;
    distinct(OP, &[da, db], &[a, b, dy])?;
    for t in [b, dy, da, db] {
        same_shape(OP, a, t)?;
    }
    let dt = same_dtype(OP, &[a, b, dy, da, db])?;
    with_float!(OP, dt, T => {
        let (ag, bg, dyg) = (a.cpu_read()?, b.cpu_read()?, dy.cpu_read()?);
        let (av, bv, gv) = (slice::<T>(OP, &ag)?, slice::<T>(OP, &bg)?, slice::<T>(OP, &dyg)?);
        let (mut dag, mut dbg) = (da.cpu_write()?, db.cpu_write()?);
        let (dav, dbv) = (slice_mut::<T>(OP, &mut dag)?, slice_mut::<T>(OP, &mut dbg)?);
        dav.par_chunks_mut(ELEM_CHUNK)
            .zip(dbv.par_chunks_mut(ELEM_CHUNK))
            .zip(av.par_chunks(ELEM_CHUNK).zip(bv.par_chunks(ELEM_CHUNK)).zip(gv.par_chunks(ELEM_CHUNK)))
            .for_each(|((da, db), ((a, b), g))| {
                for i in 0..da.len() {
                    let s = sigmoid(a[i]);
                    let silu = a[i] * s;
                    // d silu / da = σ(a) · (1 + a · (1 − σ(a)))
                    let dsilu = s * (T::one() + a[i] * (T::one() - s));
                    da[i] += g[i] * b[i] * dsilu;
                    db[i] += g[i] * silu;
                }
            });
        Ok(())
    })
}
