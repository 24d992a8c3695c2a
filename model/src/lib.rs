//! Trainable causal language models on candle: the decoders in Llama's layout (Qwen2/Qwen3,
//! Llama, Mistral, Gemma 2/3) with Hugging Face checkpoints, and a small nanoGPT-style model.
//!
//! [`Model`] owns its parameters as `Var`s under their Hugging Face names
//! ([`Model::params`], in a fixed order), and runs every op with a backward pass, so a loss built
//! on [`Model::forward`] or [`Model::forward_hidden`] trains all of them. `forward` is `&self`,
//! returns every position, and knows nothing of losses or tokenizers; batching is described by
//! explicit positions and an [`AttentionMask`] (padding and packing are segment ids).
//!
//! Training on the CPU in f32/f64 can skip candle's graph: [`Model::forward_traced`] keeps the
//! activations and [`Model::backward`] returns every parameter's gradient from the hidden
//! states' (the same values as candle's backward, bit for bit).
//!
//! Inference uses [`Model::detached`] (no graph is recorded) and a [`KvCache`]; see [`generate`].
//!
//! This file only names things: every item lives in the module that defines it.

pub mod adapter;
mod attention;
mod backward;
mod chacha;
mod checkpoint;
mod config;
pub mod cpu;
mod decoder;
mod dropout;
mod error;
mod family;
mod gemma;
pub mod generate;
pub mod gguf;
mod gpt;
mod hf;
mod hfconfig;
mod kernels;
mod kv;
mod linear;
pub mod lora;
pub mod manifest;
pub mod math;
mod model;
mod norm;
mod ops;
mod params;
mod passes;
pub mod presets;
pub mod quant;
mod qwen2;
mod rope;
#[cfg(test)]
mod testing;
mod weights;

pub use crate::adapter::{
    base_dir, is_adapter_dir, read_adapter_config, AdapterConfig, ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
};
pub use crate::config::ModelConfig;
pub use crate::error::{Error, Result};
pub use crate::gemma::GemmaConfig;
pub use crate::gpt::{GptConfig, GPT_MODEL_TYPE};
pub use crate::kv::KvCache;
pub use crate::linear::{linear_grads, linear_input_grad};
pub use crate::lora::{frozen_matrices, LoraConfig, ALL_LINEAR};
pub use crate::model::{AttentionMask, Model, Trace};
pub use crate::quant::{QWeight, Quantize};
pub use crate::qwen2::Qwen2Config;
pub use crate::rope::RopeScaling;
pub use crate::weights::Weight;
