//! What a network tells the rest of the crate: its sizes, its parameter list, and how to build
//! it. Two kinds implement [`Family`]: `decoder::Layout` (the decoders in Llama's layout, whose
//! configs `qwen2.rs` and `gemma.rs` read) and `gpt::GptConfig`; `ModelConfig::family` is the one
//! place that picks one.

use std::any::Any;

use candle_core::{Device, Tensor};

use crate::backward::Grads;
use crate::error::{input_error, Result};
use crate::kv::LayerKv;
use crate::ops::Mask;
use crate::params::ParamSpec;
use crate::weights::Weights;

pub(crate) trait Family {
    fn vocab_size(&self) -> usize;
    /// The longest sequence the model accepts (positions `0..max_positions()`).
    fn max_positions(&self) -> usize;
    fn hidden_size(&self) -> usize;
    fn num_layers(&self) -> usize;
    /// Dropout probability in training mode.
    fn dropout(&self) -> f64 {
        0.0
    }
    fn tie_word_embeddings(&self) -> bool;
    /// Every trainable tensor, in construction order (`transformers`' `named_parameters` order
    /// for the Hugging Face families); a tied output head is not listed: it is the embedding.
    fn param_specs(&self) -> Vec<ParamSpec>;
    /// The logits pass through `c tanh(z / c)` (Gemma 2's `final_logit_softcapping`).
    fn final_logit_softcap(&self) -> Option<f64> {
        None
    }
    /// The family's network on `w` (the weights named by [`Family::param_specs`]).
    fn network(&self, w: &Weights, device: &Device) -> Result<Box<dyn Network>>;
}

/// A family's network over a set of weights: what `Model` runs, through one `dyn` call per
/// forward or backward pass.
pub(crate) trait Network: std::fmt::Debug + Send + Sync {
    /// (vocab, hidden): the embedding when tied, else the head's weight.
    fn lm_head(&self) -> &Tensor;
    /// Hidden states after the final norm. `mask` is additive; `kv`, when given, holds one entry
    /// per layer that this call extends; `dropout_seed: Some(_)` is training mode.
    fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Mask>,
        kv: Option<&mut [LayerKv]>,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor>;
    /// [`Network::forward_hidden`] keeping what [`Network::backward`] reads (the weights must
    /// be detached); `None` where the family's own backward does not run.
    fn forward_traced(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Mask,
        dropout_seed: Option<u64>,
    ) -> Result<Option<(Tensor, Box<dyn Any>)>>;
    /// Every parameter's gradient (into `grads`) from the hidden states' (`trace` from this
    /// family's `forward_traced`).
    fn backward(&self, trace: Box<dyn Any>, grad: &Tensor, grads: &mut Grads) -> Result<()>;
    /// The same network (config, tables) on other views of its weights.
    fn rebuild(&self, w: &Weights) -> Box<dyn Network>;
}

/// The error for a trace that another family's forward pass made.
pub(crate) fn foreign_trace<T>() -> Result<T> {
    input_error("backward: the trace comes from another kind of model")
}
