//! Steel's autograd: a tape of recorded ops walked in reverse, and named parameters.
//!
//! - [`Tape`] records, in execution order, each op with the tensors its backward needs (moved
//!   into a backward closure). [`Tape::backward`] walks the records in reverse, hands each
//!   closure the gradients of its outputs and gradient buffers for its inputs, then drops the
//!   closure (freeing its saved tensors) and the intermediate values and gradients it consumed.
//! - Gradient convention (as the runtime's): **every backward accumulates (`+=`)**. Buffers are
//!   zero-initialised on first use; a variable used by several ops gets all contributions.
//!   Parameter gradients live in the [`ParamStore`] and persist across tapes, so running several
//!   micro-batches before the optimizer step accumulates them; `ParamStore::zero_grads` resets.
//! - Gradients are f32 (f64 for f64 values), whatever the value's dtype.
//! - With gradients disabled ([`Tape::no_grad`]), ops compute their outputs and record nothing
//!   (inference).

pub mod fixtures;
mod gradcheck;
mod ops;
mod params;
mod tape;

pub use gradcheck::{check_gradients, GradCheck, GradCheckReport};
pub use ops::LossOptions;
pub use params::{Param, ParamId, ParamOptions, ParamStore};
pub use tape::{BackwardCtx, Tape, Var};

/// Errors of the tape.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Runtime(#[from] steel_runtime::Error),
    #[error("{0}")]
    Tape(String),
}

pub type Result<T> = std::result::Result<T, Error>;
