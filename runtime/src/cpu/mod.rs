//! The CPU backend: the reference implementation of every op.
//!
//! Clarity first, then speed: each op lives in its own file with the formula it computes.
//! Parallelism (rayon) never changes a result: elementwise work is split into fixed chunks,
//! per-row reductions run sequentially inside one task, and reductions across rows combine
//! fixed-size blocks of partial sums in block order. GEMMs are tiled over output rows and
//! columns by a rule that depends only on the shape (never on the thread count), and no tile
//! splits the reduction dimension. Results are therefore bit-identical at any thread count.

mod adamw;
pub(crate) mod attention;
mod elementwise;
pub(crate) mod embedding;
pub(crate) mod experts;
pub(crate) mod gemm;
mod l2_normalize;
mod layout;
pub(crate) mod lm_head_ce;
pub(crate) mod matmul;
pub mod peak;
pub(crate) mod rms_norm;
pub(crate) mod rope;
pub(crate) mod soft_moe;
pub(crate) mod softmax;

use crate::backend::{
    AdamW, AdamWParam, Backend, CrossEntropy, CrossEntropyOut, ExpertWeights, ExpertsOut, Matmul,
    SoftMoeRoute,
};
use crate::{CpuStorage, DType, Device, Element, Error, Result, Tensor};

/// Traits the op bodies use on concrete float types.
pub(crate) mod prelude {
    pub(crate) use super::Float;
    pub(crate) use crate::Element;
    pub(crate) use num_traits::{Float as _, One, Zero};
}

/// Elements per task in elementwise loops.
pub(crate) const ELEM_CHUNK: usize = 1 << 14;
/// Rows per block of partial sums in reductions across rows.
pub(crate) const ROW_BLOCK: usize = 64;

/// Floating-point element types the CPU computes in.
pub(crate) trait Float:
    num_traits::Float
    + Element
    + Default
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::iter::Sum
{
    fn from_f32(v: f32) -> Self;
}
impl Float for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
}
impl Float for f64 {
    fn from_f32(v: f32) -> Self {
        v as f64
    }
}

/// Runs `$body` with `$T` bound to the Rust type of a float dtype (F32 or F64).
macro_rules! with_float {
    ($op:expr, $dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                #[allow(unused_imports)]
                use $crate::cpu::prelude::*;
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                #[allow(unused_imports)]
                use $crate::cpu::prelude::*;
                type $T = f64;
                $body
            }
            other => Err($crate::Error::DType {
                op: $op,
                dtype: other,
                msg: "this op computes in F32 or F64 on the CPU; cast first".into(),
            }),
        }
    };
}
pub(crate) use with_float;

/// Runs `$body` with `$T` bound to the Rust type of any dtype.
macro_rules! with_any {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                #[allow(unused_imports)]
                use $crate::Element as _;
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                #[allow(unused_imports)]
                use $crate::Element as _;
                type $T = f64;
                $body
            }
            $crate::DType::BF16 => {
                #[allow(unused_imports)]
                use $crate::Element as _;
                type $T = half::bf16;
                $body
            }
            $crate::DType::I32 => {
                #[allow(unused_imports)]
                use $crate::Element as _;
                type $T = i32;
                $body
            }
            $crate::DType::U16 => {
                #[allow(unused_imports)]
                use $crate::Element as _;
                type $T = u16;
                $body
            }
            $crate::DType::U32 => {
                #[allow(unused_imports)]
                use $crate::Element as _;
                type $T = u32;
                $body
            }
        }
    };
}
pub(crate) use with_any;

/// A raw pointer that tasks may share. Every use states why the tasks' writes are disjoint.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
// SAFETY: only used to hand disjoint regions of one buffer to parallel tasks; each use site
// documents the disjointness.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer. A method (not the field) so closures capture the whole `SendPtr`.
    #[inline]
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

pub(crate) fn check_cpu(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    for t in ts {
        if t.device() != Device::Cpu {
            return Err(Error::Device { op, expected: Device::Cpu, found: t.device() });
        }
    }
    Ok(())
}

pub(crate) fn same_dtype(op: &'static str, ts: &[&Tensor]) -> Result<DType> {
    let d = ts[0].dtype();
    for t in &ts[1..] {
        if t.dtype() != d {
            return Err(Error::dtype(op, t.dtype(), format!("all float operands must be {d}")));
        }
    }
    Ok(d)
}

