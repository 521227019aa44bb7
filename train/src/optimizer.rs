//! AdamW over a `ParamStore`: fp32 moments per parameter, global-norm clipping, and a step whose
//! gradient norm is NaN or infinite skipped (never applied) and reported.

use crate::{Result, TrainError};
use steel_autograd::ParamStore;
use steel_runtime::{AdamW, AdamWParam, DType, Tensor};

/// Hyper-parameters (the reference's: β 0.9/0.95, weight decay 0.05 on all parameters, eps 1e-8,
/// clipping at 1.0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Global L2 norm the gradients are clipped to (`None`: no clipping).
    pub clip: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.05, clip: Some(1.0) }
    }
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// The factor the gradients were multiplied by (1 when not clipped).
    pub clip_scale: f64,
    /// True when the norm was not finite: nothing was applied.
    pub skipped: bool,
}

/// AdamW state for every parameter of a store, in store order.
pub struct Optimizer {
    pub config: AdamWConfig,
    /// `(m, v)` per parameter (fp32, or f64 for f64 parameters).
    moments: Vec<(Tensor, Tensor)>,
    /// Optimizer steps applied so far.
    pub step: u64,
}

impl Optimizer {
    pub fn new(store: &ParamStore, config: AdamWConfig) -> Result<Optimizer> {
        let be = store.backend();
        let moments = store
            .iter()
            .map(|(_, p)| {
                let dt = if p.value.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
                Ok((be.zeros(p.value.shape(), dt)?, be.zeros(p.value.shape(), dt)?))
            })
            .collect::<Result<_>>()?;
        Ok(Optimizer { config, moments, step: 0 })
    }

    /// An optimizer continuing from saved moments (store order) after `step` applied steps.
    pub fn restore(
        store: &ParamStore,
        config: AdamWConfig,
        moments: Vec<(Tensor, Tensor)>,
        step: u64,
    ) -> Result<Optimizer> {
        if moments.len() != store.len() {
            return Err(TrainError::Invalid(format!(
                "{} saved moments for {} parameters",
                moments.len(),
                store.len()
            )));
        }
        let be = store.backend();
        let mut out = Vec::with_capacity(moments.len());
        for ((_, p), (m, v)) in store.iter().zip(moments) {
            if m.shape() != p.value.shape() || v.shape() != p.value.shape() {
                return Err(TrainError::Invalid(format!(
                    "optimizer state of {} has shape {:?}, the parameter {:?}",
                    p.name,
                    m.shape(),
                    p.value.shape()
                )));
            }
            let dt = if p.value.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
            out.push((be.upload(&be.cast(&m, dt)?)?, be.upload(&be.cast(&v, dt)?)?));
        }
        Ok(Optimizer { config, moments: out, step })
    }

    /// The moments of every parameter, in store order (for checkpoints).
    pub fn moments(&self) -> &[(Tensor, Tensor)] {
        &self.moments
    }

    /// One step at learning rate `lr` from the accumulated gradients, which are then zeroed
    /// (also when the step is skipped).
    pub fn step(&mut self, store: &ParamStore, lr: f64) -> Result<StepReport> {
        if self.moments.len() != store.len() {
            return Err(TrainError::Invalid(format!(
                "the optimizer holds {} parameters, the store {}",
                self.moments.len(),
                store.len()
            )));
        }
        let grad_norm = store.grad_norm()?;
        if !grad_norm.is_finite() {
            store.zero_grads()?;
            return Ok(StepReport { grad_norm, clip_scale: 0.0, skipped: true });
        }
        let clip_scale = match self.config.clip {
            Some(c) if grad_norm > c => c / grad_norm,
            _ => 1.0,
        };
        let params: Vec<AdamWParam> = store
            .iter()
            .zip(&self.moments)
            .map(|((id, p), (m, v))| {
                Ok(AdamWParam {
                    param: p.value.clone(),
                    grad: store.grad_buffer(id)?,
                    m: m.clone(),
                    v: v.clone(),
                    weight_decay: if p.options.weight_decay {
                        self.config.weight_decay
                    } else {
                        0.0
                    },
                    copy: None,
                })
            })
            .collect::<Result<_>>()?;
        let hp = AdamW {
            lr: lr as f32,
            beta1: self.config.beta1,
            beta2: self.config.beta2,
            eps: self.config.eps,
            step: self.step + 1,
            grad_scale: clip_scale as f32,
        };
        store.backend().adamw_step(&params, hp)?;
        self.step += 1;
        store.zero_grads()?;
        Ok(StepReport { grad_norm, clip_scale, skipped: false })
    }
}
