//! A small pre-norm transformer block (attention + SwiGLU MLP) built from tape ops, with
//! seeded random weights. It is a fixture for tests and benchmarks of the tape and the
//! backends — not the Steel model, which lives in the `model` crate.

use crate::{ParamId, ParamOptions, ParamStore, Result, Tape, Var};
use steel_runtime::{Backend, DType, Tensor};

/// Shape of a [`TinyBlock`].
#[derive(Clone, Copy, Debug)]
pub struct TinyBlockConfig {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub rope_theta: f64,
    pub eps: f64,
}

/// Deterministic uniform numbers in [−1, 1) (splitmix64).
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [−1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    /// `n` values uniform in ±scale.
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

/// A pre-norm block: `h = x + Wo·Attn(RoPE(Wq n), RoPE(Wk n), Wv n)` with `n = RMSNorm(x)`,
/// then `y = h + Wd (silu(Wg m) ⊙ Wu m)` with `m = RMSNorm(h)`.
pub struct TinyBlock {
    pub cfg: TinyBlockConfig,
    ids: [ParamId; 12],
}

impl TinyBlock {
    /// Registers the block's parameters in `store` as `{prefix}.…`, drawn uniformly with
    /// standard deviation ~1/√fan_in, in `dtype`.
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        cfg: TinyBlockConfig,
        dtype: DType,
        seed: u64,
    ) -> Result<Self> {
        let mut rng = SplitMix::new(seed);
        let d = cfg.hidden / cfg.heads;
        let kv = cfg.kv_heads * d;
        let shapes: [(&str, Vec<usize>); 12] = [
            ("ln1", vec![cfg.hidden]),
            ("q_proj.weight", vec![cfg.hidden, cfg.hidden]),
            ("q_proj.bias", vec![cfg.hidden]),
            ("k_proj.weight", vec![kv, cfg.hidden]),
            ("k_proj.bias", vec![kv]),
            ("v_proj.weight", vec![kv, cfg.hidden]),
            ("v_proj.bias", vec![kv]),
            ("o_proj.weight", vec![cfg.hidden, cfg.hidden]),
            ("ln2", vec![cfg.hidden]),
            ("gate_proj.weight", vec![cfg.ffn, cfg.hidden]),
            ("up_proj.weight", vec![cfg.ffn, cfg.hidden]),
            ("down_proj.weight", vec![cfg.hidden, cfg.ffn]),
        ];
        let backend = store.backend().clone();
        let mut ids = Vec::with_capacity(12);
        for (name, shape) in shapes {
            let n: usize = shape.iter().product();
            let values = if name.starts_with("ln") {
                rng.vec(n, 0.2).into_iter().map(|v| 1.0 + v).collect()
            } else {
                let fan_in = *shape.last().unwrap_or(&1) as f64;
                rng.vec(n, (3.0 / fan_in).sqrt())
            };
            let t = backend.upload(&Tensor::from_f64(&values, &shape, dtype)?)?;
            ids.push(store.insert(format!("{prefix}.{name}"), t, ParamOptions::default())?);
        }
        let ids: [ParamId; 12] =
            ids.try_into().map_err(|_| crate::Error::Tape("parameter count".into()))?;
        Ok(TinyBlock { cfg, ids })
    }

    /// The block's parameter ids, in the order `forward_with` takes their variables.
    pub fn param_ids(&self) -> &[ParamId] {
        &self.ids
    }

    /// `x [B, T, hidden] → [B, T, hidden]` with the block's parameters from `store`.
    pub fn forward(&self, tape: &mut Tape, store: &ParamStore, x: Var) -> Result<Var> {
        let p: Vec<Var> =
            self.ids.iter().map(|&id| tape.param(store, id)).collect::<Result<_>>()?;
        Self::forward_with(self.cfg, tape, &p, x)
    }

    /// The forward pass with the 12 parameter variables given explicitly (gradient checks pass
    /// them as inputs).
    pub fn forward_with(c: TinyBlockConfig, tape: &mut Tape, p: &[Var], x: Var) -> Result<Var> {
        let shape = tape.value(x)?.shape().to_vec();
        let (b, t) = (shape[0], shape[1]);
        let d = c.hidden / c.heads;
        let n = tape.rms_norm(x, p[0], c.eps)?;
        let q = tape.linear(n, p[1], Some(p[2]))?;
        let k = tape.linear(n, p[3], Some(p[4]))?;
        let v = tape.linear(n, p[5], Some(p[6]))?;
        let q = tape.reshape(q, &[b, t, c.heads, d])?;
        let k = tape.reshape(k, &[b, t, c.kv_heads, d])?;
        let v = tape.reshape(v, &[b, t, c.kv_heads, d])?;
        let q = tape.rope(q, c.rope_theta, 0)?;
        let k = tape.rope(k, c.rope_theta, 0)?;
        let a = tape.attention(q, k, v, 1.0 / (d as f64).sqrt())?;
        let a = tape.reshape(a, &[b, t, c.hidden])?;
        let o = tape.linear(a, p[7], None)?;
        let (h, m) = tape.add_rms_norm(x, o, p[8], c.eps)?;
        let g = tape.linear(m, p[9], None)?;
        let u = tape.linear(m, p[10], None)?;
        let s = tape.swiglu(g, u)?;
        let f = tape.linear(s, p[11], None)?;
        tape.add(h, f)
    }
}

/// Random activations `[shape]` in ±scale as a tensor on `backend`.
pub fn random_tensor(
    backend: &dyn Backend,
    shape: &[usize],
    dtype: DType,
    scale: f64,
    seed: u64,
) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(backend.upload(&Tensor::from_f64(&SplitMix::new(seed).vec(n, scale), shape, dtype)?)?)
}
