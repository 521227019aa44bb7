//! The forward pass (DESIGN §1, specs/model.md), on token ids.
//!
//! Per layer, pre-norm with the residual add fused into the next norm:
//! `h = x + o_proj(Attn(RoPE(q), RoPE(k), v))` on `n = RMSNorm(x)`, then `x' = h + FFN(RMSNorm(h))`.
//! The soft-MoE mixes all T tokens of a row (not causal); rows stay independent.

use crate::model::{Ffn, Layer, Mlp};
use crate::{ModelError, Result, SteelModel};
use steel_autograd::{LossOptions, Tape, Var};
use steel_runtime::{trace, CpuStorage, CrossEntropy, DType, Matmul, Tensor};

/// The reference pretraining ignores targets equal to `<|endoftext|>`.
pub const DEFAULT_IGNORE_INDEX: i64 = 151643;

/// A training batch: token blocks `[B, T + 1]`; inputs are `[:, :T]`, targets `[:, 1:]`.
#[derive(Clone, Debug)]
pub struct TrainingBatch {
    pub blocks: Tensor,
    pub ignore_index: i64,
    /// The loss is `Σ nll / normalizer` (default: the counted targets of this batch).
    pub normalizer: Option<f64>,
    /// Tokens per chunk of the fused lm_head + cross entropy.
    pub chunk_tokens: usize,
    /// Explicit targets `[B, T]` (fine-tuning masks: a target equal to `ignore_index` is not
    /// counted); `None`: `blocks[:, 1:]`.
    pub targets: Option<Tensor>,
}

impl TrainingBatch {
    pub fn new(blocks: Tensor) -> Self {
        TrainingBatch {
            blocks,
            ignore_index: DEFAULT_IGNORE_INDEX,
            normalizer: None,
            chunk_tokens: 1024,
            targets: None,
        }
    }
}

/// Token ids of a CPU tensor as i64.
fn ids_of(t: &Tensor) -> Result<Vec<i64>> {
    let g = t.cpu_read()?;
    Ok(match &*g {
        CpuStorage::I32(v) => v.iter().map(|&x| x as i64).collect(),
        CpuStorage::U32(v) => v.iter().map(|&x| x as i64).collect(),
        CpuStorage::U16(v) => v.iter().map(|&x| x as i64).collect(),
        other => {
            return Err(ModelError::Input(format!(
                "token ids must be I32, U32 or U16, got {}",
                other.dtype()
            )))
        }
    })
}

impl SteelModel {
    /// `x` as a GEMM operand: cast to the compute dtype (bf16 under bf16-mixed; a no-op in fp32).
    fn gemm_input(&self, tape: &mut Tape, x: Var) -> Result<Var> {
        if self.compute == DType::BF16 {
            Ok(tape.cast(x, DType::BF16)?)
        } else {
            Ok(x)
        }
    }

    /// An MLP on `x`; its output is in the residual stream's dtype (f32).
    fn mlp(&self, tape: &mut Tape, mlp: &Mlp, x: Var) -> Result<Var> {
        let s = &self.params;
        let x = self.gemm_input(tape, x)?;
        let f32_out = Some(self.stream_dtype());
        Ok(match mlp {
            Mlp::Senet { gate_up, up, gate_down, down } => {
                let (gu, u, gd, d) = (
                    tape.param(s, *gate_up)?,
                    tape.param(s, *up)?,
                    tape.param(s, *gate_down)?,
                    tape.param(s, *down)?,
                );
                let a = tape.linear(x, gu, None)?;
                let b = tape.linear(x, u, None)?;
                let inner = tape.swiglu(a, b)?;
                let a = tape.linear_to(inner, gd, None, f32_out)?;
                let b = tape.linear_to(inner, d, None, f32_out)?;
                tape.swiglu(a, b)?
            }
            Mlp::Swiglu { gate, up, down } => {
                let (g, u, d) = (tape.param(s, *gate)?, tape.param(s, *up)?, tape.param(s, *down)?);
                let a = tape.linear(x, g, None)?;
                let b = tape.linear(x, u, None)?;
                let inner = tape.swiglu(a, b)?;
                tape.linear_to(inner, d, None, f32_out)?
            }
        })
    }

