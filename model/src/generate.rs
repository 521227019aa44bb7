//! Generation with a KV cache (no tape): greedy or sampled decoding with temperature, top-k,
//! top-p and HF's repetition penalty, stopping at any eos id.
//!
//! Decoding reproduces the reference model run with a cache (specs/model.md point 5): each prompt
//! is processed in one call, then every new token in its own call, and the soft-MoE of a call sees
//! only that call's tokens. Prompts of different lengths are prefilled one by one (padding never
//! reaches the soft-MoE) and then decoded together: the projections, experts and head run on all
//! sequences at once, attention per sequence over its own cache.

use crate::model::Layer;
use crate::{ModelError, Result, SteelModel};
use steel_autograd::Tape;
use steel_runtime::{DType, Matmul, Tensor};

/// Decoding options (HF's names and meanings).
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationOptions {
    pub max_new_tokens: usize,
    /// 0 is greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens (None: off).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches top_p (1: off).
    pub top_p: f64,
    /// HF's repetition penalty over the prompt and the generated tokens (1: off).
    pub repetition_penalty: f64,
    /// Generation of a sequence stops after any of these.
    pub eos: Vec<u32>,
    pub seed: u64,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        GenerationOptions {
            max_new_tokens: 256,
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            repetition_penalty: 1.0,
            eos: Vec::new(),
            seed: 0,
        }
    }
}

impl GenerationOptions {
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Input(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        if self.top_k == Some(0) {
            return bad("top_k must be at least 1 (omit it to turn it off)".into());
        }
        Ok(())
    }
}

/// The keys and values of one sequence, per layer, `[1, T, kv_heads, head_dim]`.
#[derive(Clone, Default)]
pub struct SeqCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl SeqCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// splitmix64: the sampler's generator (seeded, so a seed reproduces a generation).
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Appends `new [1, L, kv, hd]` to a cached `[1, T, kv, hd]`.
fn append(model: &SteelModel, old: Option<&Tensor>, new: &Tensor) -> Result<Tensor> {
    let s = new.shape().to_vec();
    let flat_new = new.reshape(&[s[1], s[2], s[3]])?;
    let Some(old) = old else { return Ok(model.backend().copy(new)?) };
    let t = old.shape()[1];
    let flat_old = old.reshape(&[t, s[2], s[3]])?;
    let cat = model.backend().concat0(&[&flat_old, &flat_new])?;
    Ok(cat.reshape(&[1, t + s[1], s[2], s[3]])?)
}

/// Applies HF's repetition penalty, temperature, top-k and top-p to `logits`, then picks a token
/// (argmax when greedy).
fn pick(logits: &mut [f64], seen: &[u32], o: &GenerationOptions, rng: &mut Rng) -> u32 {
    if o.repetition_penalty != 1.0 {
        let mut ids: Vec<u32> = seen.to_vec();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l < 0.0 { *l * o.repetition_penalty } else { *l / o.repetition_penalty };
            }
        }
    }
    let argmax = |l: &[f64]| {
        l.iter()
            .enumerate()
            .fold((0usize, f64::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0
    };
    if o.temperature == 0.0 {
        return argmax(logits) as u32;
    }
    logits.iter_mut().for_each(|l| *l /= o.temperature);
    // Candidates, most likely first (ties: lower id first).
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = o.top_k {
        order.truncate(k.min(order.len()));
    }
    let m = logits[order[0]];
    let mut probs: Vec<f64> = order.iter().map(|&i| (logits[i] - m).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if o.top_p < 1.0 {
        // HF: drop tokens whose cumulative probability (ascending) is ≤ 1 − top_p; keep ≥ 1.
        let mut keep = probs.len();
        let mut tail = 0.0;
        for i in (0..probs.len()).rev() {
            tail += probs[i];
            if tail <= 1.0 - o.top_p && i > 0 {
                keep = i;
            } else {
                break;
            }
        }
        order.truncate(keep);
        probs.truncate(keep);
        let t: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= t);
    }
    let u = rng.next_f64();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return order[i] as u32;
        }
    }
    order[order.len() - 1] as u32
}

