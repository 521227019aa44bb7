//! The `Backend` trait: Steel's complete op set, as explicit forward/backward pairs.
//!
//! Conventions (every backend, every op):
//! - Forward ops are functional: they return new tensors on the backend's device.
//! - **Backward ops accumulate**: every gradient buffer passed in (`dx`, `dw`, …) receives `+=`.
//!   The caller (the tape) zero-initialises a buffer before its first use, so a tensor used twice
//!   simply gets both contributions, and gradient accumulation across micro-batches is free.
//! - Inputs are contiguous and row-major; no op takes strides. Layout changes are explicit ops
//!   (`transpose01`, `slice0`, `concat0`) or GEMM transpose flags.
//! - Activation layouts: tokens are `[batch, seq, …]`; attention tensors are `[B, T, heads, D]`
//!   (the layout the QKV projection produces), so no transposes surround attention.
//! - Dtypes (the table in docs/ARCHITECTURE.md, "GPU dtype policy"): float ops accept `F32`,
//!   `F64` on the CPU (gradient checks), and `BF16` values wherever the GPU's bf16 mixed
//!   precision has them — `add`, `add_assign`, `scale`, `scale_by`, `swiglu`, `softmax`,
//!   `l2_normalize`, `rope`, `sum_rows_into`'s input, the layout ops, `embedding`'s table,
//!   `matmul`, `lm_head_ce`'s `x`/`w`, `global_norm`, `cast`, `adamw_step`'s copy. BF16 values
//!   are computed in f32 and a BF16 result is rounded once to nearest even. A forward output has
//!   its value inputs' dtype; statistics (rstd, lse, norms, losses) are F32 (F64 for F64 inputs).
//!   Backward ops take saved values in their forward dtype and F32 gradients (`dy`, and every
//!   accumulated `dx`): activation and parameter gradients are F32 on every backend.
//! - Reductions are deterministic: no result depends on the number of threads or on scheduling.

use crate::{DType, Device, Result, Tensor};

/// Whether a GEMM operand is used as stored or transposed (its last two axes swapped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transpose {
    No,
    Yes,
}

/// `out = alpha · op(a) · op(b) (+ bias) (+ beta · out)` — the GEMM epilogue options.
#[derive(Clone, Copy, Debug)]
pub struct Matmul {
    pub trans_a: Transpose,
    pub trans_b: Transpose,
    pub alpha: f32,
    /// Only used by `matmul_into`: the factor on the existing contents of `out`.
    pub beta: f32,
}

impl Matmul {
    /// `a · b`.
    pub const NN: Matmul =
        Matmul { trans_a: Transpose::No, trans_b: Transpose::No, alpha: 1.0, beta: 0.0 };
    /// `a · bᵀ` (a Linear layer with `b` = weight `[out, in]`).
    pub const NT: Matmul =
        Matmul { trans_a: Transpose::No, trans_b: Transpose::Yes, alpha: 1.0, beta: 0.0 };
    /// `aᵀ · b` (weight gradients).
    pub const TN: Matmul =
        Matmul { trans_a: Transpose::Yes, trans_b: Transpose::No, alpha: 1.0, beta: 0.0 };

    /// The same product, accumulated into the output (`beta = 1`).
    pub const fn accumulate(self) -> Matmul {
        Matmul { beta: 1.0, ..self }
    }
}

/// Options of the fused lm_head projection + cross entropy.
#[derive(Clone, Copy, Debug)]
pub struct CrossEntropy {
    /// Targets equal to this are not counted (no loss, no gradient).
    pub ignore_index: i64,
    /// Tokens per chunk: at most `chunk_tokens × vocab` logits exist at once.
    pub chunk_tokens: usize,
}

/// What `lm_head_ce_fwd` returns.
#[derive(Clone, Debug)]
pub struct CrossEntropyOut {
    /// `[1]`: the SUM of the negative log-likelihoods of the counted targets.
    pub loss_sum: Tensor,
    /// `[N]`: the log-sum-exp of each token's logits (0 for ignored tokens), saved for backward.
    pub lse: Tensor,
    /// The number of counted (not ignored) targets.
    pub count: usize,
}

