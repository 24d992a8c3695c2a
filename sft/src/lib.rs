//! Supervised fine-tuning on candle: loss, optimizer, schedule, training loop, checkpoints.
//!
//! The only crate that sees both tokens and tensors. It composes `sft-tokenizer`, `sft-data` and
//! `sft-model` into a training run driven by one [`TrainConfig`].
//!
//! This file only declares the modules and re-exports the names callers use most; the modules
//! import each other's items from where they are defined, never through here.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod dist;
pub mod error;
pub mod eval;
pub mod feed;
pub mod gguf;
pub mod hub;
mod kernels;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod quality;
pub mod schedule;
pub mod seeds;
pub mod setup;
pub mod step;
pub mod train;

pub use crate::config::TrainConfig;
pub use crate::error::{Error, Result};
pub use crate::optim::{AdamW, OptimConfig, StepStats};
pub use crate::schedule::{ScheduleConfig, ScheduleKind};
pub use crate::train::{train, train_with, Event, Replan, RunOptions, Summary};
