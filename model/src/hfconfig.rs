//! What the Hugging Face `config.json`s of the decoders share: their size fields and limits,
//! RoPE scaling, and the `generation_config.json` written beside a checkpoint.

use serde_json::Value;

use crate::rope::RopeScaling;

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
#[derive(Debug, Clone, PartialEq)]
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

/// `rope_scaling` (or transformers 5's `rope_parameters`): its type and numbers, refusing what
/// is not implemented by name. `dynamic` NTK scaling only changes frequencies for sequences
/// longer than `max_position_embeddings`, which this crate never runs: it is the identity here.
pub(crate) fn rope_scaling(field: &str, v: &Value) -> Result<RopeScaling, String> {
    let rope_type = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64, String> {
        match v.get(k).and_then(Value::as_f64) {
            Some(x) if x.is_finite() && x > 0.0 => Ok(x),
            Some(x) => Err(format!("{field}.{k} {x} must be positive")),
            None => Err(format!(
                "{field}.{k} is required for rope_type {rope_type:?}"
            )),
        }
    };
    match rope_type {
        "default" | "dynamic" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => {
            let s = RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            };
            match s {
                RopeScaling::Llama3 {
                    low_freq_factor: l,
                    high_freq_factor: h,
                    ..
                } if h <= l => Err(format!(
                    "{field}: high_freq_factor {h} must be above low_freq_factor {l}"
                )),
                s => Ok(s),
            }
        }
        other => Err(format!(
            "{field}.rope_type {other:?} is not supported (default, linear, dynamic, llama3)"
        )),
    }
}
