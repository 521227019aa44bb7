//! `SteelModel`: a config plus its named parameters in a `ParamStore`, in model order.

use crate::init::{draw, init_of};
use crate::{FfnType, MlpType, ModelError, Result, SteelConfig};
use std::collections::HashMap;
use std::sync::Arc;
use steel_autograd::{ParamId, ParamOptions, ParamStore};
use steel_runtime::{Backend, DType, Tensor};

/// The projections of one MLP (an expert or the dense FFN).
#[derive(Clone, Debug)]
pub(crate) enum Mlp {
    Senet { gate_up: ParamId, up: ParamId, gate_down: ParamId, down: ParamId },
    Swiglu { gate: ParamId, up: ParamId, down: ParamId },
}

#[derive(Clone, Debug)]
pub(crate) enum Ffn {
    SoftMoe { phi: ParamId, scale: ParamId, experts: Vec<Mlp> },
    Dense(Mlp),
}

#[derive(Clone, Debug)]
pub(crate) struct Layer {
    pub input_norm: ParamId,
    pub q_w: ParamId,
    pub q_b: ParamId,
    pub k_w: ParamId,
    pub k_b: ParamId,
    pub v_w: ParamId,
    pub v_b: ParamId,
    pub o_w: ParamId,
    pub post_norm: ParamId,
    pub ffn: Ffn,
}

/// A Steel model: its configuration and parameters (HF names) on one backend.
pub struct SteelModel {
    pub config: SteelConfig,
    pub params: ParamStore,
    pub(crate) embed: ParamId,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: ParamId,
    /// `None` when the head is tied to the embedding.
    pub(crate) head: Option<ParamId>,
    /// The dtype of the GEMM and attention operands: the masters' (fp32), or BF16 under bf16
    /// mixed precision ([`SteelModel::use_bf16_mixed`]).
    pub(crate) compute: DType,
}

/// How a model computes (`train.precision`, the dtype table of docs/ARCHITECTURE.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Everything in the masters' dtype (f32).
    Fp32,
    /// bf16 working copies of the GEMM weights, bf16 operands for the GEMMs and attention; the
    /// residual stream, norms, routing, loss, gradients and optimizer state stay f32.
    Bf16Mixed,
}

impl SteelModel {
    /// A freshly initialised model (DESIGN §1 init), seeded, parameters in `dtype`.
    pub fn init(
        config: SteelConfig,
        backend: Arc<dyn Backend>,
        dtype: DType,
        seed: u64,
    ) -> Result<SteelModel> {
        config.validate()?;
        let shapes = config.param_shapes();
        let mut tensors = HashMap::with_capacity(shapes.len());
        for (name, shape) in &shapes {
            let n = shape.iter().product();
            let values = draw(init_of(&config, name), name, n, seed);
            let t = Tensor::from_vec(values, shape)?;
            let t = if dtype == DType::F32 { t } else { backend.cast(&t, dtype)? };
            tensors.insert(name.clone(), t);
        }
        Self::from_tensors(config, backend, tensors)
    }