impl SteelModel {
    fn layer_step(
        &self,
        tape: &mut Tape,
        layer: &Layer,
        li: usize,
        n: steel_autograd::Var,
        caches: &mut [SeqCache],
    ) -> Result<steel_autograd::Var> {
        let c = &self.config;
        let s = &self.params;
        let shape = tape.value(n)?.shape().to_vec();
        let (b, t) = (shape[0], shape[1]);
        let hd = c.head_dim();
        let (q, k, v) = self.qkv(tape, layer, n)?;
        let mut outs = Vec::with_capacity(b);
        for (i, cache) in caches.iter_mut().enumerate() {
            let off = cache.len;
            let qi = tape.slice0(q, i, 1)?;
            let ki = tape.slice0(k, i, 1)?;
            let vi = tape.slice0(v, i, 1)?;
            let qi = tape.rope(qi, c.rope_theta, off)?;
            let ki = tape.rope(ki, c.rope_theta, off)?;
            let (kt, vt) = (tape.value(ki)?.clone(), tape.value(vi)?.clone());
            let slot = &mut cache.layers[li];
            let kall = append(self, slot.as_ref().map(|p| &p.0), &kt)?;
            let vall = append(self, slot.as_ref().map(|p| &p.1), &vt)?;
            *slot = Some((kall.clone(), vall.clone()));
            let (kv, vv) = (tape.leaf(kall, false), tape.leaf(vall, false));
            outs.push(tape.attention(qi, kv, vv, 1.0 / (hd as f64).sqrt())?);
        }
        let a = if outs.len() == 1 { outs[0] } else { tape.concat0(&outs)? };
        let a = tape.reshape(a, &[b, t, c.num_attention_heads * hd])?;
        let ow = tape.param(s, layer.o_w)?;
        Ok(tape.linear(a, ow, None)?)
    }

    /// One call of incremental decoding: `ids [B, L]` continue the B sequences of `caches` (all
    /// by L tokens). Returns the logits of each row's last token, `[B, V]` (f32), and extends the
    /// caches. The soft-MoE sees the L tokens of this call only.
    pub fn decode_step(&self, ids: &Tensor, caches: &mut [SeqCache]) -> Result<Tensor> {
        let (b, t) = match ids.shape() {
            [b, t] if *b == caches.len() && *t > 0 => (*b, *t),
            s => {
                return Err(ModelError::Input(format!(
                    "decode_step: ids {s:?} must be [{} sequences, ≥ 1 tokens]",
                    caches.len()
                )))
            }
        };
        let nl = self.layers.len();
        for c in caches.iter_mut() {
            if c.layers.len() != nl {
                *c = SeqCache { layers: vec![None; nl], len: 0 };
            }
        }
        let c = &self.config;
        let eps = c.rms_norm_eps;
        let mut tape = Tape::no_grad(self.backend().clone());
        let s = &self.params;
        let up = self.backend().upload(ids)?;
        let embed = tape.param(s, self.embed)?;
        let x0 = tape.embedding(&up, embed)?;
        let mut pending: Option<(steel_autograd::Var, steel_autograd::Var)> = None;
        for (li, layer) in self.layers.iter().enumerate() {
            let w = tape.param(s, layer.input_norm)?;
            let (x, n) = match pending {
                Some((h, f)) => tape.add_rms_norm(h, f, w, eps)?,
                None => (x0, tape.rms_norm(x0, w, eps)?),
            };
            let o = self.layer_step(&mut tape, layer, li, n, caches)?;
            let w2 = tape.param(s, layer.post_norm)?;
            let (h, m) = tape.add_rms_norm(x, o, w2, eps)?;
            let f = self.ffn(&mut tape, layer, m)?;
            pending = Some((h, f));
        }
        let w = tape.param(s, self.norm)?;
        let hidden = match pending {
            Some((h, f)) => tape.add_rms_norm(h, f, w, eps)?.1,
            None => tape.rms_norm(x0, w, eps)?,
        };
        for cache in caches.iter_mut() {
            cache.len += t;
        }
        // The last position of each row.
        let hv = tape.value(hidden)?.reshape(&[b * t, c.hidden_size])?;
        let rows: Vec<Tensor> = (0..b)
            .map(|i| self.backend().slice0(&hv, i * t + t - 1, 1))
            .collect::<std::result::Result<_, _>>()?;
        let refs: Vec<&Tensor> = rows.iter().collect();
        let last = self.backend().concat0(&refs)?;
        let head = &self.params.get(self.head_id()).value;
        let out = if head.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        Ok(self.backend().matmul(&last, head, None, Matmul::NT, Some(out))?)
    }

