//! `matmul`, `matmul_into` and `sum_rows_into` (the bias gradient).
//!
//! Shapes: `a [.., m, k]` (or `[.., k, m]` with `trans_a`), `b [.., k, n]` (or `[.., n, k]`).
//! Leading axes are batch axes; a batch of one on either side is broadcast. BF16 operands are
//! widened to f32 and the product computed in f32, as the GPU does with fp32 accumulation.

use super::gemm::{gemm_batched, MatMut, MatRef};
use super::{check_cpu, distinct, slice, slice_mut, with_float, Float, ROW_BLOCK};
use crate::backend::{Matmul, Transpose};
use crate::{DType, Error, Result, Tensor};
use rayon::prelude::*;

/// The resolved geometry of a (batched) product.
pub(crate) struct Geometry {
    pub(crate) batch: usize,
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) a_batched: bool,
    pub(crate) b_batched: bool,
    pub(crate) out_shape: Vec<usize>,
}

fn split(t: &Tensor) -> Option<(usize, usize, usize)> {
    let s = t.shape();
    if s.len() < 2 {
        return None;
    }
    let batch = s[..s.len() - 2].iter().product();
    Some((batch, s[s.len() - 2], s[s.len() - 1]))
}

/// The output rule of `matmul_into` (both backends): `out` holds the product (any shape of its
/// numel ending in n, so `[m, n]` for a `[1, m, n]` product), or, without the product's batch
/// axes, the sum of the batch products — `Ok(true)` then.
pub(crate) fn into_summed(op: &'static str, g: &Geometry, out: &Tensor) -> Result<bool> {
    let summed = g.batch > 1 && out.numel() == g.m * g.n;
    if (!summed && out.numel() != g.batch * g.m * g.n) || out.shape().last() != Some(&g.n) {
        return Err(Error::shape(
            op,
            format!("out is {:?} but the product is {:?}", out.shape(), g.out_shape),
        ));
    }
    Ok(summed)
}

pub(crate) fn geometry(op: &'static str, a: &Tensor, b: &Tensor, spec: Matmul) -> Result<Geometry> {
    let (ba, ra, ca) = split(a)
        .ok_or_else(|| Error::shape(op, format!("a must have ≥ 2 axes, got {:?}", a.shape())))?;
    let (bb, rb, cb) = split(b)
        .ok_or_else(|| Error::shape(op, format!("b must have ≥ 2 axes, got {:?}", b.shape())))?;
    let (m, k) = if spec.trans_a == Transpose::Yes { (ca, ra) } else { (ra, ca) };
    let (k2, n) = if spec.trans_b == Transpose::Yes { (cb, rb) } else { (rb, cb) };
    if k != k2 {
        return Err(Error::shape(
            op,
            format!(
                "inner dimensions differ: a {:?} ({:?}) and b {:?} ({:?})",
                a.shape(),
                spec.trans_a,
                b.shape(),
                spec.trans_b
            ),
        ));
    }
    if ba != bb && ba != 1 && bb != 1 {
        return Err(Error::shape(
            op,
            format!("batch axes differ: a {:?}, b {:?}", a.shape(), b.shape()),
        ));
    }
    let batch = ba.max(bb);
    let lead = if ba == batch { &a.shape()[..a.dims() - 2] } else { &b.shape()[..b.dims() - 2] };
    let mut out_shape = lead.to_vec();
    out_shape.extend([m, n]);
    Ok(Geometry { batch, m, n, k, a_batched: ba > 1, b_batched: bb > 1, out_shape })
}

/// Float data of `t` read as `T`: borrowed when the dtype matches, BF16 widened to f32.
pub(crate) enum View<'a, T> {
    Borrowed(std::sync::RwLockReadGuard<'a, crate::CpuStorage>),
    Owned(Vec<T>),
}

impl<T: Float> View<'_, T> {
    pub(crate) fn get(&self) -> &[T] {
        match self {
            // The dtype was checked when the view was made.
            View::Borrowed(g) => g.as_slice::<T>().unwrap_or(&[]),
            View::Owned(v) => v,
        }
    }
}

pub(crate) fn widened<'a, T: Float>(op: &'static str, t: &'a Tensor) -> Result<View<'a, T>> {
    let g = t.cpu_read()?;
    if t.dtype() == DType::BF16 && T::DTYPE == DType::F32 {
        return Ok(View::Owned(
            slice::<half::bf16>(op, &g)?.iter().map(|x| T::from_f32(x.to_f32())).collect(),
        ));
    }
    slice::<T>(op, &g)?;
    Ok(View::Borrowed(g))
}

/// The compute dtype of a product of `a` and `b`.
fn compute_dtype(op: &'static str, a: &Tensor, b: &Tensor) -> Result<DType> {
    match (a.dtype(), b.dtype()) {
        (DType::F64, DType::F64) => Ok(DType::F64),
        (DType::F32 | DType::BF16, DType::F32 | DType::BF16) if a.dtype() == b.dtype() => {
            Ok(DType::F32)
        }
        (da, db) => {
            Err(Error::dtype(op, db, format!("a is {da}: operands must share a float dtype")))
        }
    }
}

