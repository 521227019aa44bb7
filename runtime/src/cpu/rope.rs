//! Rotary position embedding, rotate_half (GPT-NeoX) layout, on `[B, T, H, D]`.
//!
//! Dimension j < D/2 pairs with j + D/2. Angles follow HF's float32 computation exactly:
//! `inv_freq[j] = 1 / theta^((2j) / D)` and `angle = (t + offset) · inv_freq[j]`, all in f32,
//! then `cos`/`sin` in f32 (widened to f64 for f64 tensors).
//! Forward: `y[j] = x[j]·cos − x[j+h]·sin`, `y[j+h] = x[j+h]·cos + x[j]·sin`.
//! Backward (the transposed rotation): `dx[j] = dy[j]·cos + dy[j+h]·sin`,
//! `dx[j+h] = dy[j+h]·cos − dy[j]·sin`.

use super::{check_cpu, distinct, same_dtype, same_shape, slice, slice_mut, with_float, Float};
use crate::{Error, Result, Tensor};
use rayon::prelude::*;

/// `(B, T, H, D)` of a rotary input.
pub(crate) fn dims(op: &'static str, x: &Tensor) -> Result<(usize, usize, usize, usize)> {
    match x.shape() {
        [b, t, h, d] if d % 2 == 0 => Ok((*b, *t, *h, *d)),
        s => Err(Error::shape(
            op,
            format!("expects [batch, seq, heads, head_dim] with an even head_dim, got {s:?}"),
        )),
    }
}

/// `(cos, sin)` tables `[T, D/2]` for positions `offset .. offset + T`, in f32 as HF.
pub fn rope_tables(seq: usize, head_dim: usize, theta: f64, offset: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let base = theta as f32;
    let inv: Vec<f32> =
        (0..half).map(|j| 1.0f32 / base.powf((2 * j) as f32 / head_dim as f32)).collect();
    let mut cos = vec![0f32; seq * half];
    let mut sin = vec![0f32; seq * half];
    for t in 0..seq {
        let pos = (t + offset) as f32;
        for j in 0..half {
            let a = pos * inv[j];
            cos[t * half + j] = a.cos();
            sin[t * half + j] = a.sin();
        }
    }
    (cos, sin)
}

/// Applies the rotation (`sign = 1`) or its transpose (`sign = −1`) to every head vector, adding
/// into `out` when `accumulate`.
fn rotate<T: Float>(
    x: &[T],
    out: &mut [T],
    dims: (usize, usize, usize, usize),
    theta: f64,
    offset: usize,
    sign: T,
    accumulate: bool,
) {
    let (_, t, h, d) = dims;
    let half = d / 2;
    let (cos, sin) = rope_tables(t, d, theta, offset);
    out.par_chunks_mut(d.max(1)).zip(x.par_chunks(d.max(1))).enumerate().for_each(
        |(row, (o, x))| {
            let pos = (row / h) % t;
            for j in 0..half {
                let c = T::from_f32(cos[pos * half + j]);
                let s = T::from_f32(sin[pos * half + j]) * sign;
                let a = x[j] * c - x[j + half] * s;
                let b = x[j + half] * c + x[j] * s;
                if accumulate {
                    o[j] += a;
                    o[j + half] += b;
                } else {
                    o[j] = a;
                    o[j + half] = b;
                }
            }
        },
    );
}

pub(crate) fn rope_fwd(x: &Tensor, theta: f64, pos_offset: usize) -> Result<Tensor> {
    const OP: &str = "rope_fwd";
    check_cpu(OP, &[x])?;
    let d = dims(OP, x)?;
    with_float!(OP, x.dtype(), T => {
        let g = x.cpu_read()?;
        let mut y = vec![T::zero(); x.numel()];
        rotate(slice::<T>(OP, &g)?, &mut y, d, theta, pos_offset, T::one(), false);
        Tensor::from_vec(y, x.shape())
    })
}

pub(crate) fn rope_bwd(dy: &Tensor, theta: f64, pos_offset: usize, dx: &Tensor) -> Result<()> {
    const OP: &str = "rope_bwd";
    check_cpu(OP, &[dy, dx])?;
    distinct(OP, &[dx], &[dy])?;
    same_shape(OP, dy, dx)?;
    let d = dims(OP, dy)?;
    let dt = same_dtype(OP, &[dy, dx])?;
    with_float!(OP, dt, T => {
        let g = dy.cpu_read()?;
        let mut dg = dx.cpu_write()?;
        rotate(slice::<T>(OP, &g)?, slice_mut::<T>(OP, &mut dg)?, d, theta, pos_offset, -T::one(), true);
        Ok(())
    })
}