    /// The soft-MoE on `m [B, T, H]` (specs/model.md point 4): the fused routing, the
    /// dispatch mix, the experts (the fused double-SwiGLU op for `senet` experts, one SwiGLU MLP
    /// per expert for `raw`), the combine mix.
    fn soft_moe(
        &self,
        tape: &mut Tape,
        phi: Var,
        scale: Var,
        experts: &[Mlp],
        m: Var,
    ) -> Result<Var> {
        let c = &self.config;
        let (h, e, s) = (c.hidden_size, c.n_experts, c.slots_per_expert);
        let b = tape.value(m)?.shape()[0];
        let phi2 = tape.reshape(phi, &[h, e * s])?;
        let (xn, dispatch, combine) = tape.soft_moe_route(m, phi2, scale, 1e-12)?;
        let slot_in = tape.soft_moe_dispatch(dispatch, xn)?; // [B, E·S, H]
                                                             // Group slots by expert: [B, E, S·H] → [E, B, S·H]; expert e takes rows [B·S, H].
        let slot_in = tape.reshape(slot_in, &[b, e, s * h])?;
        let by_expert = tape.transpose01(slot_in)?;
        let ys = if let Some(weights) = self.senet_weights(tape, experts)? {
            let x = tape.reshape(by_expert, &[e, b * s, h])?;
            let x = self.gemm_input(tape, x)?;
            let y = tape.experts(x, [&weights[0], &weights[1], &weights[2], &weights[3]])?;
            let y = tape.cast(y, self.stream_dtype())?;
            tape.reshape(y, &[e, b, s * h])?
        } else {
            let mut outs = Vec::with_capacity(e);
            for (i, mlp) in experts.iter().enumerate() {
                let xi = tape.slice0(by_expert, i, 1)?;
                let xi = tape.reshape(xi, &[b * s, h])?;
                let yi = self.mlp(tape, mlp, xi)?;
                outs.push(tape.reshape(yi, &[1, b, s * h])?);
            }
            tape.concat0(&outs)? // [E, B, S·H]
        };
        let ys = tape.transpose01(ys)?; // [B, E, S·H]
        let ys = tape.reshape(ys, &[b, e * s, h])?;
        Ok(tape.soft_moe_combine(combine, ys)?) // [B, T, H]
    }

    /// The `[gate_up, up, gate_down, down]` variables of every expert when all are double
    /// SwiGLU (`senet`), else `None`.
    fn senet_weights(&self, tape: &mut Tape, experts: &[Mlp]) -> Result<Option<[Vec<Var>; 4]>> {
        let mut out: [Vec<Var>; 4] = Default::default();
        for mlp in experts {
            let Mlp::Senet { gate_up, up, gate_down, down } = mlp else { return Ok(None) };
            for (list, id) in out.iter_mut().zip([gate_up, up, gate_down, down]) {
                list.push(tape.param(&self.params, *id)?);
            }
        }
        Ok(Some(out))
    }

    /// The query, key and value projections of `n [B, T, H]`, as `[B, T, heads, head_dim]`.
    pub(crate) fn qkv(&self, tape: &mut Tape, layer: &Layer, n: Var) -> Result<(Var, Var, Var)> {
        let c = &self.config;
        let s = &self.params;
        let shape = tape.value(n)?.shape().to_vec();
        let (b, t) = (shape[0], shape[1]);
        let hd = c.head_dim();
        let (qw, qb) = (tape.param(s, layer.q_w)?, tape.param(s, layer.q_b)?);
        let (kw, kb) = (tape.param(s, layer.k_w)?, tape.param(s, layer.k_b)?);
        let (vw, vb) = (tape.param(s, layer.v_w)?, tape.param(s, layer.v_b)?);
        let n = self.gemm_input(tape, n)?;
        let q = tape.linear(n, qw, Some(qb))?;
        let k = tape.linear(n, kw, Some(kb))?;
        let v = tape.linear(n, vw, Some(vb))?;
        Ok((
            tape.reshape(q, &[b, t, c.num_attention_heads, hd])?,
            tape.reshape(k, &[b, t, c.kv_heads(), hd])?,
            tape.reshape(v, &[b, t, c.kv_heads(), hd])?,
        ))
    }