/// What `soft_moe_route_fwd` returns (DESIGN §1): the normalised tokens, the two routing weight
/// matrices, and the norms its backward reads. `S` is the number of slots (`n_experts ·
/// slots_per_expert`).
#[derive(Clone, Debug)]
pub struct SoftMoeRoute {
    /// `[B, T, d]`: `X̂ = X / max(‖X‖, eps)` per token.
    pub xn: Tensor,
    /// `[B, T]`: `‖X‖` per token.
    pub x_norm: Tensor,
    /// `[S]`: `‖Φ_s‖` per slot column of `phi [d, S]`.
    pub phi_norm: Tensor,
    /// `[B, T, S]`: `D`, the softmax of the logits `L = X̂ Φ̂` over the T tokens of each row.
    pub dispatch: Tensor,
    /// `[B, T, S]`: `C`, the softmax of `L` over the S slots of each token.
    pub combine: Tensor,
}

/// The weights (or, for `experts_bwd`, the F32 gradients) of E double-SwiGLU experts: each
/// slice holds one tensor per expert, in expert order. `gate_up` and `up` are `[f, d]`,
/// `gate_down` and `down` `[d, f]` (HF Linear layout, `f = d / mlp_div_ratio`).
#[derive(Clone, Copy, Debug)]
pub struct ExpertWeights<'a> {
    pub gate_up: &'a [Tensor],
    pub up: &'a [Tensor],
    pub gate_down: &'a [Tensor],
    pub down: &'a [Tensor],
}

/// What `experts_fwd` returns: the output and the activations its backward reads, all in the
/// value dtype. For expert e and row r: `a1 = x W_gate_upᵀ`, `b1 = x W_upᵀ`,
/// `u = silu(a1) ⊙ b1`, `a2 = u W_gate_downᵀ`, `b2 = u W_downᵀ`, `y = silu(a2) ⊙ b2`.
#[derive(Clone, Debug)]
pub struct ExpertsOut {
    /// `[E, R, d]`.
    pub y: Tensor,
    /// `[E, R, f]`.
    pub a1: Tensor,
    /// `[E, R, f]`.
    pub b1: Tensor,
    /// `[E, R, f]`: the inner activation (the second stage's input, as stored).
    pub u: Tensor,
    /// `[E, R, d]`.
    pub a2: Tensor,
    /// `[E, R, d]`.
    pub b2: Tensor,
}

/// One parameter of a multi-tensor AdamW step. All buffers are updated in place.
#[derive(Clone, Debug)]
pub struct AdamWParam {
    /// fp32 master weights.
    pub param: Tensor,
    /// fp32 gradient (read only).
    pub grad: Tensor,
    /// fp32 first moment.
    pub m: Tensor,
    /// fp32 second moment.
    pub v: Tensor,
    /// Decoupled weight decay for this tensor (0 for none).
    pub weight_decay: f32,
    /// Optional bf16 copy of the updated weights, written in the same pass.
    pub copy: Option<Tensor>,
}

/// The verdict of a training step from its loss and global gradient norm: `(factor, skipped)`.
/// Skipped when either is not finite (factor 0); else the clip factor `clip / norm` when
/// `norm > clip`, or 1 (no `clip`, or `clip ≤ 0`: no clipping). `adamw_guard_f64` computes the
/// same in f64 on a GPU.
pub fn step_verdict(loss: f64, norm: f64, clip: Option<f64>) -> (f64, bool) {
    if !(loss.is_finite() && norm.is_finite()) {
        return (0.0, true);
    }
    match clip {
        Some(c) if c > 0.0 && norm > c => (c / norm, false),
        _ => (1.0, false),
    }
}

/// Hyper-parameters of one AdamW step (PyTorch `torch.optim.AdamW` semantics).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1-based step count, for bias correction.
    pub step: u64,
    /// Every gradient is multiplied by this first (global-norm clipping, loss scaling).
    pub grad_scale: f32,
}

/// The op set. See the module docs for the conventions every implementation follows.
pub trait Backend: Send + Sync {
    /// The device this backend computes on.
    fn device(&self) -> Device;

    /// A short human-readable name ("cpu", "cuda:0 (H200)", "emu").
    fn name(&self) -> String;

    // ---- memory ------------------------------------------------------------------------------

