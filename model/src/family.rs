//! What a model family tells the rest of the crate: its sizes and its parameter list. Each
//! family's config implements [`Family`] in the family's own file (`qwen2.rs`, `gpt.rs`), and
//! `ModelConfig` dispatches to it in one place (`ModelConfig::family`).

use crate::params::ParamSpec;

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
    /// The config as `config.json` holds it.
    fn to_json(&self) -> serde_json::Value;
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

/// The first of `sizes` above its limit, as an error.
pub(crate) fn check_limits(sizes: &[(&str, usize, usize)]) -> Result<(), String> {
    match sizes.iter().find(|(_, v, max)| v > max) {
        Some((name, v, max)) => Err(format!(
            "{name} {v} is larger than any model sft supports (at most {max})"
        )),
        None => Ok(()),
    }
}
