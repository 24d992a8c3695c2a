//! What a model family tells the rest of the crate: its sizes and its parameter list. Each
//! family's config implements [`Family`] in the family's own file (`qwen2.rs`, `gemma.rs`, `gpt.rs`), and
//! `ModelConfig` dispatches to it in one place (`ModelConfig::family`).

use std::any::Any;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::backward::Grads;
use crate::ops::Mask;
use crate::params::ParamSpec;
use crate::{LayerKv, Result, Weights};

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
    /// Keys at least this many positions behind a query are not attended (Mistral).
    fn sliding_window(&self) -> Option<usize> {
        None
    }
    /// The logits pass through `c tanh(z / c)` (Gemma 2's `final_logit_softcapping`).
    fn final_logit_softcap(&self) -> Option<f64> {
        None
    }
    /// The config as `config.json` holds it.
    fn to_json(&self) -> Value;
    /// `generation_config.json` beside a saved checkpoint, for families whose tools read one.
    fn generation_config(&self) -> Option<Value> {
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
    crate::input_error("backward: the trace comes from another kind of model")
}

/// `initializer_range` when a config names none (`transformers`' default).
pub(crate) fn default_initializer_range() -> f64 {
    0.02
}

/// The largest width a config may give (vocabulary, hidden and MLP sizes, heads, the attention
/// width heads x head_dim, GPT's block size): far above any real model (vocabularies reach
/// 262k, hidden sizes 16k), and small enough that no product of shapes overflows and that a
/// mistyped size is reported here, not by a loop or an allocation that never ends.
pub(crate) const MAX_WIDTH: usize = 1 << 22;
/// Real models have at most a few hundred layers.
pub(crate) const MAX_LAYERS: usize = 1 << 12;
/// The RoPE tables are built whole, positions x head_dim / 2 entries each (1 GiB in f32 at the
/// limit; Qwen2.5's 1M-token context takes 65M).
pub(crate) const MAX_ROPE_ENTRIES: usize = 1 << 28;

/// The sizes of a Hugging Face decoder, under `config.json`'s names: checked alike for every
/// family that reads one.
pub(crate) struct DecoderSizes {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
}

impl DecoderSizes {
    /// Positive sizes, whole groups of query heads per key/value head, an even `head_dim`
    /// (RoPE rotates pairs), every size within its limit, a positive `rms_norm_eps`.
    pub(crate) fn check(&self) -> Result<(), String> {
        let (heads, kv_heads, head_dim) = (
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        );
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", heads),
            ("num_key_value_heads", kv_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            ));
        }
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {head_dim} must be even and positive (RoPE)"
            ));
        }
        let width = |n: usize| n.saturating_mul(head_dim);
        check_limits(&[
            ("vocab_size", self.vocab_size, MAX_WIDTH),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads x head_dim", width(heads), MAX_WIDTH),
            ("num_key_value_heads x head_dim", width(kv_heads), MAX_WIDTH),
            (
                "max_position_embeddings x head_dim / 2 (RoPE table entries)",
                self.max_position_embeddings.saturating_mul(head_dim / 2),
                MAX_ROPE_ENTRIES,
            ),
        ])?;
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        Ok(())
    }
}

/// `generation_config.json` as `transformers` writes it from a model config: its bos and eos
/// ids (where set).
pub(crate) fn hf_generation_config(bos: &Option<Value>, eos: &Option<Value>) -> Value {
    let mut gen = serde_json::Map::new();
    gen.insert("_from_model_config".into(), Value::Bool(true));
    for (key, value) in [("bos_token_id", bos), ("eos_token_id", eos)] {
        if let Some(v) = value.as_ref().filter(|v| !v.is_null()) {
            gen.insert(key.into(), v.clone());
        }
    }
    Value::Object(gen)
}

/// The first of `sizes` above its limit, as an error.
pub(crate) fn check_limits(sizes: &[(&str, usize, usize)]) -> Result<(), String> {
    match sizes.iter().find(|(_, v, max)| v > max) {
        Some((name, v, max)) => Err(format!(
            "{name} {v} is larger than any model sft supports (at most {max})"
        )),
        None => Ok(()),
    }
}
