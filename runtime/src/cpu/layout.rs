//! Layout ops: `transpose01`, `slice0` (+ its accumulating backward) and `concat0`.

use super::{check_cpu, distinct, slice, slice_mut, with_any, with_float, ELEM_CHUNK};
use crate::{Error, Result, Tensor};
use rayon::prelude::*;

/// `[A, B, C] → [B, A, C]`; 2-D tensors are `[A, B]` with `C = 1`.
pub(crate) fn transpose01(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "transpose01";
    check_cpu(OP, &[x])?;
    let s = x.shape();
    let (a, b, c) = match s.len() {
        2 => (s[0], s[1], 1),
        3 => (s[0], s[1], s[2]),
        _ => return Err(Error::shape(OP, format!("expects 2 or 3 axes, got {s:?}"))),
    };
    let g = x.cpu_read()?;
    let out_shape: Vec<usize> = if s.len() == 2 { vec![b, a] } else { vec![b, a, c] };
    with_any!(x.dtype(), T => {
        let src = slice::<T>(OP, &g)?;
        let mut out = vec![T::from_f64(0.0); x.numel()];
        // Output row j (of B) gathers the j-th row of every one of the A input blocks.
        out.par_chunks_mut((a * c).max(1)).enumerate().for_each(|(j, dst)| {
            for i in 0..a {
                dst[i * c..(i + 1) * c].copy_from_slice(&src[(i * b + j) * c..(i * b + j + 1) * c]);
            }
        });
        Tensor::from_vec(out, &out_shape)
    })
}

fn row_len(x: &Tensor) -> usize {
    x.shape()[1..].iter().product()
}

pub(crate) fn slice0(x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    const OP: &str = "slice0";
    check_cpu(OP, &[x])?;
    if x.dims() == 0 || start + len > x.shape()[0] {
        return Err(Error::shape(OP, format!("rows {start}..{} of {:?}", start + len, x.shape())));
    }
    let r = row_len(x);
    let g = x.cpu_read()?;
    let mut shape = x.shape().to_vec();
    shape[0] = len;
    with_any!(x.dtype(), T => {
        let src = slice::<T>(OP, &g)?;
        Tensor::from_vec(src[start * r..(start + len) * r].to_vec(), &shape)
    })
}

pub(crate) fn slice0_bwd(dy: &Tensor, dx: &Tensor, start: usize) -> Result<()> {
    const OP: &str = "slice0_bwd";
    check_cpu(OP, &[dy, dx])?;
    distinct(OP, &[dx], &[dy])?;
    if dx.dims() == 0
        || dy.dims() != dx.dims()
        || dy.shape()[1..] != dx.shape()[1..]
        || start + dy.shape()[0] > dx.shape()[0]
    {
        return Err(Error::shape(
            OP,
            format!("cannot add {:?} into rows from {start} of {:?}", dy.shape(), dx.shape()),
        ));
    }
    let dt = super::same_dtype(OP, &[dy, dx])?;
    let r = row_len(dx);
    with_float!(OP, dt, T => {
        let gg = dy.cpu_read()?;
        let src = slice::<T>(OP, &gg)?;
        let mut dg = dx.cpu_write()?;
        let dst = &mut slice_mut::<T>(OP, &mut dg)?[start * r..start * r + src.len()];
        dst.par_chunks_mut(ELEM_CHUNK).zip(src.par_chunks(ELEM_CHUNK)).for_each(|(d, s)| {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d += s)
        });
        Ok(())
    })
}

pub(crate) fn concat0(parts: &[&Tensor]) -> Result<Tensor> {
    const OP: &str = "concat0";
    let first = parts.first().ok_or_else(|| Error::invalid(OP, "nothing to concatenate"))?;
    check_cpu(OP, parts)?;
    let dt = super::same_dtype(OP, parts)?;
    if first.dims() == 0 {
        return Err(Error::shape(OP, "parts must have ≥ 1 axis"));
    }
    for p in parts {
        if p.dims() != first.dims() || p.shape()[1..] != first.shape()[1..] {
            return Err(Error::shape(
                OP,
                format!("{:?} does not stack with {:?}", p.shape(), first.shape()),
            ));
        }
    }
    let mut shape = first.shape().to_vec();
    shape[0] = parts.iter().map(|p| p.shape()[0]).sum();
    with_any!(dt, T => {
        let mut out = Vec::with_capacity(shape.iter().product());
        for p in parts {
            let g = p.cpu_read()?;
            out.extend_from_slice(slice::<T>(OP, &g)?);
        }
        Tensor::from_vec(out, &shape)
    })
}
