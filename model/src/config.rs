//! `SteelConfig`: the HuggingFace `config.json` of a Steel model.
//!
//! Known keys are typed and validated; every other key is kept in `extra` and written back
//! unchanged, so a config survives a round trip. Invalid values are rejected with a message that
//! names the key.

use crate::{ModelError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// The feed-forward block of a layer (`FFN_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FfnType {
    /// Soft mixture of experts (Puigcerver et al.), the reference model's FFN.
    #[serde(rename = "softmoe_v3")]
    SoftMoeV3,
    /// One dense MLP of the `mlp_type`.
    #[serde(rename = "raw")]
    Raw,
}

/// The expert (or dense) MLP (`mlp_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MlpType {
    /// "Double SwiGLU": `silu(u W_gdᵀ) ⊙ (u W_downᵀ)` with `u = silu(x W_guᵀ) ⊙ (x W_upᵀ)`.
    #[serde(rename = "senet")]
    Senet,
    /// Plain SwiGLU: `down(silu(gate(x)) ⊙ up(x))`.
    #[serde(rename = "raw")]
    Raw,
}

/// One token id or several (`eos_token_id` may be a list).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    // HF's Qwen2Config default. The Steel configs set 1e6 explicitly.
    10000.0
}
fn default_one() -> usize {
    1
}
fn default_init_range() -> f64 {
    0.02
}
fn default_ffn() -> FfnType {
    FfnType::SoftMoeV3
}
fn default_mlp() -> MlpType {
    MlpType::Senet
}

/// A Steel model configuration in HF `config.json` form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SteelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (multi-head attention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_one")]
    pub n_experts: usize,
    #[serde(default = "default_one")]
    pub slots_per_expert: usize,
    #[serde(default = "default_one")]
    pub mlp_div_ratio: usize,
    #[serde(rename = "FFN_type", default = "default_ffn")]
    pub ffn_type: FfnType,
    #[serde(default = "default_mlp")]
    pub mlp_type: MlpType,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_map: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// Every other key, kept as it was.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The `auto_map` HF needs to load a Steel checkpoint with the reference's remote code.
pub fn reference_auto_map() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("AutoConfig".into(), Value::String("configuration_steel.SteelConfig".into()));
    m.insert(
        "AutoModelForCausalLM".into(),
        Value::String("modeling_steel.SteelForCausalLM".into()),
    );
    m
}

/// Limits `validate` enforces before anything is sized from a config.
const MAX_DIM: usize = 1 << 31;
const MAX_LAYERS: usize = 100_000;
const MAX_PARAMS: u128 = 1 << 40;
/// The most tensors a config may name (the 1.1B model has 236; a million names is ~100 MB).
const MAX_TENSORS: u128 = 1 << 20;

fn bad(key: &str, msg: impl Into<String>) -> ModelError {
    ModelError::Config { key: key.to_string(), msg: msg.into() }
}