    /// Generates continuations of `prompts` (see the module docs). `on_token(i, id)` is called
    /// for every token as it is chosen (streaming). Returns the generated ids of each prompt
    /// (ending with the eos id that stopped it, if any).
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        opts: &GenerationOptions,
        on_token: &mut dyn FnMut(usize, u32),
    ) -> Result<Vec<Vec<u32>>> {
        opts.check()?;
        let v = self.config.vocab_size;
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(ModelError::Input(format!("prompt {i} is empty")));
            }
            if let Some(&bad) = p.iter().find(|&&t| t as usize >= v) {
                return Err(ModelError::Input(format!(
                    "prompt {i}: token id {bad} is outside the vocabulary 0..{v}"
                )));
            }
        }
        let mut rng = Rng(opts.seed);
        let mut caches: Vec<SeqCache> = vec![SeqCache::default(); prompts.len()];
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        let mut next: Vec<u32> = Vec::with_capacity(prompts.len());
        // Prefill each prompt on its own.
        for (i, p) in prompts.iter().enumerate() {
            let ids = Tensor::from_vec(p.iter().map(|&t| t as i32).collect(), &[1, p.len()])?;
            let logits = self.decode_step(&ids, std::slice::from_mut(&mut caches[i]))?;
            let mut row = self.to_host(logits)?.to_f64_vec()?;
            next.push(pick(&mut row, p, opts, &mut rng));
        }
        let mut active: Vec<usize> = (0..prompts.len()).collect();
        if opts.max_new_tokens == 0 {
            return Ok(out);
        }
        loop {
            let mut still = Vec::with_capacity(active.len());
            for (j, &i) in active.iter().enumerate() {
                let tok = next[j];
                out[i].push(tok);
                on_token(i, tok);
                if !opts.eos.contains(&tok) && out[i].len() < opts.max_new_tokens {
                    still.push((i, tok));
                }
            }
            if still.is_empty() {
                return Ok(out);
            }
            // Decode the survivors together: one token each.
            let ids = Tensor::from_vec(
                still.iter().map(|&(_, t)| t as i32).collect(),
                &[still.len(), 1],
            )?;
            let mut batch: Vec<SeqCache> =
                still.iter().map(|&(i, _)| std::mem::take(&mut caches[i])).collect();
            let logits = self.decode_step(&ids, &mut batch)?;
            for (&(i, _), c) in still.iter().zip(batch) {
                caches[i] = c;
            }
            let all = self.to_host(logits)?.to_f64_vec()?;
            next = Vec::with_capacity(still.len());
            for (j, &(i, _)) in still.iter().enumerate() {
                let mut row = all[j * v..(j + 1) * v].to_vec();
                let seen: Vec<u32> = prompts[i].iter().chain(&out[i]).copied().collect();
                next.push(pick(&mut row, &seen, opts, &mut rng));
            }
            active = still.iter().map(|&(i, _)| i).collect();
        }
    }

    /// Logits `[T, V]` of one sequence recomputed from scratch (full causal attention, no cache)
    /// with the soft-MoE applied per segment: the reference for [`SteelModel::decode_step`]
    /// called once per segment.
    pub fn logits_segmented(&self, ids: &[u32], segments: &[usize]) -> Result<Tensor> {
        let t = ids.len();
        let x = Tensor::from_vec(ids.iter().map(|&i| i as i32).collect(), &[1, t])?;
        let mut tape = Tape::no_grad(self.backend().clone());
        let hidden = self.hidden_states_segmented(&mut tape, &x, Some(segments))?;
        let hv = tape.value(hidden)?.reshape(&[t, self.config.hidden_size])?;
        let head = &self.params.get(self.head_id()).value;
        let out = if head.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        self.to_host(self.backend().matmul(&hv, head, None, Matmul::NT, Some(out))?)
    }
}