/// Runs the product into `c` (already holding `beta · old` semantics via `beta`).
fn product<T: Float>(g: &Geometry, spec: Matmul, a: &[T], b: &[T], beta: T, c: &mut [T]) {
    let (m, n, k) = (g.m, g.n, g.k);
    let (ars, acs) = if spec.trans_a == Transpose::Yes { (1, m as isize) } else { (k as isize, 1) };
    let (brs, bcs) = if spec.trans_b == Transpose::Yes { (1, k as isize) } else { (n as isize, 1) };
    let a_bs = if g.a_batched { (m * k) as isize } else { 0 };
    let b_bs = if g.b_batched { (k * n) as isize } else { 0 };
    // SAFETY: the slices hold batch·m·k, batch·k·n and batch·m·n elements (checked by the
    // callers through `geometry`), c is exclusively borrowed, and batch entries of c are
    // disjoint (stride m·n).
    unsafe {
        gemm_batched(
            g.batch,
            m,
            n,
            k,
            T::from_f32(spec.alpha),
            MatRef { ptr: a.as_ptr(), rs: ars, cs: acs },
            a_bs,
            MatRef { ptr: b.as_ptr(), rs: brs, cs: bcs },
            b_bs,
            beta,
            MatMut { ptr: c.as_mut_ptr(), rs: n as isize, cs: 1 },
            (m * n) as isize,
        );
    }
}

pub(crate) fn matmul(
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    spec: Matmul,
    out: Option<DType>,
) -> Result<Tensor> {
    const OP: &str = "matmul";
    check_cpu(OP, &[a, b])?;
    let g = geometry(OP, a, b, spec)?;
    let cd = compute_dtype(OP, a, b)?;
    let out_dtype = out.unwrap_or(a.dtype());
    if cd == DType::F64 && out_dtype != DType::F64
        || cd == DType::F32 && !matches!(out_dtype, DType::F32 | DType::BF16)
    {
        return Err(Error::dtype(OP, out_dtype, format!("cannot be the output of a {cd} product")));
    }
    if let Some(bias) = bias {
        check_cpu(OP, &[bias])?;
        if bias.shape() != [g.n] || bias.dtype() != a.dtype() {
            return Err(Error::shape(
                OP,
                format!(
                    "bias must be [{}] {}, got {:?} {}",
                    g.n,
                    a.dtype(),
                    bias.shape(),
                    bias.dtype()
                ),
            ));
        }
    }
    let result = with_float!(OP, cd, T => {
        let av = widened::<T>(OP, a)?;
        let bv = widened::<T>(OP, b)?;
        let mut c = vec![T::zero(); g.batch * g.m * g.n];
        let beta = match bias {
            Some(bias) => {
                let bb = widened::<T>(OP, bias)?;
                c.par_chunks_mut(g.n.max(1)).for_each(|row| row.copy_from_slice(bb.get()));
                T::one()
            }
            None => T::zero(),
        };
        product::<T>(&g, spec, av.get(), bv.get(), beta, &mut c);
        Tensor::from_vec(c, &g.out_shape)
    })?;
    if result.dtype() == out_dtype {
        Ok(result)
    } else {
        super::elementwise::cast(&result, out_dtype)
    }
}

pub(crate) fn matmul_into(a: &Tensor, b: &Tensor, spec: Matmul, out: &Tensor) -> Result<()> {
    const OP: &str = "matmul_into";
    check_cpu(OP, &[a, b, out])?;
    distinct(OP, &[out], &[a, b])?;
    let g = geometry(OP, a, b, spec)?;
    let cd = compute_dtype(OP, a, b)?;
    if out.dtype() != cd {
        return Err(Error::dtype(
            OP,
            out.dtype(),
            format!("the output of a {cd} product must be {cd}"),
        ));
    }
    let summed = into_summed(OP, &g, out)?;
    with_float!(OP, cd, T => {
        let av = widened::<T>(OP, a)?;
        let bv = widened::<T>(OP, b)?;
        let mut og = out.cpu_write()?;
        let c = slice_mut::<T>(OP, &mut og)?;
        if summed {
            // One product per batch entry, added in batch order (deterministic); beta applies once.
            let one = Geometry { batch: 1, a_batched: false, b_batched: false, out_shape: vec![g.m, g.n], ..g };
            let (mk, kn) = (g.m * g.k, g.k * g.n);
            for i in 0..g.batch {
                let ai = if g.a_batched { &av.get()[i * mk..(i + 1) * mk] } else { av.get() };
                let bi = if g.b_batched { &bv.get()[i * kn..(i + 1) * kn] } else { bv.get() };
                let beta = if i == 0 { T::from_f32(spec.beta) } else { T::one() };
                product::<T>(&one, spec, ai, bi, beta, c);
            }
        } else {
            product::<T>(&g, spec, av.get(), bv.get(), T::from_f32(spec.beta), c);
        }
        Ok(())
    })
}

pub(crate) fn sum_rows_into(x: &Tensor, out: &Tensor) -> Result<()> {
    const OP: &str = "sum_rows_into";
    check_cpu(OP, &[x, out])?;
    distinct(OP, &[out], &[x])?;
    let c = *x.shape().last().ok_or_else(|| Error::shape(OP, "x must have ≥ 1 axis"))?;
    if out.shape() != [c] {
        return Err(Error::shape(OP, format!("out must be [{c}], got {:?}", out.shape())));
    }
    let dt = super::same_dtype(OP, &[x, out])?;
    with_float!(OP, dt, T => {
        let xg = x.cpu_read()?;
        let xs = slice::<T>(OP, &xg)?;
        let partials: Vec<Vec<T>> = xs
            .par_chunks((ROW_BLOCK * c).max(1))
            .map(|blk| {
                let mut acc = vec![T::zero(); c];
                for row in blk.chunks(c) {
                    acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
                }
                acc
            })
            .collect();
        let mut og = out.cpu_write()?;
        let o = slice_mut::<T>(OP, &mut og)?;
        for p in &partials {
            o.iter_mut().zip(p).for_each(|(a, &v)| *a += v);
        }
        Ok(())
    })
}