    /// A zero-filled tensor on this device.
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor>;
    /// Sets every element of `t` to `value` (used to poison outputs in tests, and to zero).
    fn fill(&self, t: &Tensor, value: f64) -> Result<()>;
    /// Copies a CPU tensor to this device.
    fn upload(&self, host: &Tensor) -> Result<Tensor>;
    /// Copies a tensor of this device to the CPU.
    fn download(&self, t: &Tensor) -> Result<Tensor>;
    /// A new tensor with the same contents.
    fn copy(&self, t: &Tensor) -> Result<Tensor>;
    /// A new tensor of `dtype` (floats round to nearest even; float→int truncates toward zero).
    fn cast(&self, t: &Tensor, dtype: DType) -> Result<Tensor>;
    /// Waits until all queued work has finished.
    fn synchronize(&self) -> Result<()>;

    // ---- elementwise ------------------------------------------------------------------------

    /// `a + b` (same shape).
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    /// `dst += src` (same shape), in place.
    fn add_assign(&self, dst: &Tensor, src: &Tensor) -> Result<()>;
    /// `alpha · x`.
    fn scale(&self, x: &Tensor, alpha: f64) -> Result<Tensor>;
    /// `s · x` with a learned one-element tensor `s`.
    fn scale_by_fwd(&self, x: &Tensor, s: &Tensor) -> Result<Tensor>;
    /// Backward of `scale_by`: `dx += s · dy`, `ds += Σ x ⊙ dy`.
    fn scale_by_bwd(
        &self,
        x: &Tensor,
        s: &Tensor,
        dy: &Tensor,
        dx: &Tensor,
        ds: &Tensor,
    ) -> Result<()>;
    /// `silu(a) ⊙ b` with `silu(a) = a · σ(a)`.
    fn swiglu_fwd(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    /// Backward of `swiglu`: `da += dy ⊙ b ⊙ silu'(a)`, `db += dy ⊙ silu(a)`.
    fn swiglu_bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
        da: &Tensor,
        db: &Tensor,
    ) -> Result<()>;

    // ---- layout -----------------------------------------------------------------------------