pub(crate) fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::shape(op, format!("{:?} vs {:?}", a.shape(), b.shape())));
    }
    Ok(())
}

/// Outputs written in place must not share storage with each other or with any input.
pub(crate) fn distinct(op: &'static str, outs: &[&Tensor], ins: &[&Tensor]) -> Result<()> {
    for (i, o) in outs.iter().enumerate() {
        for other in outs[i + 1..].iter().chain(ins.iter()) {
            if o.shares_storage(other) {
                return Err(Error::invalid(
                    op,
                    "an output buffer shares storage with another operand",
                ));
            }
        }
    }
    Ok(())
}

pub(crate) fn slice<'a, T: Element>(op: &'static str, s: &'a CpuStorage) -> Result<&'a [T]> {
    s.as_slice::<T>().ok_or_else(|| Error::dtype(op, s.dtype(), format!("expected {}", T::DTYPE)))
}

pub(crate) fn slice_mut<'a, T: Element>(
    op: &'static str,
    s: &'a mut CpuStorage,
) -> Result<&'a mut [T]> {
    let d = s.dtype();
    s.as_mut_slice::<T>().ok_or_else(|| Error::dtype(op, d, format!("expected {}", T::DTYPE)))
}

/// Integer ids as `usize`, each checked against `limit`.
pub(crate) fn ids_as_usize(op: &'static str, ids: &Tensor, limit: usize) -> Result<Vec<usize>> {
    let g = ids.cpu_read()?;
    let raw: Vec<i64> = match &*g {
        CpuStorage::I32(v) => v.iter().map(|&x| x as i64).collect(),
        CpuStorage::U32(v) => v.iter().map(|&x| x as i64).collect(),
        CpuStorage::U16(v) => v.iter().map(|&x| x as i64).collect(),
        other => return Err(Error::dtype(op, other.dtype(), "ids must be I32, U32 or U16")),
    };
    raw.iter()
        .enumerate()
        .map(|(i, &x)| {
            if x < 0 || x as usize >= limit {
                Err(Error::invalid(op, format!("id {x} at position {i} is outside 0..{limit}")))
            } else {
                Ok(x as usize)
            }
        })
        .collect()
}

// ---- BF16 values (DESIGN §3: bf16 storage, f32 arithmetic) -------------------------------------
//
// Wherever the GPU takes BF16 values, the CPU reference does too, computing exactly what the GPU
// is specified to compute: the bf16 inputs widened to f32 (exact), the op in f32, and each bf16
// output rounded once to nearest even. Gradients stay F32.

/// The f32 view of a BF16 operand (an exact widening); any other tensor as it is.
fn widen(t: &Tensor) -> Result<Tensor> {
    if t.dtype() == DType::BF16 {
        elementwise::cast(t, DType::F32)
    } else {
        Ok(t.clone())
    }
}

/// `out` rounded to BF16 when the op's value inputs were BF16.
fn narrow(out: Tensor, like: DType) -> Result<Tensor> {
    if like == DType::BF16 && out.dtype() == DType::F32 {
        elementwise::cast(&out, DType::BF16)
    } else {
        Ok(out)
    }
}

/// Runs an in-place op on a BF16 `dst` through an f32 copy and rounds the result back into it.
fn in_place_bf16(dst: &Tensor, f: impl FnOnce(&Tensor) -> Result<()>) -> Result<()> {
    if dst.dtype() != DType::BF16 {
        return f(dst);
    }
    let wide = elementwise::cast(dst, DType::F32)?;
    f(&wide)?;
    let back = elementwise::cast(&wide, DType::BF16)?;
    let storage = back.cpu_read()?.clone();
    *dst.cpu_write()? = storage;
    Ok(())
}

/// The CPU backend. Threads come from the rayon pool the caller runs in (the global pool by
/// default; `ThreadPool::install` to pin a count).
#[derive(Clone, Copy, Debug)]
pub struct CpuBackend {
    // Private: every `CpuBackend` comes from `new` (or `default`), which counts it.
    _counted: (),
}

