//! Differentiable ops on the tape. Each forwards to the backend's forward op and records the
//! backend's backward op with the tensors it needs.

use crate::params::grad_dtype;
use crate::tape::{BackwardCtx, Tape, Var};
use crate::{Error, Result};
use steel_runtime::{Backend, CrossEntropy, ExpertWeights, Matmul, Tensor, Transpose};

/// Options of the fused lm_head + cross-entropy loss.
#[derive(Clone, Copy, Debug)]
pub struct LossOptions {
    pub ce: CrossEntropy,
    /// The loss is `Σ nll / normalizer`. `None` means the number of counted targets of this
    /// call (or 1 when there are none); the trainer passes the count of the whole global batch
    /// so that micro-batches and ranks add up to the token-weighted mean.
    pub normalizer: Option<f64>,
    /// The number of counted targets of this call when the caller knows it (counted on the
    /// host): a GPU backend then counts and reads back nothing (`lm_head_ce_fwd_counted`).
    pub count: Option<usize>,
}

fn one(v: Vec<Var>) -> Var {
    v[0]
}

fn flip(t: Transpose) -> Transpose {
    match t {
        Transpose::No => Transpose::Yes,
        Transpose::Yes => Transpose::No,
    }
}

/// `dA += alpha · dC · op(B)ᵀ` (as stored: `op(B) · dCᵀ` when A is stored transposed). When A
/// was broadcast over B's batch, `matmul_into` sums the batch products into the 2-D `dA`.
fn matmul_grad_a(
    be: &dyn Backend,
    spec: Matmul,
    b: &Tensor,
    dc: &Tensor,
    da: &Tensor,
) -> Result<()> {
    let grad = |ta, tb| Matmul { trans_a: ta, trans_b: tb, alpha: spec.alpha, beta: 1.0 };
    if spec.trans_a == Transpose::No {
        be.matmul_into(dc, b, grad(Transpose::No, flip(spec.trans_b)), da)?;
    } else {
        be.matmul_into(b, dc, grad(spec.trans_b, Transpose::Yes), da)?;
    }
    Ok(())
}

/// `dB += alpha · op(A)ᵀ · dC` (as stored: `dCᵀ · op(A)` when B is stored transposed), summed
/// over the batch when B was broadcast.
fn matmul_grad_b(
    be: &dyn Backend,
    spec: Matmul,
    a: &Tensor,
    dc: &Tensor,
    db: &Tensor,
) -> Result<()> {
    let grad = |ta, tb| Matmul { trans_a: ta, trans_b: tb, alpha: spec.alpha, beta: 1.0 };
    if spec.trans_b == Transpose::No {
        be.matmul_into(a, dc, grad(flip(spec.trans_a), Transpose::No), db)?;
    } else {
        be.matmul_into(dc, a, grad(Transpose::Yes, spec.trans_a), db)?;
    }
    Ok(())
}

fn batch_of(t: &Tensor) -> usize {
    t.shape()[..t.dims().saturating_sub(2)].iter().product()
}

impl Tape {
    /// `alpha · op(a) · op(b) (+ bias)`, batched as `Backend::matmul`.
    pub fn matmul(&mut self, a: Var, b: Var, bias: Option<Var>, spec: Matmul) -> Result<Var> {
        self.matmul_to(a, b, bias, spec, None)
    }

