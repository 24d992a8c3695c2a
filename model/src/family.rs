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
use crate::weights::{Weight, Weights};

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

/// A family's network over a set of weights: an embedding, a stack of layers and a final
/// norm, each with its backward. `passes.rs` walks them (forward, traced forward with or
/// without activation checkpointing, the own backward, the layer-by-layer backward through
/// candle's graph), with one `dyn` call per piece.
pub(crate) trait Network: std::fmt::Debug + Send + Sync {
    /// (vocab, hidden): the embedding when tied, else the head's weight.
    fn lm_head(&self) -> &Weight;
    fn num_layers(&self) -> usize;
    /// What every layer of a pass reads besides its input (masks, rope tables), for queries at
    /// `positions` (b, t) over `t_k` keys (cached and new). `mask` is additive; `None`: every
    /// key is visible.
    fn context(&self, positions: &Tensor, mask: Option<&Mask>, t_k: usize) -> Result<Box<dyn Any>>;
    /// Whether `ctx` is a context this network made (a trace from another network is refused).
    fn owns(&self, ctx: &dyn Any) -> bool;
    /// The first layer's input (b, t, hidden). `seed: Some(_)` is training mode (dropout).
    fn embed(&self, ids: &Tensor, positions: &Tensor, seed: Option<u64>) -> Result<Tensor>;
    /// Layer `i`'s output on `x`; with `keep`, also the activations [`Network::layer_backward`]
    /// reads (the weights must then be detached). `cache`, when given, is extended.
    fn layer(
        &self,
        i: usize,
        x: &Tensor,
        ctx: &dyn Any,
        cache: Option<&mut LayerKv>,
        seed: Option<u64>,
        keep: bool,
    ) -> Result<(Tensor, Option<Box<dyn Any>>)>;
    /// The hidden states: the final norm of the last layer's output.
    fn finish(&self, x: &Tensor) -> Result<Tensor>;
    /// Whether the own backward runs (every op of the network has a fused backward).
    fn own_backward(&self) -> bool {
        true
    }
    /// The gradient of the last layer's output `x` from the hidden states' (parameters'
    /// gradients into `grads`).
    fn finish_backward(&self, x: &Tensor, grad: &Tensor, grads: &mut Grads) -> Result<Tensor>;
    /// The gradient of layer `i`'s input from its output's.
    fn layer_backward(
        &self,
        i: usize,
        acts: Box<dyn Any>,
        grad: &Tensor,
        ctx: &dyn Any,
        grads: &mut Grads,
        seed: Option<u64>,
    ) -> Result<Tensor>;
    /// The embeddings' gradients from the first layer's input's.
    fn embed_backward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        grad: &Tensor,
        grads: &mut Grads,
        seed: Option<u64>,
    ) -> Result<()>;
    /// The same network (config, tables) on other views of its weights.
    fn rebuild(&self, w: &Weights) -> Box<dyn Network>;
}

/// The error for a trace that another family's forward pass made.
pub(crate) fn foreign_trace<T>() -> Result<T> {
    input_error("backward: the trace comes from another kind of model")
}