    pub(crate) fn attention(
        &self,
        tape: &mut Tape,
        layer: &Layer,
        n: Var,
        pos_offset: usize,
    ) -> Result<Var> {
        let c = &self.config;
        let s = &self.params;
        let (b, t, hd) = (tape.value(n)?.shape()[0], tape.value(n)?.shape()[1], c.head_dim());
        let (q, k, v) = self.qkv(tape, layer, n)?;
        let q = tape.rope(q, c.rope_theta, pos_offset)?;
        let k = tape.rope(k, c.rope_theta, pos_offset)?;
        let a = tape.attention(q, k, v, 1.0 / (hd as f64).sqrt())?;
        let a = tape.reshape(a, &[b, t, c.num_attention_heads * hd])?;
        let ow = tape.param(s, layer.o_w)?;
        Ok(tape.linear_to(a, ow, None, Some(self.stream_dtype()))?)
    }

    /// The FFN block (soft-MoE or dense MLP) of layer `index` on its normalised input
    /// `m [B, T, H]` — the block on its own, for tests and analysis.
    pub fn layer_ffn(&self, tape: &mut Tape, index: usize, m: Var) -> Result<Var> {
        let layer = self.layers.get(index).ok_or_else(|| {
            ModelError::Input(format!(
                "layer {index} does not exist (the model has {})",
                self.layers.len()
            ))
        })?;
        self.ffn(tape, layer, m)
    }

    pub(crate) fn ffn(&self, tape: &mut Tape, layer: &Layer, m: Var) -> Result<Var> {
        match &layer.ffn {
            Ffn::SoftMoe { phi, scale, experts } => {
                let (phi, scale) =
                    (tape.param(&self.params, *phi)?, tape.param(&self.params, *scale)?);
                self.soft_moe(tape, phi, scale, experts, m)
            }
            Ffn::Dense(mlp) => self.mlp(tape, mlp, m),
        }
    }

    /// The final normalised hidden states `[B, T, H]` of integer `ids [B, T]` (a CPU tensor).
    pub fn hidden_states(&self, tape: &mut Tape, ids: &Tensor) -> Result<Var> {
        self.hidden_states_segmented(tape, ids, None)
    }

    /// The soft-MoE on consecutive token segments of `m [1, T, H]` separately (each segment is
    /// what one call of incremental decoding shows it).
    pub(crate) fn ffn_segmented(
        &self,
        tape: &mut Tape,
        layer: &Layer,
        m: Var,
        segments: &[usize],
    ) -> Result<Var> {
        let shape = tape.value(m)?.shape().to_vec();
        let (t, h) = (shape[1], shape[2]);
        if shape[0] != 1 || segments.iter().sum::<usize>() != t || segments.contains(&0) {
            return Err(ModelError::Input(format!(
                "segments {segments:?} must be non-empty and cover the {t} tokens of one row"
            )));
        }
        let flat = tape.reshape(m, &[t, h])?;
        let mut outs = Vec::with_capacity(segments.len());
        let mut start = 0;
        for &len in segments {
            let part = tape.slice0(flat, start, len)?;
            let part = tape.reshape(part, &[1, len, h])?;
            let y = self.ffn(tape, layer, part)?;
            outs.push(tape.reshape(y, &[len, h])?);
            start += len;
        }
        let y = tape.concat0(&outs)?;
        Ok(tape.reshape(y, &[1, t, h])?)
    }

