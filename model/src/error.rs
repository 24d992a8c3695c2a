//! The crate's one error type.

use std::path::PathBuf;

use candle_core::DType;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    #[error("{}: tensor {name} is missing", path.display())]
    MissingTensor { name: String, path: PathBuf },
    #[error("{}: unexpected tensor {name} (not a parameter of this model)", path.display())]
    UnexpectedTensor { name: String, path: PathBuf },
    #[error("{}: tensor {name} has shape {found:?}, the config implies {expected:?}", path.display())]
    ShapeMismatch {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A checkpoint whose manifest lists files that are not there (a save or a deletion that
    /// was cut short).
    #[error("{}: incomplete checkpoint: {what}", dir.display())]
    Incomplete { dir: PathBuf, what: String },
    #[error("unsupported dtype {dtype:?} (use f32, f64, bf16 or f16)")]
    UnsupportedDtype { dtype: DType },
    /// Arguments of a forward pass or of generation that the model cannot take.
    #[error("invalid model input: {reason}")]
    Input { reason: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn input_error<T>(reason: impl Into<String>) -> Result<T> {
    Err(Error::Input {
        reason: reason.into(),
    })
}