    /// `matmul` with the output dtype `out` (`None`: the operands'; bf16 operands may give an F32
    /// output, the dtype table's "bf16 × bf16 → f32"). The backward casts the F32 output gradient
    /// to the operands' dtype for the dgrad and wgrad GEMMs (bf16 × bf16 → F32 gradients).
    pub fn matmul_to(
        &mut self,
        a: Var,
        b: Var,
        bias: Option<Var>,
        spec: Matmul,
        out: Option<steel_runtime::DType>,
    ) -> Result<Var> {
        let (at, bt) = (self.value(a)?.clone(), self.value(b)?.clone());
        let biast = match bias {
            Some(v) => Some(self.value(v)?.clone()),
            None => None,
        };
        let spec = Matmul { beta: 0.0, ..spec };
        let out = self.backend().matmul(&at, &bt, biast.as_ref(), spec, out)?;
        let mut inputs = vec![a, b];
        inputs.extend(bias);
        let has_bias = bias.is_some();
        self.record("matmul", &inputs, vec![out], move |ctx: &mut BackwardCtx<'_>| {
            let Some(dc32) = ctx.out_grad(0).cloned() else { return Ok(()) };
            let dc32 = dc32.reshape(&matmul_out_shape(&at, &bt, spec))?;
            let dc = if dc32.dtype() == at.dtype() || !(ctx.needs(0) || ctx.needs(1)) {
                dc32.clone()
            } else {
                ctx.backend().cast(&dc32, at.dtype())?
            };
            if ctx.needs(0) {
                let da = ctx.grad(0)?;
                matmul_grad_a(ctx.backend(), spec, &bt, &dc, &da)?;
            }
            if ctx.needs(1) {
                let db = ctx.grad(1)?;
                matmul_grad_b(ctx.backend(), spec, &at, &dc, &db)?;
            }
            if has_bias && ctx.needs(2) {
                let dbias = ctx.grad(2)?;
                ctx.backend().sum_rows_into(&dc32, &dbias)?;
            }
            Ok(())
        })
        .map(one)
    }

    /// A Linear layer: `x [.., in] · wᵀ (+ bias)` with `w [out, in]` (HF layout).
    pub fn linear(&mut self, x: Var, w: Var, bias: Option<Var>) -> Result<Var> {
        self.linear_to(x, w, bias, None)
    }

    /// `linear` with the output dtype `out` (see `matmul_to`).
    pub fn linear_to(
        &mut self,
        x: Var,
        w: Var,
        bias: Option<Var>,
        out: Option<steel_runtime::DType>,
    ) -> Result<Var> {
        let xs = self.value(x)?.shape().to_vec();
        let inner = *xs.last().ok_or_else(|| Error::Tape("linear: x has no axes".into()))?;
        let rows = xs[..xs.len() - 1].iter().product();
        let x2 = self.reshape(x, &[rows, inner])?;
        let y = self.matmul_to(x2, w, bias, Matmul::NT, out)?;
        let out = self.value(y)?.shape()[1];
        let mut ys = xs[..xs.len() - 1].to_vec();
        ys.push(out);
        self.reshape(y, &ys)
    }

    /// The same values under another shape.
    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Result<Var> {
        let out = self.value(x)?.reshape(shape)?;
        self.record("reshape", &[x], vec![out], |ctx| {
            let dy = ctx.out_grad(0).cloned();
            if let Some(dy) = dy {
                let dx = ctx.grad(0)?;
                ctx.backend().add_assign(&dx, &dy)?;
            }
            Ok(())
        })
        .map(one)
    }

    /// `x` in `dtype` (F32 ↔ BF16, round to nearest even); the identity when it already is. The
    /// gradient passes through unchanged (gradients are F32 whatever the value's dtype).
    pub fn cast(&mut self, x: Var, dtype: steel_runtime::DType) -> Result<Var> {
        if self.value(x)?.dtype() == dtype {
            return Ok(x);
        }
        let out = self.backend().cast(self.value(x)?, dtype)?;
        self.record("cast", &[x], vec![out], |ctx| {
            if let Some(dy) = ctx.out_grad(0).cloned() {
                let dx = ctx.grad(0)?;
                ctx.backend().add_assign(&dx, &dy)?;
            }
            Ok(())
        })
        .map(one)
    }

    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let out = self.backend().add(self.value(a)?, self.value(b)?)?;
        self.record("add", &[a, b], vec![out], |ctx| {
            if let Some(dy) = ctx.out_grad(0).cloned() {
                for i in 0..2 {
                    if ctx.needs(i) {
                        let d = ctx.grad(i)?;
                        ctx.backend().add_assign(&d, &dy)?;
                    }
                }
            }
            Ok(())
        })
        .map(one)
    }

    /// `alpha · x` for a constant alpha.
    pub fn scale(&mut self, x: Var, alpha: f64) -> Result<Var> {
        let out = self.backend().scale(self.value(x)?, alpha)?;
        self.record("scale", &[x], vec![out], move |ctx| {
            if let Some(dy) = ctx.out_grad(0).cloned() {
                let dx = ctx.grad(0)?;
                let t = ctx.backend().scale(&dy, alpha)?;
                ctx.backend().add_assign(&dx, &t)?;
            }
            Ok(())
        })
        .map(one)
    }

    /// `s · x` with a learned one-element `s`.
    pub fn scale_by(&mut self, x: Var, s: Var) -> Result<Var> {
        let (xt, st) = (self.value(x)?.clone(), self.value(s)?.clone());
        let out = self.backend().scale_by_fwd(&xt, &st)?;
        self.record("scale_by", &[x, s], vec![out], move |ctx| {
            let dy = ctx.out_grad_or_zeros(0, &xt)?;
            let (dx, ds) = (ctx.grad(0)?, ctx.grad(1)?);
            ctx.backend().scale_by_bwd(&xt, &st, &dy, &dx, &ds)?;
            Ok(())
        })
        .map(one)
    }

    /// `silu(a) ⊙ b`.
    pub fn swiglu(&mut self, a: Var, b: Var) -> Result<Var> {
        let (at, bt) = (self.value(a)?.clone(), self.value(b)?.clone());
        let out = self.backend().swiglu_fwd(&at, &bt)?;
        self.record("swiglu", &[a, b], vec![out], move |ctx| {
            let dy = ctx.out_grad_or_zeros(0, &at)?;
            let (da, db) = (ctx.grad(0)?, ctx.grad(1)?);
            ctx.backend().swiglu_bwd(&at, &bt, &dy, &da, &db)?;
            Ok(())
        })
        .map(one)
    }

    /// `[A, B, C] → [B, A, C]` (2-D: a transpose).
    pub fn transpose01(&mut self, x: Var) -> Result<Var> {
        let out = self.backend().transpose01(self.value(x)?)?;
        self.record("transpose01", &[x], vec![out], |ctx| {
            if let Some(dy) = ctx.out_grad(0).cloned() {
                let dx = ctx.grad(0)?;
                let t = ctx.backend().transpose01(&dy)?;
                ctx.backend().add_assign(&dx, &t)?;
            }
            Ok(())
        })
        .map(one)
    }

    /// Rows `start .. start + len` of the first axis.
    pub fn slice0(&mut self, x: Var, start: usize, len: usize) -> Result<Var> {
        let out = self.backend().slice0(self.value(x)?, start, len)?;
        self.record("slice0", &[x], vec![out], move |ctx| {
            if let Some(dy) = ctx.out_grad(0).cloned() {
                let dx = ctx.grad(0)?;
                ctx.backend().slice0_bwd(&dy, &dx, start)?;
            }
            Ok(())
        })
        .map(one)
    }

    /// Concatenation along the first axis.
    pub fn concat0(&mut self, parts: &[Var]) -> Result<Var> {
        let ts: Vec<Tensor> =
            parts.iter().map(|&v| self.value(v).cloned()).collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = ts.iter().collect();
        let out = self.backend().concat0(&refs)?;
        let rows: Vec<usize> = ts.iter().map(|t| t.shape()[0]).collect();
        self.record("concat0", parts, vec![out], move |ctx| {
            if let Some(dy) = ctx.out_grad(0).cloned() {
                let mut start = 0;
                for (i, &r) in rows.iter().enumerate() {
                    if ctx.needs(i) {
                        let part = ctx.backend().slice0(&dy, start, r)?;
                        let dx = ctx.grad(i)?;
                        ctx.backend().add_assign(&dx, &part)?;
                    }
                    start += r;
                }
            }
            Ok(())
        })
        .map(one)
    }

    /// Rows of `table [V, H]` for the integer `ids` (not differentiable).
    pub fn embedding(&mut self, ids: &Tensor, table: Var) -> Result<Var> {
        self.embedding_impl(ids, table, false)
    }

    /// `embedding` for ids the caller has checked to lie in `0..V` on the host: forward and
    /// backward read nothing back from a GPU (`Backend::embedding_fwd_prechecked`).
    pub fn embedding_prechecked(&mut self, ids: &Tensor, table: Var) -> Result<Var> {
        self.embedding_impl(ids, table, true)
    }

    fn embedding_impl(&mut self, ids: &Tensor, table: Var, prechecked: bool) -> Result<Var> {
        let t = self.value(table)?;
        let out = if prechecked {
            self.backend().embedding_fwd_prechecked(ids, t)?
        } else {
            self.backend().embedding_fwd(ids, t)?
        };
        let ids = ids.clone();
        self.record("embedding", &[table], vec![out], move |ctx| {
            if let Some(dy) = ctx.out_grad(0).cloned() {
                let dt = ctx.grad(0)?;
                if prechecked {
                    ctx.backend().embedding_bwd_prechecked(&ids, &dy, &dt)?;
                } else {
                    ctx.backend().embedding_bwd(&ids, &dy, &dt)?;
                }
            }
            Ok(())
        })
        .map(one)
    }

    /// RMSNorm over the last axis.
    pub fn rms_norm(&mut self, x: Var, w: Var, eps: f64) -> Result<Var> {
        let (xt, wt) = (self.value(x)?.clone(), self.value(w)?.clone());
        let (y, rstd) = self.backend().rms_norm_fwd(&xt, &wt, eps)?;
        self.record("rms_norm", &[x, w], vec![y], move |ctx| {
            let dy = ctx.out_grad_or_zeros(0, &xt)?;
            let (dx, dw) = (ctx.grad(0)?, ctx.grad(1)?);
            ctx.backend().rms_norm_bwd(&xt, &wt, &rstd, &dy, &dx, &dw)?;
            Ok(())
        })
        .map(one)
    }

    /// The residual add fused with RMSNorm: returns `(x + r, rms_norm(x + r))`.
    pub fn add_rms_norm(&mut self, x: Var, r: Var, w: Var, eps: f64) -> Result<(Var, Var)> {
        let (xt, rt, wt) = (self.value(x)?.clone(), self.value(r)?, self.value(w)?.clone());
        let (sum, y, rstd) = self.backend().add_rms_norm_fwd(&xt, rt, &wt, eps)?;
        let saved = sum.clone();
        let outs = self.record("add_rms_norm", &[x, r, w], vec![sum, y], move |ctx| {
            let dsum = ctx.out_grad(0).cloned();
            let dy = ctx.out_grad_or_zeros(1, &saved)?;
            let (dx, dr, dw) = (ctx.grad(0)?, ctx.grad(1)?, ctx.grad(2)?);
            ctx.backend().add_rms_norm_bwd(
                &saved,
                &wt,
                &rstd,
                &dy,
                dsum.as_ref(),
                &dx,
                &dr,
                &dw,
            )?;
            Ok(())
        })?;
        Ok((outs[0], outs[1]))
    }

    /// `x / max(‖x‖₂, eps)` along `axis`.
    pub fn l2_normalize(&mut self, x: Var, axis: usize, eps: f64) -> Result<Var> {
        let (y, norm) = self.backend().l2_normalize_fwd(self.value(x)?, axis, eps)?;
        let ys = y.clone();
        self.record("l2_normalize", &[x], vec![y], move |ctx| {
            if let Some(dy) = ctx.out_grad(0).cloned() {
                let dx = ctx.grad(0)?;
                ctx.backend().l2_normalize_bwd(&ys, &norm, &dy, axis, eps, &dx)?;
            }
            Ok(())
        })
        .map(one)
    }

    /// Softmax along `axis`.
    pub fn softmax(&mut self, x: Var, axis: usize) -> Result<Var> {
        let y = self.backend().softmax_fwd(self.value(x)?, axis)?;
        let ys = y.clone();
        self.record("softmax", &[x], vec![y], move |ctx| {
            if let Some(dy) = ctx.out_grad(0).cloned() {
                let dx = ctx.grad(0)?;
                ctx.backend().softmax_bwd(&ys, &dy, axis, &dx)?;
            }
            Ok(())
        })
        .map(one)
    }

    /// The soft-MoE routing of `x [B, T, d]` with slot parameters `phi [d, S]` and the learned
    /// `scale [1]` (see `Backend::soft_moe_route_fwd`). Returns `(xn, dispatch, combine)`:
    /// the normalised tokens `[B, T, d]` and the two routing weight matrices `[B, T, S]`.
    pub fn soft_moe_route(
        &mut self,
        x: Var,
        phi: Var,
        scale: Var,
        eps: f64,
    ) -> Result<(Var, Var, Var)> {
        let (pt, st) = (self.value(phi)?.clone(), self.value(scale)?.clone());
        let route = self.backend().soft_moe_route_fwd(self.value(x)?, &pt, &st, eps)?;
        let saved = route.clone();
        let outs = self.record(
            "soft_moe_route",
            &[x, phi, scale],
            vec![route.xn, route.dispatch, route.combine],
            move |ctx| {
                let g_xn = ctx.out_grad_or_zeros(0, &saved.xn)?;
                let g_d = ctx.out_grad_or_zeros(1, &saved.dispatch)?;
                let g_c = ctx.out_grad_or_zeros(2, &saved.combine)?;
                let (dx, dphi, dscale) = (ctx.grad(0)?, ctx.grad(1)?, ctx.grad(2)?);
                ctx.backend().soft_moe_route_bwd(
                    &saved, &pt, &st, &g_xn, &g_d, &g_c, eps, &dx, &dphi, &dscale,
                )?;
                Ok(())
            },
        )?;
        Ok((outs[0], outs[1], outs[2]))
    }

    /// The soft-MoE slot inputs `Dᵀ X̂ [B, S, d]` of `dispatch [B, T, S]` and `xn [B, T, d]`.
    pub fn soft_moe_dispatch(&mut self, dispatch: Var, xn: Var) -> Result<Var> {
        let (wt, xt) = (self.value(dispatch)?.clone(), self.value(xn)?.clone());
        let out = self.backend().soft_moe_dispatch_fwd(&wt, &xt)?;
        self.record("soft_moe_dispatch", &[dispatch, xn], vec![out], move |ctx| {
            if let Some(dy) = ctx.out_grad(0).cloned() {
                let (dw, dx) = (ctx.grad(0)?, ctx.grad(1)?);
                ctx.backend().soft_moe_dispatch_bwd(&wt, &xt, &dy, &dw, &dx)?;
            }
            Ok(())
        })
        .map(one)
    }

    /// The soft-MoE output `C Ỹ [B, T, d]` of `combine [B, T, S]` and the slot outputs
    /// `ys [B, S, d]`.
    pub fn soft_moe_combine(&mut self, combine: Var, ys: Var) -> Result<Var> {
        let (wt, yt) = (self.value(combine)?.clone(), self.value(ys)?.clone());
        let out = self.backend().soft_moe_combine_fwd(&wt, &yt)?;
        self.record("soft_moe_combine", &[combine, ys], vec![out], move |ctx| {
            if let Some(dy) = ctx.out_grad(0).cloned() {
                let (dw, dys) = (ctx.grad(0)?, ctx.grad(1)?);
                ctx.backend().soft_moe_combine_bwd(&wt, &yt, &dy, &dw, &dys)?;
            }
            Ok(())
        })
        .map(one)
    }

    /// All E double-SwiGLU experts on `x [E, R, d]` (see `Backend::experts_fwd`): `weights` are
    /// the per-expert `[gate_up, up, gate_down, down]` lists, E variables each.
    pub fn experts(&mut self, x: Var, weights: [&[Var]; 4]) -> Result<Var> {
        let e = weights[0].len();
        if weights.iter().any(|w| w.len() != e) {
            return Err(Error::Tape(format!(
                "experts: the four weight lists must have one variable per expert, got {:?}",
                weights.map(<[Var]>::len)
            )));
        }
        let mut inputs = vec![x];
        for w in weights {
            inputs.extend_from_slice(w);
        }
        let xt = self.value(x)?.clone();
        let wt: Vec<Tensor> =
            inputs[1..].iter().map(|&v| self.value(v).cloned()).collect::<Result<_>>()?;
        let split = move |ts: &[Tensor]| -> [Vec<Tensor>; 4] {
            std::array::from_fn(|k| ts[k * e..(k + 1) * e].to_vec())
        };
        let [gu, up, gd, dn] = split(&wt);
        let w = ExpertWeights { gate_up: &gu, up: &up, gate_down: &gd, down: &dn };
        let out = self.backend().experts_fwd(&xt, w)?;
        let y = out.y.clone();
        self.record("experts", &inputs, vec![y], move |ctx| {
            let Some(dy) = ctx.out_grad(0).cloned() else { return Ok(()) };
            let dx = ctx.grad(0)?;
            let grads: Vec<Tensor> = (1..=4 * e).map(|i| ctx.grad(i)).collect::<Result<_>>()?;
            let [dgu, dup, dgd, ddn] = split(&grads);
            let [gu, up, gd, dn] = split(&wt);
            let w = ExpertWeights { gate_up: &gu, up: &up, gate_down: &gd, down: &dn };
            let dw = ExpertWeights { gate_up: &dgu, up: &dup, gate_down: &dgd, down: &ddn };
            ctx.backend().experts_bwd(&xt, w, &out, &dy, &dx, dw)?;
            Ok(())
        })
        .map(one)
    }

    /// Rotary embedding on `[B, T, H, D]` at positions `pos_offset ..`.
    pub fn rope(&mut self, x: Var, theta: f64, pos_offset: usize) -> Result<Var> {
        let y = self.backend().rope_fwd(self.value(x)?, theta, pos_offset)?;
        self.record("rope", &[x], vec![y], move |ctx| {
            if let Some(dy) = ctx.out_grad(0).cloned() {
                let dx = ctx.grad(0)?;
                ctx.backend().rope_bwd(&dy, theta, pos_offset, &dx)?;
            }
            Ok(())
        })
        .map(one)
    }

    /// Causal attention on `[B, T, heads, D]` (see `Backend::attention_fwd`).
    pub fn attention(&mut self, q: Var, k: Var, v: Var, scale: f64) -> Result<Var> {
        let (qt, kt, vt) = (self.value(q)?.clone(), self.value(k)?.clone(), self.value(v)?.clone());
        let (o, lse) = self.backend().attention_fwd(&qt, &kt, &vt, scale)?;
        let ot = o.clone();
        self.record("attention", &[q, k, v], vec![o], move |ctx| {
            let d_o = ctx.out_grad_or_zeros(0, &ot)?;
            let (dq, dk, dv) = (ctx.grad(0)?, ctx.grad(1)?, ctx.grad(2)?);
            ctx.backend().attention_bwd(&qt, &kt, &vt, &ot, &lse, &d_o, scale, &dq, &dk, &dv)?;
            Ok(())
        })
        .map(one)
    }

    /// The lm_head projection fused with mean cross entropy: `x [N, H]`, `w [V, H]`, integer
    /// `targets [N]`. Returns the loss `[1]` and the number of counted targets.
    pub fn lm_head_ce(
        &mut self,
        x: Var,
        w: Var,
        targets: &Tensor,
        opts: LossOptions,
    ) -> Result<(Var, usize)> {
        let (xt, wt) = (self.value(x)?.clone(), self.value(w)?.clone());
        let needs_grad = self.grad_enabled() && (self.requires_grad(x) || self.requires_grad(w));
        if let (true, Some(norm)) = (needs_grad, opts.normalizer) {
            // Training with a known normalizer: one pass computes the loss and the gradients
            // for an upstream gradient of 1 (each logits chunk formed once, not twice);
            // backward scales them by the actual upstream gradient.
            if norm.is_nan() || norm <= 0.0 {
                return Err(Error::Tape(format!(
                    "lm_head_ce: the normalizer must be positive, got {norm}"
                )));
            }
            let gd = grad_dtype(xt.dtype());
            let dx = self.backend().zeros(xt.shape(), gd)?;
            let dw = self.backend().zeros(wt.shape(), gd)?;
            let out = self.backend().lm_head_ce_fwd_bwd(
                &xt,
                &wt,
                targets,
                1.0 / norm,
                opts.ce,
                opts.count,
                &dx,
                &dw,
            )?;
            let loss = self.backend().scale(&out.loss_sum, 1.0 / norm)?;
            let v = self.record("lm_head_ce", &[x, w], vec![loss], move |ctx| {
                if let Some(dl) = ctx.out_grad(0).cloned() {
                    // The upstream gradient: ones when the loss is the root (the trainer's
                    // case: nothing to scale), else read on the CPU or applied on the device
                    // (nothing is read back from a GPU).
                    let g = if ctx.out_grad_is_unit(0) {
                        Some(1.0)
                    } else if dl.device() == steel_runtime::Device::Cpu {
                        Some(dl.scalar()?)
                    } else {
                        None
                    };
                    for (i, d) in [(0, dx), (1, dw)] {
                        let d = match g {
                            Some(1.0) => d,
                            Some(g) => ctx.backend().scale(&d, g)?,
                            None => ctx.backend().scale_by_fwd(&d, &dl)?,
                        };
                        let target = ctx.grad(i)?;
                        ctx.backend().add_assign(&target, &d)?;
                    }
                }
                Ok(())
            })?;
            return Ok((v[0], out.count));
        }
        let out = match opts.count {
            Some(c) => self.backend().lm_head_ce_fwd_counted(&xt, &wt, targets, opts.ce, c)?,
            None => self.backend().lm_head_ce_fwd(&xt, &wt, targets, opts.ce)?,
        };
        let norm = opts.normalizer.unwrap_or(out.count.max(1) as f64);
        if norm.is_nan() || norm <= 0.0 {
            return Err(Error::Tape(format!(
                "lm_head_ce: the normalizer must be positive, got {norm}"
            )));
        }
        let loss = self.backend().scale(&out.loss_sum, 1.0 / norm)?;
        let (targets, lse, spec) = (targets.clone(), out.lse, opts.ce);
        let v = self.record("lm_head_ce", &[x, w], vec![loss], move |ctx| {
            if let Some(dl) = ctx.out_grad(0).cloned() {
                let (dx, dw) = (ctx.grad(0)?, ctx.grad(1)?);
                ctx.backend().lm_head_ce_bwd(
                    &xt,
                    &wt,
                    &targets,
                    &lse,
                    &dl,
                    1.0 / norm,
                    spec,
                    &dx,
                    &dw,
                )?;
            }
            Ok(())
        })?;
        Ok((v[0], out.count))
    }
}

fn matmul_out_shape(a: &Tensor, b: &Tensor, spec: Matmul) -> Vec<usize> {
    let (sa, sb) = (a.shape(), b.shape());
    let m = if spec.trans_a == Transpose::Yes { sa[sa.len() - 1] } else { sa[sa.len() - 2] };
    let n = if spec.trans_b == Transpose::Yes { sb[sb.len() - 2] } else { sb[sb.len() - 1] };
    let lead = if batch_of(a) >= batch_of(b) { &sa[..sa.len() - 2] } else { &sb[..sb.len() - 2] };
    let mut s = lead.to_vec();
    s.extend([m, n]);
    s
}