    /// `[A, B, C] → [B, A, C]` (a 2-D transpose when `C = 1`). Its own backward.
    fn transpose01(&self, x: &Tensor) -> Result<Tensor>;
    /// Rows `start .. start + len` of the first axis, as a new tensor.
    fn slice0(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor>;
    /// `dst[start .. start + src.shape[0]] += src` along the first axis (backward of `slice0` and
    /// of `concat0`).
    fn slice0_bwd(&self, dy: &Tensor, dx: &Tensor, start: usize) -> Result<()>;
    /// Concatenation along the first axis.
    fn concat0(&self, parts: &[&Tensor]) -> Result<Tensor>;

    // ---- linear algebra ---------------------------------------------------------------------

    /// `alpha · op(a) · op(b) + bias`. `a` is `[…, m, k]` (`[…, k, m]` transposed), `b` is
    /// `[…, k, n]` (`[…, n, k]` transposed); leading axes are batch axes, and a batch of one on
    /// either side is broadcast. `bias` is `[n]`. The result has dtype `out` (default: `a`'s).
    fn matmul(
        &self,
        a: &Tensor,
        b: &Tensor,
        bias: Option<&Tensor>,
        spec: Matmul,
        out: Option<DType>,
    ) -> Result<Tensor>;
    /// `out = alpha · op(a) · op(b) + beta · out`, in place (weight gradients with `beta = 1`).
    /// When the product is batched but `out` has no batch axis (`out` holds one `[m, n]`
    /// matrix, e.g. the gradient of a weight broadcast over the batch), the batch products are
    /// summed into `out` in batch order (`beta` applies once).
    fn matmul_into(&self, a: &Tensor, b: &Tensor, spec: Matmul, out: &Tensor) -> Result<()>;
    /// `out[c] += Σ_r x[r, c]` over all leading axes (bias gradients).
    fn sum_rows_into(&self, x: &Tensor, out: &Tensor) -> Result<()>;

    // ---- embedding --------------------------------------------------------------------------

    /// Rows of `table [V, H]` selected by integer `ids [...]`: `[..., H]`.
    fn embedding_fwd(&self, ids: &Tensor, table: &Tensor) -> Result<Tensor>;
    /// `dtable[ids[i]] += dy[i]`, accumulated per row in token order (deterministic).
    fn embedding_bwd(&self, ids: &Tensor, dy: &Tensor, dtable: &Tensor) -> Result<()>;
    /// `embedding_fwd` for ids the caller has checked to lie in `0..V` (the model checks them on
    /// the host as it builds the batch): a GPU backend then reads nothing back, so the call does
    /// not synchronise. An invalid id still never reads outside the table (its row is left
    /// unwritten). The default (the CPU) is `embedding_fwd`, which checks.
    fn embedding_fwd_prechecked(&self, ids: &Tensor, table: &Tensor) -> Result<Tensor> {
        self.embedding_fwd(ids, table)
    }
    /// `embedding_bwd` for prechecked ids (see `embedding_fwd_prechecked`): nothing read back;
    /// an invalid id's row is never written.
    fn embedding_bwd_prechecked(&self, ids: &Tensor, dy: &Tensor, dtable: &Tensor) -> Result<()> {
        self.embedding_bwd(ids, dy, dtable)
    }

    // ---- normalisation ----------------------------------------------------------------------

    /// RMSNorm over the last axis: `y = w ⊙ x · rstd`, `rstd = 1/sqrt(mean(x²) + eps)`.
    /// Returns `(y, rstd [...])`.
    fn rms_norm_fwd(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)>;
    /// Backward of RMSNorm given the saved `rstd`: `dx += …`, `dw += Σ dy ⊙ x · rstd`.
    fn rms_norm_bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
        dx: &Tensor,
        dw: &Tensor,
    ) -> Result<()>;
    /// The residual add fused with RMSNorm: `sum = x + r`, `y = rms_norm(sum)`.
    /// Returns `(sum, y, rstd)`.
    fn add_rms_norm_fwd(
        &self,
        x: &Tensor,
        r: &Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)>;
    /// Backward of `add_rms_norm`: with `g = dsum + rms_norm_bwd(dy)`, `dx += g`, `dr += g`,
    /// `dw += …`. `dsum` is the gradient that reached `sum` directly (the residual stream), if any.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;
    /// `y = x / max(‖x‖₂, eps)` along `axis` (torch `F.normalize`). Returns `(y, norm)` where
    /// `norm` has `x`'s shape without `axis`.
    fn l2_normalize_fwd(&self, x: &Tensor, axis: usize, eps: f64) -> Result<(Tensor, Tensor)>;
    /// Backward of `l2_normalize` from the saved `y` and `norm`.
    fn l2_normalize_bwd(
        &self,
        y: &Tensor,
        norm: &Tensor,
        dy: &Tensor,
        axis: usize,
        eps: f64,
        dx: &Tensor,
    ) -> Result<()>;

    // ---- softmax ----------------------------------------------------------------------------

    /// Softmax along `axis` (the last axis for the combine weights, the token axis for the
    /// soft-MoE dispatch weights), with max subtraction.
    fn softmax_fwd(&self, x: &Tensor, axis: usize) -> Result<Tensor>;
    /// `dx += y ⊙ (dy − Σ_axis y ⊙ dy)`.
    fn softmax_bwd(&self, y: &Tensor, dy: &Tensor, axis: usize, dx: &Tensor) -> Result<()>;

    // ---- position encoding and attention ----------------------------------------------------

    /// Rotary embedding on `x [B, T, H, D]` in the rotate_half layout (dimension j pairs with
    /// j + D/2), angles `(t + pos_offset) · theta^(−2j/D)` computed in f32.
    fn rope_fwd(&self, x: &Tensor, theta: f64, pos_offset: usize) -> Result<Tensor>;
    /// The inverse rotation: `dx += Rᵀ dy`.
    fn rope_bwd(&self, dy: &Tensor, theta: f64, pos_offset: usize, dx: &Tensor) -> Result<()>;
    /// Causal attention. `q [B, Tq, Hq, D]`, `k, v [B, Tk, Hkv, D]` with `Tq ≤ Tk`, `Hkv | Hq`;
    /// query i sits at position `Tk − Tq + i` and sees keys `0 ..= Tk − Tq + i` (KV-cache
    /// decoding is `Tq < Tk`). Query head h reads KV head `h / (Hq / Hkv)`.
    /// Returns `(o [B, Tq, Hq, D], lse [B, Hq, Tq])` where lse is the log-sum-exp of the scaled
    /// scores.
    fn attention_fwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> Result<(Tensor, Tensor)>;
    /// Backward of attention from the saved output and lse: `dq, dk, dv += …`.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;

