//! Linear warmup, then cosine decay to `min_lr` (spec §5.3), counted in optimizer steps.
//!
//! `lr(s)` for the 1-based step s: `max · s / warmup` while `s < warmup`; `min` after `decay`;
//! otherwise `min + ½ (1 + cos(π r)) (max − min)` with `r = (s − warmup) / (decay − warmup)`.
//! The reference computed the same formula per micro-iteration and could change the rate inside
//! an accumulation window; Steel evaluates it once per optimizer step.

use crate::{Result, TrainError};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub max_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    /// The step at which the cosine reaches `min_lr` (the reference's `lr_decay_iters`).
    pub decay_steps: u64,
}

impl LrSchedule {
    pub fn new(max_lr: f64, min_lr: f64, warmup_steps: u64, decay_steps: u64) -> Result<Self> {
        if !(max_lr >= 0.0 && min_lr >= 0.0 && max_lr.is_finite() && min_lr <= max_lr) {
            return Err(TrainError::Invalid(format!(
                "learning rates must satisfy 0 ≤ min_lr ({min_lr}) ≤ lr ({max_lr})"
            )));
        }
        if decay_steps < warmup_steps {
            return Err(TrainError::Invalid(format!(
                "decay steps ({decay_steps}) must not be fewer than warmup steps ({warmup_steps})"
            )));
        }
        Ok(LrSchedule { max_lr, min_lr, warmup_steps, decay_steps })
    }

    /// The learning rate of optimizer step `step` (1-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.max_lr * step as f64 / self.warmup_steps as f64;
        }
        if step > self.decay_steps || self.decay_steps == self.warmup_steps {
            return if step > self.decay_steps { self.min_lr } else { self.max_lr };
        }
        let r = (step - self.warmup_steps) as f64 / (self.decay_steps - self.warmup_steps) as f64;
        self.min_lr + 0.5 * (1.0 + (std::f64::consts::PI * r).cos()) * (self.max_lr - self.min_lr)
    }
}
