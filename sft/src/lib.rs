//! Supervised fine-tuning on candle: loss, optimizer, schedule, training loop, checkpoints.
//!
//! The only crate that sees both tokens and tensors. It composes `sft-tokenizer`, `sft-data` and
//! `sft-model` into a training run driven by one [`TrainConfig`].

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod hub;
mod kernels;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod prepcache;
pub mod quality;
pub mod schedule;
pub mod setup;
pub mod step;
mod stream;
pub mod train;

use std::path::{Path, PathBuf};

pub use crate::config::TrainConfig;
pub use crate::optim::{AdamW, OptimConfig, StepStats};
pub use crate::schedule::{ScheduleConfig, ScheduleKind};
pub use crate::train::{train, Event, Replan, RunOptions, Summary};

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
