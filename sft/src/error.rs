//! The crate's one error type: every message names the file, key or value at fault.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("non-finite {what} ({value}); the run stops here and the last checkpoint is intact")]
    NonFinite { what: String, value: f64 },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A data-parallel run's ranks disagree, or its collectives failed.
    #[error("distributed run: {0}")]
    Distributed(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] sft_model::Error),
    #[error(transparent)]
    Data(#[from] sft_data::Error),
    #[error(transparent)]
    Tokenizer(#[from] sft_tokenizer::Error),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