impl SteelConfig {
    /// Parses and validates a `config.json` text.
    pub fn from_json(text: &str) -> Result<SteelConfig> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| bad("config.json", format!("not valid JSON: {e}")))?;
        check_types(&value)?;
        let cfg: SteelConfig = serde_json::from_value(value).map_err(|e| {
            // serde names the offending field in its message ("missing field `hidden_size`").
            ModelError::Config { key: field_of(&e.to_string()), msg: e.to_string() }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates `path`.
    pub fn from_file(path: &Path) -> Result<SteelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text).map_err(|e| e.in_file(path))
    }

    /// Pretty JSON with the reference's key names.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| ModelError::Config { key: "-".into(), msg: e.to_string() })
    }

    pub fn to_file(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json()? + "\n").map_err(|e| ModelError::io(path, e))
    }

    /// Checks every value a model can be built from.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
            ("mlp_div_ratio", self.mlp_div_ratio),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(bad(k, "must be at least 1"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(bad(
                "num_attention_heads",
                format!("head_dim {} must be even for rotary embeddings", self.head_dim()),
            ));
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "num_attention_heads {} is not divisible by num_key_value_heads {kv}",
                    self.num_attention_heads
                ),
            ));
        }
        if self.expert_width() == 0 {
            return Err(bad(
                "mlp_div_ratio",
                format!(
                    "intermediate_size {} // mlp_div_ratio {} is 0",
                    self.intermediate_size, self.mlp_div_ratio
                ),
            ));
        }
        if self.ffn_type == FfnType::SoftMoeV3 {
            if self.n_experts == 0 {
                return Err(bad("n_experts", "a soft-MoE needs at least one expert"));
            }
            if self.slots_per_expert == 0 {
                return Err(bad("slots_per_expert", "must be at least 1"));
            }
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(bad(
                "rms_norm_eps",
                format!("must be a positive number, got {}", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return Err(bad(
                "rope_theta",
                format!("must be a positive number, got {}", self.rope_theta),
            ));
        }
        if !(self.initializer_range > 0.0 && self.initializer_range.is_finite()) {
            return Err(bad(
                "initializer_range",
                format!("must be a positive number, got {}", self.initializer_range),
            ));
        }
        // Sizes stay sane before anything is allocated from them (the names of 10^9 layers
        // alone would take 10 GB): every dimension below 2^31, at most 100,000 layers, and the
        // parameter count — counted in u128, nothing allocated — at most 2^40.
        for (k, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", kv),
            ("vocab_size", self.vocab_size),
            ("n_experts", self.n_experts),
            ("slots_per_expert", self.slots_per_expert),
        ] {
            if v >= MAX_DIM {
                return Err(bad(k, format!("{v} is beyond any model (below 2^31)")));
            }
        }
        if self.num_hidden_layers > MAX_LAYERS {
            return Err(bad(
                "num_hidden_layers",
                format!("{} is beyond any model (at most {MAX_LAYERS})", self.num_hidden_layers),
            ));
        }
        let tensors = self.tensor_count_u128();
        if tensors > MAX_TENSORS {
            return Err(bad(
                "n_experts",
                format!(
                    "the model would have {tensors} tensors (more than 2^20): check \
                     num_hidden_layers and n_experts"
                ),
            ));
        }
        let params = self.param_count_u128();
        if params > MAX_PARAMS {
            return Err(bad(
                "hidden_size",
                format!(
                    "the model would have {params} parameters (more than 2^40): check \
                     hidden_size, num_hidden_layers, vocab_size and the expert sizes"
                ),
            ));
        }
        Ok(())
    }

    /// The parameter count of `param_shapes`, computed from the sizes alone in u128 (it never
    /// overflows or allocates, so `validate` can bound absurd configs before `param_shapes`).
    pub fn param_count_u128(&self) -> u128 {
        let w = |x: usize| x as u128;
        let (h, v) = (w(self.hidden_size), w(self.vocab_size));
        let q = w(self.num_attention_heads) * w(self.head_dim());
        let kv = w(self.kv_heads()) * w(self.head_dim());
        let mlp: u128 = self.mlp_projections().iter().map(|(_, s)| w(s[0]) * w(s[1])).sum();
        // Two norms, q/k/v with biases, o.
        let attn = 2 * h + q * h + q + 2 * (kv * h + kv) + h * q;
        let ffn = match self.ffn_type {
            FfnType::SoftMoeV3 => {
                let e = w(self.n_experts);
                h * e * w(self.slots_per_expert) + 1 + e * mlp
            }
            FfnType::Raw => mlp,
        };
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + w(self.num_hidden_layers) * (attn + ffn) + h + head
    }

    /// The number of tensors of `param_shapes`, from the sizes alone (no allocation).
    pub fn tensor_count_u128(&self) -> u128 {
        let projections = self.mlp_projections().len() as u128;
        let ffn = match self.ffn_type {
            FfnType::SoftMoeV3 => 2 + self.n_experts as u128 * projections,
            FfnType::Raw => projections,
        };
        let head = u128::from(!self.tie_word_embeddings);
        2 + head + self.num_hidden_layers as u128 * (9 + ffn)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Inner width of every expert (and of the dense MLP): `intermediate_size // mlp_div_ratio`.
    pub fn expert_width(&self) -> usize {
        self.intermediate_size / self.mlp_div_ratio.max(1)
    }

    /// Number of soft-MoE slots per sequence (`n_experts · slots_per_expert`).
    pub fn slots(&self) -> usize {
        self.n_experts * self.slots_per_expert
    }

    /// The projections of one MLP: `(name, [out, in])`.
    pub fn mlp_projections(&self) -> Vec<(&'static str, [usize; 2])> {
        let (h, i) = (self.hidden_size, self.expert_width());
        match self.mlp_type {
            MlpType::Senet => vec![
                ("gate_up_proj", [i, h]),
                ("up_proj", [i, h]),
                ("gate_down_proj", [h, i]),
                ("down_proj", [h, i]),
            ],
            MlpType::Raw => vec![("gate_proj", [i, h]), ("up_proj", [i, h]), ("down_proj", [h, i])],
        }
    }

    /// Every parameter as `(HF name, shape)`, in model order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, v) = (self.hidden_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim();
        let kv = self.kv_heads() * self.head_dim();
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            match self.ffn_type {
                FfnType::SoftMoeV3 => {
                    out.push((
                        format!("{p}.mlp.phi"),
                        vec![h, self.n_experts, self.slots_per_expert],
                    ));
                    out.push((format!("{p}.mlp.scale"), vec![1]));
                    for e in 0..self.n_experts {
                        for (name, shape) in self.mlp_projections() {
                            out.push((
                                format!("{p}.mlp.experts.{e}.{name}.weight"),
                                shape.to_vec(),
                            ));
                        }
                    }
                }
                FfnType::Raw => {
                    for (name, shape) in self.mlp_projections() {
                        out.push((format!("{p}.mlp.{name}.weight"), shape.to_vec()));
                    }
                }
            }
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.param_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// Training FLOPs per token at sequence length `seq`, counted the usual way: 6 × the weights
    /// each token multiplies (q/k/v/o, `phi`, the lm_head, and a dense MLP), plus attention
    /// 12·L·H·seq; the soft-MoE experts run on `slots` rows per *sequence* (6 × slots × expert
    /// weights / seq per token), and its dispatch and combine products add 12·L·slots·H.
    pub fn training_flops_per_token(&self, seq: usize) -> f64 {
        let (h, l) = (self.hidden_size as f64, self.num_hidden_layers as f64);
        let q = (self.num_attention_heads * self.head_dim()) as f64;
        let kv = (self.kv_heads() * self.head_dim()) as f64;
        let mlp: f64 = self.mlp_projections().iter().map(|(_, s)| (s[0] * s[1]) as f64).sum();
        let attn_weights = h * q + 2.0 * h * kv + q * h;
        let mut per_token = attn_weights;
        let mut per_seq_flops = 0.0;
        match self.ffn_type {
            FfnType::SoftMoeV3 => {
                let slots = self.slots() as f64;
                per_token += h * slots; // the routing logits x̂ · Φ̂
                per_seq_flops += 6.0 * slots * mlp; // each slot runs one expert
                per_token += 2.0 * slots * h; // dispatch (Dᵀ X̂) and combine (C Ỹ) products
            }
            FfnType::Raw => per_token += mlp,
        }
        let head = (self.vocab_size * self.hidden_size) as f64;
        6.0 * (l * per_token + head) + l * per_seq_flops / seq as f64 + 12.0 * l * h * seq as f64
    }
}

/// Checks the type (and, for the enums, the value) of every known key, so that a wrong value
/// is reported with its key rather than serde's position.
fn check_types(v: &Value) -> Result<()> {
    let obj = v.as_object().ok_or_else(|| bad("config.json", "must be a JSON object"))?;
    let counts = [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "n_experts",
        "slots_per_expert",
        "mlp_div_ratio",
    ];
    for k in counts {
        if let Some(x) = obj.get(k) {
            if !(x.is_u64() || (x.is_null() && k == "num_key_value_heads")) {
                return Err(bad(k, format!("must be a non-negative integer, got {x}")));
            }
        }
    }
    for k in ["rms_norm_eps", "rope_theta", "initializer_range"] {
        if let Some(x) = obj.get(k) {
            if !x.is_number() {
                return Err(bad(k, format!("must be a number, got {x}")));
            }
        }
    }
    if let Some(x) = obj.get("tie_word_embeddings") {
        if !x.is_boolean() {
            return Err(bad("tie_word_embeddings", format!("must be true or false, got {x}")));
        }
    }
    for (k, allowed) in [("FFN_type", ["softmoe_v3", "raw"]), ("mlp_type", ["senet", "raw"])] {
        if let Some(x) = obj.get(k) {
            if !allowed.iter().any(|a| x.as_str() == Some(a)) {
                return Err(bad(k, format!("must be one of {allowed:?}, got {x}")));
            }
        }
    }
    Ok(())
}

/// The field a serde error message names (`unknown variant …` for `FFN_type`, `missing field
/// \`x\`` …), or "config.json" when it names none.
fn field_of(msg: &str) -> String {
    if let Some(start) = msg.find('`') {
        if let Some(len) = msg[start + 1..].find('`') {
            return msg[start + 1..start + 1 + len].to_string();
        }
    }
    "config.json".to_string()
}