    // ---- loss ---------------------------------------------------------------------------------

    /// The lm_head projection fused with softmax cross entropy: for `x [N, H]`, `w [V, H]`,
    /// integer `targets [N]`, the logits `x wᵀ` are formed `chunk_tokens` rows at a time and
    /// never exist whole.
    fn lm_head_ce_fwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        spec: CrossEntropy,
    ) -> Result<CrossEntropyOut>;
    /// Backward: with `g = dloss[0] · scale`, `dlogits = g · (softmax − onehot)` on counted
    /// rows (0 on ignored ones), `dx += dlogits · w`, `dw += dlogitsᵀ · x`. `scale` is usually
    /// 1 / (number of counted targets of the whole batch).
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;
    /// `lm_head_ce_fwd` when the caller already knows `count`, the number of counted targets
    /// (the trainer counts them on the host as it builds the batch): a GPU backend then neither
    /// downloads nor counts anything, so the call does not synchronise. The targets are not
    /// validated on the host either: an invalid one never reaches memory out of bounds and
    /// makes its row's loss NaN. The returned `count` is `count`. The default (the CPU) runs
    /// `lm_head_ce_fwd` and checks that `count` is right.
    fn lm_head_ce_fwd_counted(
        &self,
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        spec: CrossEntropy,
        count: usize,
    ) -> Result<CrossEntropyOut> {
        let out = self.lm_head_ce_fwd(x, w, targets, spec)?;
        if out.count != count {
            return Err(crate::Error::invalid(
                "lm_head_ce_fwd_counted",
                format!("the caller's count {count} is not the {} counted targets", out.count),
            ));
        }
        Ok(out)
    }
    /// Forward and backward in one pass, for training where the loss's scale is known up front:
    /// the loss as `lm_head_ce_fwd`, and `dx += dlogits · w`, `dw += dlogitsᵀ · x` with
    /// `dlogits = scale · (softmax − onehot)` (as `lm_head_ce_bwd` with `dloss = 1`). Each chunk's
    /// logits are formed once instead of twice. The default runs the two halves.
    #[allow(clippy::too_many_arguments)]
    ///
    /// With `count` (the caller's number of counted targets) the forward half is
    /// `lm_head_ce_fwd_counted`: nothing is counted or read back on a GPU.
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
        let out = match count {
            Some(c) => self.lm_head_ce_fwd_counted(x, w, targets, spec, c)?,
            None => self.lm_head_ce_fwd(x, w, targets, spec)?,
        };
        let one = self.zeros(&[1], dx.dtype())?;
        self.fill(&one, 1.0)?;
        self.lm_head_ce_bwd(x, w, targets, &out.lse, &one, scale, spec, dx, dw)?;
        Ok(out)
    }

    // ---- soft mixture of experts (DESIGN §1) ------------------------------------------------

    /// The soft-MoE routing of `x [B, T, d]` with slot parameters `phi [d, S]` and the learned
    /// one-element `scale`: `X̂ = X / max(‖X‖, eps)` per token, `Φ̂ = scale · Φ / max(‖Φ‖, eps)`
    /// per slot column, `L = X̂ Φ̂`, `D` = softmax of L over the T tokens (per row and slot, not
    /// causal), `C` = softmax of L over the S slots (per token). Every value F32 (F64 on the
    /// CPU): the routing stays fp32 under bf16 mixed precision.
    fn soft_moe_route_fwd(
        &self,
        x: &Tensor,
        phi: &Tensor,
        scale: &Tensor,
        eps: f64,
    ) -> Result<SoftMoeRoute>;
    /// Backward of the routing from its saved outputs and the gradients of `xn`, `dispatch` and
    /// `combine` (zeros where none arrived): with `dL = D ⊙ (dD − Σ_t D ⊙ dD) + C ⊙ (dC −
    /// Σ_s C ⊙ dC)`, `dX̂ = d_xn + dL Φ̂ᵀ`, then `dx += ∂X̂/∂X · dX̂`, `dphi += ∂Φ̂/∂Φ · X̂ᵀ dL`
    /// (summed over every token of the batch) and `dscale += Σ (X̂ᵀ dL) ⊙ Φ / max(‖Φ‖, eps)`.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;
    /// The slot inputs `X̃ = Dᵀ X̂` per row: `dispatch [B, T, S]`, `xn [B, T, d]` → `[B, S, d]`
    /// (each slot a weighted sum over the row's T tokens, in a fixed order).
    fn soft_moe_dispatch_fwd(&self, dispatch: &Tensor, xn: &Tensor) -> Result<Tensor>;
    /// Backward of the dispatch mix: `d_dispatch += X̂ d_slotsᵀ`, `d_xn += D d_slots`.
    fn soft_moe_dispatch_bwd(
        &self,
        dispatch: &Tensor,
        xn: &Tensor,
        d_slots: &Tensor,
        d_dispatch: &Tensor,
        d_xn: &Tensor,
    ) -> Result<()>;
    /// The output `Y = C Ỹ` per row: `combine [B, T, S]`, slot outputs `ys [B, S, d]` →
    /// `[B, T, d]`.
    fn soft_moe_combine_fwd(&self, combine: &Tensor, ys: &Tensor) -> Result<Tensor>;
    /// Backward of the combine mix: `d_combine += dY Ỹᵀ`, `d_ys += Cᵀ dY` (a sum over the row's
    /// tokens in a fixed order).
    fn soft_moe_combine_bwd(
        &self,
        combine: &Tensor,
        ys: &Tensor,
        dy: &Tensor,
        d_combine: &Tensor,
        d_ys: &Tensor,
    ) -> Result<()>;
    /// All E double-SwiGLU ("senet") experts at once: expert e maps its R rows `x[e] [R, d]`
    /// through `u = silu(x W_gate_upᵀ) ⊙ (x W_upᵀ)` (d → f) and `y = silu(u W_gate_downᵀ) ⊙
    /// (u W_downᵀ)` (f → d). `x` and the weights share one dtype (F32 or BF16; F64 on the CPU);
    /// every output has it, and `u` is stored (rounded) before the second stage reads it.
    fn experts_fwd(&self, x: &Tensor, w: ExpertWeights<'_>) -> Result<ExpertsOut>;
    /// Backward of `experts_fwd` from its saved activations: `dx += …` and every weight
    /// gradient `+=` (F32; F64 for F64 values), `dy` F32.
    fn experts_bwd(
        &self,
        x: &Tensor,
        w: ExpertWeights<'_>,
        saved: &ExpertsOut,
        dy: &Tensor,
        dx: &Tensor,
        dw: ExpertWeights<'_>,
    ) -> Result<()>;

    // ---- optimizer ----------------------------------------------------------------------------

    /// One multi-tensor AdamW step over every parameter of `params`, in place.
    fn adamw_step(&self, params: &[AdamWParam], hp: AdamW) -> Result<()>;
    /// The guarded optimizer step of a training step (DESIGN §6), on the backend's device with
    /// nothing read back: the global norm of every `grad` (in f64, a fixed order), the verdict
    /// ([`step_verdict`]: skipped when `loss` `[1]` or the norm is not finite — then nothing is
    /// written), and AdamW with `grad_scale · factor`, `factor = min(1, clip / norm)`. Returns
    /// `[loss, grad_norm, factor, skipped (0 or 1)]` on the device (F32 on a GPU, F64 on the
    /// CPU): the trainer's one download of the step.
    fn adamw_step_guarded(
        &self,
        params: &[AdamWParam],
        hp: AdamW,
        loss: &Tensor,
        clip: Option<f64>,
    ) -> Result<Tensor>;
    /// `sqrt(Σ_t Σ_i t_i²)` over all tensors, accumulated in f64 in a fixed order.
    fn global_norm(&self, tensors: &[&Tensor]) -> Result<f64>;
}
