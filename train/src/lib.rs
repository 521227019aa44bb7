//! Steel's training building blocks (DESIGN §6): AdamW over the named parameters with global-norm
//! clipping and non-finite-step skipping, the learning-rate schedule in optimizer steps, and
//! crash-safe checkpoint directories.

pub mod checkpoint;
mod optimizer;
mod schedule;

pub use optimizer::{AdamWConfig, Optimizer, StepReport};
pub use schedule::LrSchedule;

/// Errors of the training crate.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Runtime(#[from] steel_runtime::Error),
    #[error(transparent)]
    Autograd(#[from] steel_autograd::Error),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;
