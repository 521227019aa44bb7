//! The Steel model on token ids: configuration, named parameters (HF names and shapes), seeded
//! initialisation, the forward pass on the tape (training loss) and without it (logits), and
//! HuggingFace safetensors import/export.
//!
//! Text never enters this crate: the tokenizer lives in `data`, and `bin` joins the two.

mod config;
mod forward;
mod generate;
mod init;
mod io;
mod model;

pub use config::{reference_auto_map, FfnType, MlpType, SteelConfig, TokenIds};
pub use forward::{TrainingBatch, DEFAULT_IGNORE_INDEX};
pub use generate::{GenerationOptions, SeqCache};
pub use io::{
    generation_config, is_plain_name, load_from_bytes, load_hf_dir, save_hf_dir, ExportOptions,
    SaveDType, REMOTE_CODE_FILES,
};
pub use model::{Precision, SteelModel};

use std::path::{Path, PathBuf};

/// Errors of the model crate, each naming what a user can fix (key, file, tensor).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("config key `{key}`: {msg}")]
    Config { key: String, msg: String },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("tensor `{name}` is missing from the checkpoint")]
    Missing { name: String },
    #[error("tensor `{name}` is in the checkpoint but not part of this model")]
    Extra { name: String },
    #[error("tensor `{name}` has shape {found:?}, the model expects {expected:?}")]
    Shape { name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("tensor `{name}` has dtype {dtype}; supported are F32, BF16, F16 and F64")]
    DType { name: String, dtype: String },
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Runtime(#[from] steel_runtime::Error),
    #[error(transparent)]
    Autograd(#[from] steel_autograd::Error),
}

impl ModelError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> Self {
        ModelError::File { path: path.to_path_buf(), msg: e.to_string() }
    }

    /// Adds the file to a config error.
    pub(crate) fn in_file(self, path: &Path) -> Self {
        match self {
            ModelError::Config { key, msg } => {
                ModelError::Config { key, msg: format!("{msg} (in {})", path.display()) }
            }
            other => other,
        }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