    /// `hidden_states`, with the FFN applied per segment of the row when `segments` is given
    /// (attention still sees the whole causal prefix): the full recomputation that matches
    /// incremental decoding with a KV cache, where each call's soft-MoE sees only its tokens.
    pub fn hidden_states_segmented(
        &self,
        tape: &mut Tape,
        ids: &Tensor,
        segments: Option<&[usize]>,
    ) -> Result<Var> {
        if ids.dims() != 2 || ids.numel() == 0 {
            return Err(ModelError::Input(format!(
                "token ids must be [batch, seq] and non-empty, got {:?}",
                ids.shape()
            )));
        }
        let eps = self.config.rms_norm_eps;
        let s = &self.params;
        let v = self.config.vocab_size as i64;
        if let Some((i, bad)) =
            ids_of(ids)?.into_iter().enumerate().find(|(_, x)| !(0..v).contains(x))
        {
            return Err(ModelError::Input(format!(
                "token id {bad} at position {i} is outside the vocabulary 0..{v}"
            )));
        }
        let ids = self.backend().upload(ids)?;
        let embed = tape.param(s, self.embed)?;
        let x0 = {
            let _r = trace::range("embedding");
            // Checked above on the host: nothing is read back from a GPU.
            let x = tape.embedding_prechecked(&ids, embed)?;
            tape.cast(x, self.stream_dtype())?
        };
        // (residual, branch) of the previous layer, added by the next fused norm.
        let mut pending: Option<(Var, Var)> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let _layer = trace::range(&format!("layer.{i}"));
            let w = tape.param(s, layer.input_norm)?;
            let (x, n) = {
                let _r = trace::range("input_norm");
                match pending {
                    Some((h, f)) => tape.add_rms_norm(h, f, w, eps)?,
                    None => (x0, tape.rms_norm(x0, w, eps)?),
                }
            };
            let o = {
                let _r = trace::range("attention");
                self.attention(tape, layer, n, 0)?
            };
            let w2 = tape.param(s, layer.post_norm)?;
            let (h, m) = {
                let _r = trace::range("post_norm");
                tape.add_rms_norm(x, o, w2, eps)?
            };
            let f = {
                let _r = trace::range("ffn");
                match segments {
                    Some(seg) => self.ffn_segmented(tape, layer, m, seg)?,
                    None => self.ffn(tape, layer, m)?,
                }
            };
            pending = Some((h, f));
        }
        let _final = trace::range("final_norm");
        let w = tape.param(s, self.norm)?;
        Ok(match pending {
            Some((h, f)) => tape.add_rms_norm(h, f, w, eps)?.1,
            None => tape.rms_norm(x0, w, eps)?,
        })
    }

    /// The training loss of `batch` on the tape: the model sees `blocks[:, :T]` and predicts
    /// `blocks[:, 1:]`; returns the loss variable and the number of counted targets.
    pub fn loss(&self, tape: &mut Tape, batch: &TrainingBatch) -> Result<(Var, usize)> {
        let blocks = &batch.blocks;
        let (b, t1) = match blocks.shape() {
            [b, t1] if *t1 >= 2 => (*b, *t1),
            s => {
                return Err(ModelError::Input(format!(
                    "training blocks must be [batch, seq + 1] with seq ≥ 1, got {s:?}"
                )))
            }
        };
        let t = t1 - 1;
        let all = ids_of(blocks)?;
        let mut inputs = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        for row in all.chunks(t1) {
            inputs.extend(row[..t].iter().map(|&x| x as i32));
            targets.extend(row[1..].iter().map(|&x| x as i32));
        }
        let inputs = Tensor::from_vec(inputs, &[b, t])?;
        let targets = match &batch.targets {
            Some(explicit) => {
                if explicit.shape() != [b, t] {
                    return Err(ModelError::Input(format!(
                        "targets {:?} must be [batch, seq] = [{b}, {t}]",
                        explicit.shape()
                    )));
                }
                ids_of(explicit)?.into_iter().map(|x| x as i32).collect()
            }
            None => targets,
        };
        // Counted and checked on the host, so the loss reads nothing back from a GPU.
        let v = self.config.vocab_size as i64;
        let mut count = 0usize;
        for (i, &x) in targets.iter().enumerate() {
            let x = x as i64;
            if x == batch.ignore_index {
                continue;
            }
            if !(0..v).contains(&x) {
                return Err(ModelError::Input(format!(
                    "target {x} at position {i} is outside the vocabulary 0..{v}"
                )));
            }
            count += 1;
        }
        let targets = self.backend().upload(&Tensor::from_vec(targets, &[b * t])?)?;
        let hidden = self.hidden_states(tape, &inputs)?;
        let hidden = tape.reshape(hidden, &[b * t, self.config.hidden_size])?;
        let hidden = self.gemm_input(tape, hidden)?;
        let head = tape.param(&self.params, self.head_id())?;
        let _r = trace::range("lm_head_ce");
        let opts = LossOptions {
            ce: CrossEntropy {
                ignore_index: batch.ignore_index,
                chunk_tokens: batch.chunk_tokens.max(1),
            },
            normalizer: batch.normalizer,
            count: Some(count),
        };
        Ok(tape.lm_head_ce(hidden, head, &targets, opts)?)
    }

    /// Logits `[B, T, V]` (f32, or f64 for an f64 model) of `ids [B, T]`, without a tape.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        let mut tape = Tape::no_grad(self.backend().clone());
        let hidden = self.hidden_states(&mut tape, ids)?;
        let hv = tape.value(hidden)?;
        let (b, t) = (ids.shape()[0], ids.shape()[1]);
        let h2 = hv.reshape(&[b * t, self.config.hidden_size])?;
        let head = &self.params.get(self.head_id()).value;
        let out = if head.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        let logits = self.backend().matmul(&h2, head, None, Matmul::NT, Some(out))?;
        Ok(self.to_host(logits)?.reshape(&[b, t, self.config.vocab_size])?)
    }

    /// `t` as a CPU tensor: itself on the CPU backend, downloaded from a GPU (the logits are read
    /// on the host).
    pub(crate) fn to_host(&self, t: Tensor) -> Result<Tensor> {
        if t.device() == steel_runtime::Device::Cpu {
            Ok(t)
        } else {
            Ok(self.backend().download(&t)?)
        }
    }

    /// HF's shifted loss of one sequence: the model sees all T tokens and the loss is the mean
    /// NLL of tokens 2..T predicted from their prefixes (nothing ignored). Returns
    /// `(loss, scored tokens)`.
    pub fn shifted_loss(&self, ids: &[i64]) -> Result<(f64, usize)> {
        if ids.len() < 2 {
            return Err(ModelError::Input(format!(
                "need at least 2 tokens to score, got {}",
                ids.len()
            )));
        }
        let v = self.config.vocab_size as i64;
        if let Some((i, &bad)) = ids.iter().enumerate().find(|(_, &x)| x < 0 || x >= v) {
            return Err(ModelError::Input(format!(
                "token id {bad} at position {i} is outside the vocabulary 0..{v}"
            )));
        }
        let t = ids.len();
        let input = Tensor::from_vec(ids.iter().map(|&x| x as i32).collect(), &[1, t])?;
        let mut tape = Tape::no_grad(self.backend().clone());
        let hidden = self.hidden_states(&mut tape, &input)?;
        let h = tape.reshape(hidden, &[t, self.config.hidden_size])?;
        let h = tape.slice0(h, 0, t - 1)?;
        let targets = self
            .backend()
            .upload(&Tensor::from_vec(ids[1..].iter().map(|&x| x as i32).collect(), &[t - 1])?)?;
        let h = self.gemm_input(&mut tape, h)?;
        let head = tape.param(&self.params, self.head_id())?;
        let _r = trace::range("lm_head_ce");
        let opts = LossOptions {
            ce: CrossEntropy { ignore_index: -1, chunk_tokens: 1024 },
            normalizer: None,
            count: Some(t - 1),
        };
        let (loss, count) = tape.lm_head_ce(h, head, &targets, opts)?;
        let value = self.backend().download(tape.value(loss)?)?.scalar()?;
        Ok((value, count))
    }
}