/// How many `CpuBackend`s this process has constructed (`--device emu` proves with it that no
/// CPU backend computed the model's ops).
static CONSTRUCTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl CpuBackend {
    pub fn new() -> Self {
        CONSTRUCTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        CpuBackend { _counted: () }
    }

    /// The number of `CpuBackend`s constructed in this process so far.
    pub fn constructed() -> usize {
        CONSTRUCTED.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Ok(Tensor::zeros(shape, dtype))
    }

    fn fill(&self, t: &Tensor, value: f64) -> Result<()> {
        elementwise::fill(t, value)
    }

    fn upload(&self, host: &Tensor) -> Result<Tensor> {
        host.deep_copy()
    }

    fn download(&self, t: &Tensor) -> Result<Tensor> {
        t.deep_copy()
    }

    fn copy(&self, t: &Tensor) -> Result<Tensor> {
        t.deep_copy()
    }

    fn cast(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        elementwise::cast(t, dtype)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        same_dtype("add", &[a, b])?;
        narrow(elementwise::add(&widen(a)?, &widen(b)?)?, a.dtype())
    }

    fn add_assign(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        if src.dtype() == DType::BF16 && dst.dtype() == DType::BF16 {
            let src = widen(src)?;
            return in_place_bf16(dst, |d| elementwise::add_assign(d, &src));
        }
        elementwise::add_assign(dst, src)
    }

    fn scale(&self, x: &Tensor, alpha: f64) -> Result<Tensor> {
        narrow(elementwise::scale(&widen(x)?, alpha)?, x.dtype())
    }

    fn scale_by_fwd(&self, x: &Tensor, s: &Tensor) -> Result<Tensor> {
        narrow(elementwise::scale_by_fwd(&widen(x)?, s)?, x.dtype())
    }

    fn scale_by_bwd(
        &self,
        x: &Tensor,
        s: &Tensor,
        dy: &Tensor,
        dx: &Tensor,
        ds: &Tensor,
    ) -> Result<()> {
        elementwise::scale_by_bwd(&widen(x)?, s, dy, dx, ds)
    }

    fn swiglu_fwd(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        same_dtype("swiglu_fwd", &[a, b])?;
        narrow(elementwise::swiglu_fwd(&widen(a)?, &widen(b)?)?, a.dtype())
    }

    fn swiglu_bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
        da: &Tensor,
        db: &Tensor,
    ) -> Result<()> {
        same_dtype("swiglu_bwd", &[a, b])?;
        elementwise::swiglu_bwd(&widen(a)?, &widen(b)?, dy, da, db)
    }

    fn transpose01(&self, x: &Tensor) -> Result<Tensor> {
        layout::transpose01(x)
    }

    fn slice0(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        layout::slice0(x, start, len)
    }

    fn slice0_bwd(&self, dy: &Tensor, dx: &Tensor, start: usize) -> Result<()> {
        if dy.dtype() == DType::BF16 && dx.dtype() == DType::BF16 {
            let dy = widen(dy)?;
            return in_place_bf16(dx, |d| layout::slice0_bwd(&dy, d, start));
        }
        layout::slice0_bwd(dy, dx, start)
    }

    fn concat0(&self, parts: &[&Tensor]) -> Result<Tensor> {
        layout::concat0(parts)
    }

    fn matmul(
        &self,
        a: &Tensor,
        b: &Tensor,
        bias: Option<&Tensor>,
        spec: Matmul,
        out: Option<DType>,
    ) -> Result<Tensor> {
        matmul::matmul(a, b, bias, spec, out)
    }

    fn matmul_into(&self, a: &Tensor, b: &Tensor, spec: Matmul, out: &Tensor) -> Result<()> {
        matmul::matmul_into(a, b, spec, out)
    }

    fn sum_rows_into(&self, x: &Tensor, out: &Tensor) -> Result<()> {
        matmul::sum_rows_into(&widen(x)?, out)
    }

    fn embedding_fwd(&self, ids: &Tensor, table: &Tensor) -> Result<Tensor> {
        embedding::embedding_fwd(ids, table)
    }

    fn embedding_bwd(&self, ids: &Tensor, dy: &Tensor, dtable: &Tensor) -> Result<()> {
        embedding::embedding_bwd(ids, dy, dtable)
    }

    fn rms_norm_fwd(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        rms_norm::rms_norm_fwd(x, w, eps)
    }

    fn rms_norm_bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
        dx: &Tensor,
        dw: &Tensor,
    ) -> Result<()> {
        rms_norm::rms_norm_bwd(x, w, rstd, dy, None, &[dx], dw)
    }

    fn add_rms_norm_fwd(
        &self,
        x: &Tensor,
        r: &Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        rms_norm::add_rms_norm_fwd(x, r, w, eps)
    }

    fn add_rms_norm_bwd(
        &self,
        sum: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
        dsum: Option<&Tensor>,
        dx: &Tensor,
        dr: &Tensor,
        dw: &Tensor,
    ) -> Result<()> {
        rms_norm::rms_norm_bwd(sum, w, rstd, dy, dsum, &[dx, dr], dw)
    }

    fn l2_normalize_fwd(&self, x: &Tensor, axis: usize, eps: f64) -> Result<(Tensor, Tensor)> {
        let (y, norm) = l2_normalize::l2_normalize_fwd(&widen(x)?, axis, eps)?;
        Ok((narrow(y, x.dtype())?, norm))
    }

    fn l2_normalize_bwd(
        &self,
        y: &Tensor,
        norm: &Tensor,
        dy: &Tensor,
        axis: usize,
        eps: f64,
        dx: &Tensor,
    ) -> Result<()> {
        l2_normalize::l2_normalize_bwd(&widen(y)?, norm, dy, axis, eps, dx)
    }

    fn softmax_fwd(&self, x: &Tensor, axis: usize) -> Result<Tensor> {
        narrow(softmax::softmax_fwd(&widen(x)?, axis)?, x.dtype())
    }

    fn softmax_bwd(&self, y: &Tensor, dy: &Tensor, axis: usize, dx: &Tensor) -> Result<()> {
        softmax::softmax_bwd(&widen(y)?, dy, axis, dx)
    }

    fn rope_fwd(&self, x: &Tensor, theta: f64, pos_offset: usize) -> Result<Tensor> {
        narrow(rope::rope_fwd(&widen(x)?, theta, pos_offset)?, x.dtype())
    }

    fn rope_bwd(&self, dy: &Tensor, theta: f64, pos_offset: usize, dx: &Tensor) -> Result<()> {
        rope::rope_bwd(dy, theta, pos_offset, dx)
    }

    fn attention_fwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> Result<(Tensor, Tensor)> {
        attention::attention_fwd(q, k, v, scale)
    }

    fn attention_bwd(
        &self,
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
        attention::attention_bwd(q, k, v, o, lse, d_o, scale, dq, dk, dv)
    }

    fn lm_head_ce_fwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        spec: CrossEntropy,
    ) -> Result<CrossEntropyOut> {
        same_dtype("lm_head_ce_fwd", &[x, w])?;
        lm_head_ce::lm_head_ce_fwd(&widen(x)?, &widen(w)?, targets, spec)
    }

    fn lm_head_ce_bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        lse: &Tensor,
        dloss: &Tensor,
        scale: f64,
        spec: CrossEntropy,
        dx: &Tensor,
        dw: &Tensor,
    ) -> Result<()> {
        same_dtype("lm_head_ce_bwd", &[x, w])?;
        lm_head_ce::lm_head_ce_bwd(&widen(x)?, &widen(w)?, targets, lse, dloss, scale, spec, dx, dw)
    }

    fn lm_head_ce_fwd_bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        scale: f64,
        spec: CrossEntropy,
        count: Option<usize>,
        dx: &Tensor,
        dw: &Tensor,
    ) -> Result<CrossEntropyOut> {
        const OP: &str = "lm_head_ce_fwd_bwd";
        same_dtype(OP, &[x, w])?;
        let out =
            lm_head_ce::lm_head_ce_fwd_bwd(&widen(x)?, &widen(w)?, targets, scale, spec, dx, dw)?;
        match count {
            Some(c) if c != out.count => Err(Error::invalid(
                OP,
                format!("the caller's count {c} is not the {} counted targets", out.count),
            )),
            _ => Ok(out),
        }
    }

    fn soft_moe_route_fwd(
        &self,
        x: &Tensor,
        phi: &Tensor,
        scale: &Tensor,
        eps: f64,
    ) -> Result<SoftMoeRoute> {
        soft_moe::soft_moe_route_fwd(x, phi, scale, eps)
    }

    fn soft_moe_route_bwd(
        &self,
        route: &SoftMoeRoute,
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
        soft_moe::soft_moe_route_bwd(
            route, phi, scale, d_xn, d_dispatch, d_combine, eps, dx, dphi, dscale,
        )
    }

    fn soft_moe_dispatch_fwd(&self, dispatch: &Tensor, xn: &Tensor) -> Result<Tensor> {
        soft_moe::soft_moe_dispatch_fwd(dispatch, xn)
    }

    fn soft_moe_dispatch_bwd(
        &self,
        dispatch: &Tensor,
        xn: &Tensor,
        d_slots: &Tensor,
        d_dispatch: &Tensor,
        d_xn: &Tensor,
    ) -> Result<()> {
        soft_moe::soft_moe_dispatch_bwd(dispatch, xn, d_slots, d_dispatch, d_xn)
    }

    fn soft_moe_combine_fwd(&self, combine: &Tensor, ys: &Tensor) -> Result<Tensor> {
        soft_moe::soft_moe_combine_fwd(combine, ys)
    }

    fn soft_moe_combine_bwd(
        &self,
        combine: &Tensor,
        ys: &Tensor,
        dy: &Tensor,
        d_combine: &Tensor,
        d_ys: &Tensor,
    ) -> Result<()> {
        soft_moe::soft_moe_combine_bwd(combine, ys, dy, d_combine, d_ys)
    }

    fn experts_fwd(&self, x: &Tensor, w: ExpertWeights<'_>) -> Result<ExpertsOut> {
        if x.dtype() != DType::BF16 {
            return experts::experts_fwd(x, w, false);
        }
        // BF16 values: widened (exactly), computed in f32 with `u` stored as bf16 between the
        // stages, every output rounded once.
        let wide = |ts: &[Tensor]| ts.iter().map(widen).collect::<Result<Vec<_>>>();
        if let Some(t) = experts::all_weights(&w).iter().find(|t| t.dtype() != DType::BF16) {
            return Err(Error::dtype(
                "experts_fwd",
                t.dtype(),
                "the expert weights must be BF16, as x",
            ));
        }
        let (gu, up, gd, dn) = (wide(w.gate_up)?, wide(w.up)?, wide(w.gate_down)?, wide(w.down)?);
        let ww = ExpertWeights { gate_up: &gu, up: &up, gate_down: &gd, down: &dn };
        let o = experts::experts_fwd(&widen(x)?, ww, true)?;
        let n = |t: Tensor| narrow(t, DType::BF16);
        Ok(ExpertsOut {
            y: n(o.y)?,
            a1: n(o.a1)?,
            b1: n(o.b1)?,
            u: n(o.u)?,
            a2: n(o.a2)?,
            b2: n(o.b2)?,
        })
    }

    fn experts_bwd(
        &self,
        x: &Tensor,
        w: ExpertWeights<'_>,
        saved: &ExpertsOut,
        dy: &Tensor,
        dx: &Tensor,
        dw: ExpertWeights<'_>,
    ) -> Result<()> {
        if x.dtype() != DType::BF16 {
            return experts::experts_bwd(x, w, saved, dy, dx, dw);
        }
        let wide = |ts: &[Tensor]| ts.iter().map(widen).collect::<Result<Vec<_>>>();
        let (gu, up, gd, dn) = (wide(w.gate_up)?, wide(w.up)?, wide(w.gate_down)?, wide(w.down)?);
        let ww = ExpertWeights { gate_up: &gu, up: &up, gate_down: &gd, down: &dn };
        let s = ExpertsOut {
            y: widen(&saved.y)?,
            a1: widen(&saved.a1)?,
            b1: widen(&saved.b1)?,
            u: widen(&saved.u)?,
            a2: widen(&saved.a2)?,
            b2: widen(&saved.b2)?,
        };
        experts::experts_bwd(&widen(x)?, ww, &s, dy, dx, dw)
    }

    fn adamw_step(&self, params: &[AdamWParam], hp: AdamW) -> Result<()> {
        adamw::adamw_step(params, hp)
    }

    fn adamw_step_guarded(
        &self,
        params: &[AdamWParam],
        hp: AdamW,
        loss: &Tensor,
        clip: Option<f64>,
    ) -> Result<Tensor> {
        adamw::adamw_step_guarded(params, hp, loss, clip)
    }

    fn global_norm(&self, tensors: &[&Tensor]) -> Result<f64> {
        let wide = tensors.iter().map(|t| widen(t)).collect::<Result<Vec<_>>>()?;
        adamw::global_norm(&wide.iter().collect::<Vec<_>>())
    }
}
