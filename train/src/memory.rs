//! The memory plan of a training run on one device (`memory_plan`): what `--dry-run` prints, what
//! the trainer checks against the device's free memory before step 1, and what the run logs
//! beside the allocator's measured peak.
//!
//! The plan counts what the trainer allocates, tensor by tensor, from the model's shapes:
//! - state: the fp32 master weights, the fp32 gradients (every parameter's, allocated at the
//!   first forward), the two fp32 AdamW moments, and under bf16-mixed the bf16 working copies of
//!   the GEMM weights (`SteelModel::gemm_params`);
//! - activations of one micro-batch: every value forward produces, in its dtype (the tape keeps
//!   them until backward consumes them), plus the tensors the ops save beside them (norm
//!   statistics, attention's log-sum-exp, the fused loss's `dx` and `dW` of the head);
//! - workspaces: the largest transient of the step — the lm_head + cross-entropy chunk (its
//!   f32 logits, and their bf16 copy for the gradient GEMMs), or the first layer's activation
//!   gradients when backward starts, whichever is larger.
//!
//! Token ids and one-element scalars are counted too; size-class rounding of a caching allocator
//! is not (a GPU's allocator rounds each block up by less than 25%).

use crate::recipe::Recipe;
use steel_model::{FfnType, MlpType, Precision, SteelConfig};

/// Bytes of one training run on one device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MemoryPlan {
    /// fp32 master weights.
    pub weights: u64,
    /// bf16 working copies (0 in fp32).
    pub working_copies: u64,
    /// fp32 gradients.
    pub gradients: u64,
    /// fp32 AdamW moments (m and v).
    pub moments: u64,
    /// The values and saved tensors of one micro-batch's forward.
    pub activations: u64,
    /// The largest transient buffer set of the step.
    pub workspaces: u64,
    /// The sum.
    pub total: u64,
}

/// The host's available memory (`MemAvailable` of /proc/meminfo), bytes; `None` where unknown.
pub fn host_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Refuses `needed` bytes of host memory when the machine has less available (the caller names
/// what needs them and the flag that skips the check).
pub fn check_host_memory(needed: u64, what: &str, skip_flag: &str) -> crate::Result<()> {
    match host_available_bytes() {
        Some(avail) if needed > avail => Err(crate::TrainError::Invalid(format!(
            "{what} needs about {} of memory but this machine has {} available; make it \
             smaller, or pass {skip_flag} to try anyway",
            gib(needed),
            gib(avail)
        ))),
        _ => Ok(()),
    }
}

/// `bytes` as GiB with two decimals (MiB below 1 GiB).
pub fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    }
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} = weights {} + working copies {} + gradients {} + moments {} + activations {} \
             (one micro-batch) + workspaces {}",
            gib(self.total),
            gib(self.weights),
            gib(self.working_copies),
            gib(self.gradients),
            gib(self.moments),
            gib(self.activations),
            gib(self.workspaces)
        )
    }
}

