//! Token embedding: row gather forward, deterministic row scatter-add backward.

use super::{check_cpu, distinct, ids_as_usize, slice, slice_mut, with_any, with_float};
use crate::{Error, Result, Tensor};
use rayon::prelude::*;

pub(crate) fn table_dims(op: &'static str, table: &Tensor) -> Result<(usize, usize)> {
    match table.shape() {
        [v, h] => Ok((*v, *h)),
        s => Err(Error::shape(op, format!("the table must be [vocab, hidden], got {s:?}"))),
    }
}

pub(crate) fn embedding_fwd(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding_fwd";
    check_cpu(OP, &[ids, table])?;
    let (v, h) = table_dims(OP, table)?;
    let idx = ids_as_usize(OP, ids, v)?;
    let mut shape = ids.shape().to_vec();
    shape.push(h);
    let g = table.cpu_read()?;
    with_any!(table.dtype(), T => {
        let t = slice::<T>(OP, &g)?;
        let mut out = vec![T::from_f64(0.0); idx.len() * h];
        out.par_chunks_mut(h.max(1)).zip(idx.par_iter()).for_each(|(row, &i)| row.copy_from_slice(&t[i * h..(i + 1) * h]));
        Tensor::from_vec(out, &shape)
    })
}

/// `dtable[v] += Σ_{i: ids[i] = v} dy[i]`, summed per row in increasing token order.
pub(crate) fn embedding_bwd(ids: &Tensor, dy: &Tensor, dtable: &Tensor) -> Result<()> {
    const OP: &str = "embedding_bwd";
    check_cpu(OP, &[ids, dy, dtable])?;
    distinct(OP, &[dtable], &[dy])?;
    let (v, h) = table_dims(OP, dtable)?;
    let idx = ids_as_usize(OP, ids, v)?;
    if dy.numel() != idx.len() * h {
        return Err(Error::shape(
            OP,
            format!("dy {:?} does not match {} ids × hidden {h}", dy.shape(), idx.len()),
        ));
    }
    let dt = super::same_dtype(OP, &[dy, dtable])?;
    // Counting sort: the tokens of every vocabulary row, in token order.
    let mut start = vec![0usize; v + 1];
    for &i in &idx {
        start[i + 1] += 1;
    }
    for r in 0..v {
        start[r + 1] += start[r];
    }
    let mut fill = start.clone();
    let mut tokens = vec![0usize; idx.len()];
    for (t, &i) in idx.iter().enumerate() {
        tokens[fill[i]] = t;
        fill[i] += 1;
    }
    with_float!(OP, dt, T => {
        let gg = dy.cpu_read()?;
        let g = slice::<T>(OP, &gg)?;
        let mut dg = dtable.cpu_write()?;
        slice_mut::<T>(OP, &mut dg)?.par_chunks_mut(h.max(1)).enumerate().for_each(|(r, row)| {
            for &t in &tokens[start[r]..start[r + 1]] {
                row.iter_mut().zip(&g[t * h..(t + 1) * h]).for_each(|(d, &s)| *d += s);
            }
        });
        Ok(())
    })
}
