//! Multi-tensor AdamW (PyTorch `torch.optim.AdamW` semantics, in the compute dtype) and the
//! deterministic global gradient norm.
//!
//! Per element, with `g = grad · grad_scale`:
//! `p ← p · (1 − lr · wd)`; `m ← m + (1 − β₁)(g − m)`; `v ← β₂ v + (1 − β₂) g²`;
//! `p ← p − (lr / (1 − β₁ᵗ)) · m / (sqrt(v) / sqrt(1 − β₂ᵗ) + eps)`; `copy ← bf16(p)`.

use super::{check_cpu, distinct, slice, slice_mut, with_float, Float, ELEM_CHUNK};
use crate::backend::{AdamW, AdamWParam};
use crate::{DType, Error, Result, Tensor};
use half::bf16;
use rayon::prelude::*;

fn step_one<T: Float>(p: &AdamWParam, hp: AdamW) -> Result<()> {
    const OP: &str = "adamw_step";
    let gg = p.grad.cpu_read()?;
    let g = slice::<T>(OP, &gg)?;
    let (mut pg, mut mg, mut vg) = (p.param.cpu_write()?, p.m.cpu_write()?, p.v.cpu_write()?);
    let (ps, ms, vs) =
        (slice_mut::<T>(OP, &mut pg)?, slice_mut::<T>(OP, &mut mg)?, slice_mut::<T>(OP, &mut vg)?);
    let f = |x: f64| T::from_f64(x);
    let (lr, b1, b2, eps) =
        (f(hp.lr as f64), f(hp.beta1 as f64), f(hp.beta2 as f64), f(hp.eps as f64));
    let bc1 = T::one() - b1.powi(hp.step as i32);
    let bc2_sqrt = (T::one() - b2.powi(hp.step as i32)).sqrt();
    let step_size = lr / bc1;
    let decay = T::one() - lr * f(p.weight_decay as f64);
    let gs = f(hp.grad_scale as f64);
    let update = |p: &mut T, m: &mut T, v: &mut T, g: T| {
        let g = g * gs;
        *p *= decay;
        *m += (T::one() - b1) * (g - *m);
        *v = *v * b2 + (T::one() - b2) * g * g;
        let denom = v.sqrt() / bc2_sqrt + eps;
        *p -= step_size * (*m / denom);
    };
    ps.par_chunks_mut(ELEM_CHUNK)
        .zip(ms.par_chunks_mut(ELEM_CHUNK))
        .zip(vs.par_chunks_mut(ELEM_CHUNK))
        .zip(g.par_chunks(ELEM_CHUNK))
        .for_each(|(((p, m), v), g)| {
            for i in 0..p.len() {
                update(&mut p[i], &mut m[i], &mut v[i], g[i]);
            }
        });
    if let Some(copy) = &p.copy {
        let mut cg = copy.cpu_write()?;
        let c = slice_mut::<bf16>(OP, &mut cg)?;
        c.par_chunks_mut(ELEM_CHUNK).zip(ps.par_chunks(ELEM_CHUNK)).for_each(|(c, p)| {
            c.iter_mut().zip(p).for_each(|(c, &p)| *c = bf16::from_f32(p.as_f64() as f32))
        });
    }
    Ok(())
}

pub(crate) fn adamw_step(params: &[AdamWParam], hp: AdamW) -> Result<()> {
    const OP: &str = "adamw_step";
    if hp.step == 0 {
        return Err(Error::invalid(OP, "step is 1-based (bias correction divides by 1 − β^step)"));
    }
    for p in params {
        let mut all = vec![&p.param, &p.grad, &p.m, &p.v];
        all.extend(p.copy.as_ref());
        check_cpu(OP, &all)?;
        let mut outs = vec![&p.param, &p.m, &p.v];
        outs.extend(p.copy.as_ref());
        distinct(OP, &outs, &[&p.grad])?;
        for t in [&p.grad, &p.m, &p.v] {
            if t.shape() != p.param.shape() || t.dtype() != p.param.dtype() {
                return Err(Error::shape(
                    OP,
                    format!(
                        "param {:?} {} vs state {:?} {}",
                        p.param.shape(),
                        p.param.dtype(),
                        t.shape(),
                        t.dtype()
                    ),
                ));
            }
        }
        if let Some(c) = &p.copy {
            if c.dtype() != DType::BF16 || c.numel() != p.param.numel() {
                return Err(Error::shape(
                    OP,
                    format!(
                        "the weight copy must be BF16 with {} elements, got {:?} {}",
                        p.param.numel(),
                        c.shape(),
                        c.dtype()
                    ),
                ));
            }
        }
    }
    for p in params {
        with_float!(OP, p.param.dtype(), T => step_one::<T>(p, hp))?;
    }
    Ok(())
}

/// The guarded step (`Backend::adamw_step_guarded`): the reference of `adamw_guard_f64` and
/// the guarded `adamw_step_f32`.
pub(crate) fn adamw_step_guarded(
    params: &[AdamWParam],
    hp: AdamW,
    loss: &Tensor,
    clip: Option<f64>,
) -> Result<Tensor> {
    const OP: &str = "adamw_step_guarded";
    check_cpu(OP, &[loss])?;
    if loss.numel() != 1 {
        return Err(Error::shape(
            OP,
            format!("the loss must be one value, got {:?}", loss.shape()),
        ));
    }
    let l = loss.scalar()?;
    let grads: Vec<&Tensor> = params.iter().map(|p| &p.grad).collect();
    let norm = global_norm(&grads)?;
    let (factor, skipped) = crate::backend::step_verdict(l, norm, clip);
    if !skipped {
        adamw_step(params, AdamW { grad_scale: hp.grad_scale * factor as f32, ..hp })?;
    }
    // F64 on the CPU (the GPU's status is F32: F64 lives on the CPU only).
    Tensor::from_f64(&[l, norm, factor, if skipped { 1.0 } else { 0.0 }], &[4], DType::F64)
}

pub(crate) fn global_norm(tensors: &[&Tensor]) -> Result<f64> {
    const OP: &str = "global_norm";
    check_cpu(OP, tensors)?;
    let mut total = 0f64;
    for t in tensors {
        let g = t.cpu_read()?;
        let part: f64 = with_float!(OP, t.dtype(), T => {
            let s = slice::<T>(OP, &g)?;
            let partials: Vec<f64> = s
                .par_chunks(ELEM_CHUNK)
                .map(|c| c.iter().map(|&x| { let x = x.as_f64(); x * x }).sum::<f64>())
                .collect();
            Ok::<f64, Error>(partials.iter().sum())
        })?;
        total += part;
    }
    Ok(total.sqrt())
}
