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
            // Saved moments are host tensors: onto the store's device, then its dtype.
            let place = |t: Tensor| -> Result<Tensor> {
                let t = if t.device() == be.device() { t } else { be.upload(&t)? };
                Ok(if t.dtype() == dt { t } else { be.cast(&t, dt)? })
            };
            out.push((place(m)?, place(v)?));
        }
        Ok(Optimizer { config, moments: out, step })
    }

    /// The moments of every parameter, in store order (for checkpoints).
    pub fn moments(&self) -> &[(Tensor, Tensor)] {
        &self.moments
    }

    /// One step at learning rate `lr` from the accumulated gradients, which are then zeroed
    /// (also when the step is skipped): [`Optimizer::step_on_device`] with a loss of 0, settled.
    pub fn step(&mut self, store: &ParamStore, lr: f64) -> Result<StepReport> {
        let be = store.backend();
        let loss = be.zeros(&[1], DType::F32)?;
        let pending = self.step_on_device(store, lr, &loss)?;
        Ok(self.settle(store, pending)?.1)
    }

    /// Queues the guarded step of a training step on the store's device
    /// (`Backend::adamw_step_guarded`): the gradient norm, the verdict on it and `loss` (skip
    /// when either is not finite), clipping and AdamW, then zeroes the gradients — nothing is
    /// read back. [`Optimizer::settle`] reads the verdict: the step's one host synchronisation.
    pub fn step_on_device(
        &mut self,
        store: &ParamStore,
        lr: f64,
        loss: &Tensor,
    ) -> Result<PendingStep> {
        if self.moments.len() != store.len() {
            return Err(TrainError::Invalid(format!(
                "the optimizer holds {} parameters, the store {}",
                self.moments.len(),
                store.len()
            )));
        }
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
                    copy: p.working().cloned(),
                })
            })
            .collect::<Result<_>>()?;
        let hp = AdamW {
            lr: lr as f32,
            beta1: self.config.beta1,
            beta2: self.config.beta2,
            eps: self.config.eps,
            step: self.step + 1,
            grad_scale: 1.0,
        };
        let status = store.backend().adamw_step_guarded(&params, hp, loss, self.config.clip)?;
        store.zero_grads()?;
        Ok(PendingStep { status })
    }

    /// Reads a queued step's verdict (one download on a GPU): `(loss, report)`. AdamW's step
    /// count (bias correction) advances only when the step was applied.
    pub fn settle(
        &mut self,
        store: &ParamStore,
        pending: PendingStep,
    ) -> Result<(f64, StepReport)> {
        let be = store.backend();
        let host = if pending.status.device() == steel_runtime::Device::Cpu {
            pending.status
        } else {
            be.download(&pending.status)?
        };
        let v = host.to_f64_vec()?;
        let (loss, grad_norm, clip_scale, skipped) = (v[0], v[1], v[2], v[3] != 0.0);
        if !skipped {
            self.step += 1;
        }
        Ok((loss, StepReport { grad_norm, clip_scale, skipped }))
    }
}

/// A step queued by [`Optimizer::step_on_device`]: its `[loss, grad_norm, factor, skipped]` on
/// the device.
pub struct PendingStep {
    status: Tensor,
}
