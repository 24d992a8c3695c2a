//! The Hugging Face module names of the decoders in Llama's layout (Qwen2, Qwen3, Llama,
//! Mistral, Gemma), written once: each family's parameter specs and constructor read them.

pub(crate) const EMBED: &str = "model.embed_tokens";
pub(crate) const NORM: &str = "model.norm";
pub(crate) const HEAD: &str = "lm_head";
pub(crate) const Q: &str = "self_attn.q_proj";
pub(crate) const K: &str = "self_attn.k_proj";
pub(crate) const V: &str = "self_attn.v_proj";
pub(crate) const O: &str = "self_attn.o_proj";
pub(crate) const Q_NORM: &str = "self_attn.q_norm";
pub(crate) const K_NORM: &str = "self_attn.k_norm";
pub(crate) const GATE: &str = "mlp.gate_proj";
pub(crate) const UP: &str = "mlp.up_proj";
pub(crate) const DOWN: &str = "mlp.down_proj";
pub(crate) const INPUT_NORM: &str = "input_layernorm";
pub(crate) const POST_ATTN_NORM: &str = "post_attention_layernorm";

/// Layer `i`'s module path.
pub(crate) fn layer(i: usize) -> String {
    format!("model.layers.{i}")
}