/// The plan for `config` trained by `recipe` on one device in `precision` (see the module docs).
/// It depends on shapes only: nothing is probed.
pub fn memory_plan(config: &SteelConfig, recipe: &Recipe, precision: Precision) -> MemoryPlan {
    // Counted in u128 (absurd recipes cannot wrap), reported saturated to u64.
    let f = 4u128;
    let c = if precision == Precision::Bf16Mixed { 2u128 } else { 4 };
    let bf = precision == Precision::Bf16Mixed;
    let shapes = config.param_shapes();
    let numel = |s: &Vec<usize>| s.iter().product::<usize>() as u128;
    let params: u128 = shapes.iter().map(|(_, s)| numel(s)).sum();
    let shape_of = |name: &str| shapes.iter().find(|(n, _)| n == name).map(|(_, s)| s.clone());
    // The GEMM weights (the working copies): every 2-D projection and the q/k/v biases, the
    // head (the embedding when tied); not the norms, phi, scale or an untied embedding.
    let gemm: u128 = shapes
        .iter()
        .filter(|(n, _)| {
            let proj = n.contains("_proj.") || n == "lm_head.weight";
            let tied_embed = config.tie_word_embeddings && n == "model.embed_tokens.weight";
            proj || tied_embed
        })
        .map(|(_, s)| numel(s))
        .sum();
    let (b, t) = (recipe.train.micro_batch as u128, recipe.data.seq_len as u128);
    let n = b * t;
    let h = config.hidden_size as u128;
    let hd = config.head_dim() as u128;
    let qd = config.num_attention_heads as u128 * hd;
    let kvd = config.kv_heads() as u128 * hd;
    let heads = config.num_attention_heads as u128;
    let v = config.vocab_size as u128;
    let layers = config.num_hidden_layers as u128;
    let cast = |bytes_c: u128| if bf { bytes_c } else { 0 };
    // The width of an MLP's inner stage, from layer 0's shapes.
    let inner = |prefix: &str| -> u128 {
        let name = match config.mlp_type {
            MlpType::Senet => format!("{prefix}.gate_up_proj.weight"),
            MlpType::Raw => format!("{prefix}.gate_proj.weight"),
        };
        shape_of(&name).map_or(0, |s| s[0] as u128)
    };
    // One MLP on `rows` rows whose input is f32: its values (the output counted by the caller).
    let mlp = |rows: u128, width: u128| -> u128 {
        let x16 = cast(rows * h * c);
        match config.mlp_type {
            // a, b, inner (bf16), then a2, b2 (f32) and their swiglu.
            MlpType::Senet => x16 + 3 * rows * width * c + 2 * rows * h * f,
            // a, b, inner (bf16); the down projection is the output.
            MlpType::Raw => x16 + 3 * rows * width * c,
        }
    };
    let norm = |first: bool| -> u128 {
        // add_rms_norm: sum and y (f32) and rstd; the first layer's rms_norm has no sum.
        (if first { 1 } else { 2 }) * n * h * f + n * f
    };
    let mut act = 0u128;
    // Token ids and targets (I32), the embedding's output (f32; a bf16 tied table adds its copy).
    act += 2 * n * 4;
    act += n * h * f + if bf && config.tie_word_embeddings { n * h * c } else { 0 };
    for l in 0..layers {
        act += norm(l == 0);
        // q, k, v with bias; rope of q and k; attention's o (bf16) and lse; o_proj out (f32).
        act += cast(n * h * c) + (qd + 2 * kvd) * n * c + (qd + kvd) * n * c + qd * n * c;
        act += b * heads * t * f + n * h * f;
        act += norm(false);
        let prefix = format!("model.layers.{l}.mlp");
        act += match config.ffn_type {
            FfnType::SoftMoeV3 => {
                let slots = (config.n_experts * config.slots_per_expert) as u128;
                let rows = b * slots; // slot rows over all experts
                let width = inner(&format!("{prefix}.experts.0"));
                // Routing: xn, x_norm, phi_norm, dispatch, combine; the slot inputs and their
                // expert-major transpose; the combine output.
                let route = n * h * f + n * f + slots * f + 2 * n * slots * f;
                let mixes = 2 * rows * h * f + n * h * f;
                let experts = match config.mlp_type {
                    // The fused op: its bf16 input, y, a1, b1, u, a2, b2, and y cast to f32.
                    MlpType::Senet => {
                        cast(rows * h * c)
                            + rows * h * c
                            + 3 * rows * width * c
                            + 2 * rows * h * c
                            + cast(rows * h * f)
                    }
                    // Per expert: its slice, the MLP and its output, then the concatenation.
                    MlpType::Raw => rows * h * f + mlp(rows, width) + rows * h * f + rows * h * f,
                };
                route + mixes + experts + rows * h * f
            }
            FfnType::Raw => mlp(n, inner(&prefix)) + n * h * f,
        };
    }
    // The final norm, the head's bf16 input, the loss, and the fused loss's dx and dW.
    act += norm(layers == 0) + cast(n * h * c) + 2 * f + n * h * f;
    let head = v * h;
    act += head * f;
    // The loss chunk: f32 logits, and under bf16 their bf16 copy for the GEMMs; or the start of
    // backward (the last layer's gradients of its f32 values, about six [N, H] buffers).
    let chunk = (recipe.train.chunk_tokens.max(1) as u128).min(n);
    let loss_chunk = chunk * v * f + cast(chunk * v * c) + chunk * f;
    let backward = 6 * n * h * f;
    let workspaces = loss_chunk.max(backward);
    let weights = params * f;
    let working_copies = if bf { gemm * 2 } else { 0 };
    let gradients = params * f;
    let moments = 2 * params * f;
    let sat = |x: u128| u64::try_from(x).unwrap_or(u64::MAX);
    MemoryPlan {
        weights: sat(weights),
        working_copies: sat(working_copies),
        gradients: sat(gradients),
        moments: sat(moments),
        activations: sat(act),
        workspaces: sat(workspaces),
        total: sat(weights + working_copies + gradients + moments + act + workspaces),
    }
}