    /// A model from named CPU tensors; every parameter must be present with its exact shape,
    /// and nothing else.
    pub fn from_tensors(
        config: SteelConfig,
        backend: Arc<dyn Backend>,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<SteelModel> {
        config.validate()?;
        let mut store = ParamStore::new(backend.clone());
        let mut ids = HashMap::new();
        for (name, shape) in config.param_shapes() {
            let t =
                tensors.remove(&name).ok_or_else(|| ModelError::Missing { name: name.clone() })?;
            if t.shape() != shape.as_slice() {
                return Err(ModelError::Shape { name, expected: shape, found: t.shape().to_vec() });
            }
            check_finite(&name, &t)?;
            let t = if t.device() == backend.device() { t } else { backend.upload(&t)? };
            let id = store.insert(name.clone(), t, ParamOptions { weight_decay: true })?;
            ids.insert(name, id);
        }
        if let Some(name) = tensors.keys().min() {
            return Err(ModelError::Extra { name: name.clone() });
        }
        let id = |n: String| ids[&n];
        let mlp = |prefix: &str| match config.mlp_type {
            MlpType::Senet => Mlp::Senet {
                gate_up: id(format!("{prefix}.gate_up_proj.weight")),
                up: id(format!("{prefix}.up_proj.weight")),
                gate_down: id(format!("{prefix}.gate_down_proj.weight")),
                down: id(format!("{prefix}.down_proj.weight")),
            },
            MlpType::Raw => Mlp::Swiglu {
                gate: id(format!("{prefix}.gate_proj.weight")),
                up: id(format!("{prefix}.up_proj.weight")),
                down: id(format!("{prefix}.down_proj.weight")),
            },
        };
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                let ffn = match config.ffn_type {
                    FfnType::SoftMoeV3 => Ffn::SoftMoe {
                        phi: id(format!("{p}.mlp.phi")),
                        scale: id(format!("{p}.mlp.scale")),
                        experts: (0..config.n_experts)
                            .map(|e| mlp(&format!("{p}.mlp.experts.{e}")))
                            .collect(),
                    },
                    FfnType::Raw => Ffn::Dense(mlp(&format!("{p}.mlp"))),
                };
                Layer {
                    input_norm: id(format!("{p}.input_layernorm.weight")),
                    q_w: id(format!("{p}.self_attn.q_proj.weight")),
                    q_b: id(format!("{p}.self_attn.q_proj.bias")),
                    k_w: id(format!("{p}.self_attn.k_proj.weight")),
                    k_b: id(format!("{p}.self_attn.k_proj.bias")),
                    v_w: id(format!("{p}.self_attn.v_proj.weight")),
                    v_b: id(format!("{p}.self_attn.v_proj.bias")),
                    o_w: id(format!("{p}.self_attn.o_proj.weight")),
                    post_norm: id(format!("{p}.post_attention_layernorm.weight")),
                    ffn,
                }
            })
            .collect();
        let head = (!config.tie_word_embeddings).then(|| id("lm_head.weight".into()));
        Ok(SteelModel {
            embed: id("model.embed_tokens.weight".into()),
            norm: id("model.norm.weight".into()),
            head,
            layers,
            params: store,
            config,
            compute: DType::F32,
        })
    }

    /// The parameters that feed GEMMs (the projections, the experts, the head): the ones that
    /// get bf16 working copies under bf16 mixed precision. Norm weights, the soft-MoE's `phi`
    /// and `scale`, and an untied embedding stay fp32-only.
    pub fn gemm_params(&self) -> Vec<ParamId> {
        let mlp_ids = |m: &Mlp| match m {
            Mlp::Senet { gate_up, up, gate_down, down } => vec![*gate_up, *up, *gate_down, *down],
            Mlp::Swiglu { gate, up, down } => vec![*gate, *up, *down],
        };
        let mut out = Vec::new();
        for l in &self.layers {
            out.extend([l.q_w, l.q_b, l.k_w, l.k_b, l.v_w, l.v_b, l.o_w]);
            match &l.ffn {
                Ffn::SoftMoe { experts, .. } => experts.iter().for_each(|e| out.extend(mlp_ids(e))),
                Ffn::Dense(m) => out.extend(mlp_ids(m)),
            }
        }
        out.push(self.head_id());
        out
    }

    /// Switches the model to `precision`: under `Bf16Mixed` every [`gemm_params`] parameter gets
    /// a bf16 working copy (cast from its master) that forward reads, and forward casts the f32
    /// activations in front of the GEMMs. Only fp32 masters can run bf16-mixed.
    ///
    /// [`gemm_params`]: SteelModel::gemm_params
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        match precision {
            Precision::Fp32 => Ok(()),
            Precision::Bf16Mixed => {
                let master = self.params.get(self.embed).value.dtype();
                if master != DType::F32 {
                    return Err(ModelError::Input(format!(
                        "bf16-mixed needs fp32 master weights, the model holds {master}"
                    )));
                }
                for id in self.gemm_params() {
                    self.params.set_working_copy(id, DType::BF16)?;
                }
                self.compute = DType::BF16;
                Ok(())
            }
        }
    }

    /// The dtype of the residual stream (the masters').
    pub(crate) fn stream_dtype(&self) -> DType {
        self.params.get(self.embed).value.dtype()
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        self.params.backend()
    }

    /// The parameter holding the output projection (the embedding when tied).
    pub(crate) fn head_id(&self) -> ParamId {
        self.head.unwrap_or(self.embed)
    }

    /// A parameter's value by HF name.
    pub fn param(&self, name: &str) -> Option<&Tensor> {
        self.params.id(name).map(|id| &self.params.get(id).value)
    }
}

/// A weight with a NaN or an infinity is refused when loaded, naming the tensor and the first
/// bad element (such a model would only print NaN losses and garbage tokens). Host tensors are
/// checked; a tensor already on a device was produced by Steel.
fn check_finite(name: &str, t: &Tensor) -> Result<()> {
    if t.device() != steel_runtime::Device::Cpu {
        return Ok(());
    }
    let g = t.cpu_read()?;
    let bad = match &*g {
        steel_runtime::CpuStorage::F32(v) => {
            v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i] as f64))
        }
        steel_runtime::CpuStorage::F64(v) => {
            v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i]))
        }
        steel_runtime::CpuStorage::BF16(v) => {
            v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i].to_f64()))
        }
        _ => None,
    };
    match bad {
        Some((i, v)) => Err(ModelError::Input(format!(
            "tensor `{name}` holds {v} at element {i}: the weights are damaged (not finite)"
        ))),
        None => Ok(()),
    }
}
