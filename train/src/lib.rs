//! Steel's training (DESIGN §6): recipes, the data-parallel training loop with token-weighted
//! accumulation and exact resume, AdamW with global-norm clipping and non-finite-step skipping,
//! the learning-rate schedule in optimizer steps, crash-safe checkpoints and the metrics log.

pub mod checkpoint;
pub mod memory;
pub mod metrics;
mod optimizer;
pub mod prepare;
pub mod recipe;
pub mod run_dir;
mod schedule;
pub mod sft;
pub mod trainer;

pub use memory::{memory_plan, MemoryPlan};
pub use optimizer::{AdamWConfig, Optimizer, PendingStep, StepReport};
pub use recipe::Recipe;
pub use schedule::LrSchedule;
pub use trainer::{dry_run, train, Event, Resume, RunOptions, StepLog, Summary};

/// Errors of the training crate.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Runtime(#[from] steel_runtime::Error),
    #[error(transparent)]
    Autograd(#[from] steel_autograd::Error),
    #[error(transparent)]
    Model(#[from] steel_model::ModelError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;
