//! Model configurations: Hugging Face `config.json` for the Qwen2 family, and our own format for
//! the small GPT.
//!
//! A Qwen-family config keeps every field it does not interpret in [`Qwen2Config::extra`], so a
//! checkpoint saved here carries the user's `config.json` through unchanged. Options that would
//! change the maths and that the model does not implement (RoPE scaling, sliding windows, partial
//! rotary, MLP bias) are rejected when the config is read, never silently ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// The `model_type` of [`GptConfig`].
pub const GPT_MODEL_TYPE: &str = "sft-gpt";

/// A decoder of the Qwen2 family, read from a Hugging Face `config.json`.
///
/// - `qwen2`: q/k/v projections always have a bias (as `transformers`' Qwen2), o_proj never.
/// - `qwen3`: `attention_bias` (default false) on q/k/v/o; RMSNorm over `head_dim` on every query
///   and key head (`q_norm`, `k_norm`) before RoPE.
/// - `llama`: `attention_bias` (default false) on q/k/v/o; no q/k norm.
///
/// All use a SwiGLU MLP, grouped-query attention, RoPE in the "rotate half" layout, and RMSNorm.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RawQwen2Config")]
pub struct Qwen2Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Qwen3 sets it; otherwise `hidden_size / num_attention_heads`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    /// Read from `rope_theta` or, as `transformers` 5 writes it, `rope_parameters.rope_theta`.
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Only `"silu"` is supported.
    pub hidden_act: String,
    /// Bias on q/k/v/o for `qwen3` and `llama`; ignored by `qwen2`, whose q/k/v always have one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    pub initializer_range: f64,
    /// An id, a list of ids, or absent.
    pub bos_token_id: Option<Value>,
    /// An id or a list of ids (Qwen chat models list several).
    pub eos_token_id: Option<Value>,
    /// Every other field of `config.json`, kept so that a saved config round-trips.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The serde image of `config.json` before defaults and validation.
#[derive(Deserialize)]
struct RawQwen2Config {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    rope_theta: Option<f64>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "default_hidden_act")]
    hidden_act: String,
    attention_bias: Option<bool>,
    #[serde(default = "default_initializer_range")]
    initializer_range: f64,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// `transformers`' default for all three model types.
fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_hidden_act() -> String {
    "silu".to_string()
}

fn default_initializer_range() -> f64 {
    0.02
}

/// `transformers`' default RoPE base when a config names none.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

/// The largest width a config may give (vocabulary, hidden and MLP sizes, heads, the attention
/// width heads x head_dim, GPT's block size): far above any real model (vocabularies reach
/// 262k, hidden sizes 16k), and small enough that no product of shapes overflows and that a
/// mistyped size is reported here, not by a loop or an allocation that never ends.
const MAX_WIDTH: usize = 1 << 22;
/// Real models have at most a few hundred layers.
const MAX_LAYERS: usize = 1 << 12;
/// The RoPE tables are built whole, positions x head_dim / 2 entries each (1 GiB in f32 at the
/// limit; Qwen2.5's 1M-token context takes 65M).
const MAX_ROPE_ENTRIES: usize = 1 << 28;

/// The first of `sizes` above its limit, as an error.
fn check_limits(sizes: &[(&str, usize, usize)]) -> std::result::Result<(), String> {
    match sizes.iter().find(|(_, v, max)| v > max) {
        Some((name, v, max)) => Err(format!(
            "{name} {v} is larger than any model sft supports (at most {max})"
        )),
        None => Ok(()),
    }
}

impl TryFrom<RawQwen2Config> for Qwen2Config {
    type Error = String;

    fn try_from(raw: RawQwen2Config) -> std::result::Result<Self, String> {
        if !matches!(raw.model_type.as_str(), "qwen2" | "qwen3" | "llama") {
            return Err(format!(
                "model_type {:?} is not a Qwen2-family model (qwen2, qwen3, llama)",
                raw.model_type
            ));
        }
        if raw.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?} is not supported (only \"silu\")",
                raw.hidden_act
            ));
        }
        let extra = &raw.extra;
        if let Some(v) = extra.get("rope_scaling").filter(|v| !v.is_null()) {
            return Err(format!("rope_scaling is not supported (found {v})"));
        }
        let mut theta = raw.rope_theta;
        if let Some(params) = extra.get("rope_parameters").filter(|v| !v.is_null()) {
            let rope_type = params
                .get("rope_type")
                .or_else(|| params.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if rope_type != "default" {
                return Err(format!(
                    "rope_parameters.rope_type {rope_type:?} is not supported (only \"default\")"
                ));
            }
            if let Some(factor) = params.get("partial_rotary_factor").and_then(Value::as_f64) {
                if factor != 1.0 {
                    return Err(format!("partial_rotary_factor {factor} is not supported"));
                }
            }
            if let Some(t) = params.get("rope_theta") {
                let t = t
                    .as_f64()
                    .ok_or_else(|| format!("rope_parameters.rope_theta: {t}"))?;
                if theta.is_some_and(|top| top != t) {
                    return Err(format!(
                        "rope_theta {} and rope_parameters.rope_theta {t} disagree",
                        theta.unwrap_or_default()
                    ));
                }
                theta = Some(t);
            }
        }
        if let Some(factor) = extra.get("partial_rotary_factor").and_then(Value::as_f64) {
            if factor != 1.0 {
                return Err(format!("partial_rotary_factor {factor} is not supported"));
            }
        }
        if extra.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err("use_sliding_window = true is not supported".to_string());
        }
        if let Some(types) = extra.get("layer_types").and_then(Value::as_array) {
            if let Some(t) = types.iter().find(|t| t.as_str() != Some("full_attention")) {
                return Err(format!(
                    "layer_types entry {t} is not supported (only full_attention)"
                ));
            }
        }
        if extra.get("mlp_bias").and_then(Value::as_bool) == Some(true) {
            return Err("mlp_bias = true is not supported".to_string());
        }

        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        let sizes = [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("num_attention_heads", heads),
            ("num_key_value_heads", kv_heads),
            ("max_position_embeddings", raw.max_position_embeddings),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size.is_multiple_of(heads) => raw.hidden_size / heads,
            None => {
                return Err(format!(
                    "hidden_size {} is not a multiple of num_attention_heads {heads}",
                    raw.hidden_size
                ))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(format!(
                "head_dim {head_dim} must be even and positive (RoPE)"
            ));
        }
        let width = |n: usize| n.saturating_mul(head_dim);
        check_limits(&[
            ("vocab_size", raw.vocab_size, MAX_WIDTH),
            ("hidden_size", raw.hidden_size, MAX_WIDTH),
            ("intermediate_size", raw.intermediate_size, MAX_WIDTH),
            ("num_hidden_layers", raw.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads x head_dim", width(heads), MAX_WIDTH),
            ("num_key_value_heads x head_dim", width(kv_heads), MAX_WIDTH),
            (
                "max_position_embeddings x head_dim / 2 (RoPE table entries)",
                raw.max_position_embeddings.saturating_mul(head_dim / 2),
                MAX_ROPE_ENTRIES,
            ),
        ])?;
        let theta = theta.unwrap_or(DEFAULT_ROPE_THETA);
        if !(theta.is_finite() && theta > 0.0) {
            return Err(format!("rope_theta {theta} must be positive"));
        }
        if raw.rms_norm_eps.is_nan() || raw.rms_norm_eps <= 0.0 {
            return Err(format!(
                "rms_norm_eps {} must be positive",
                raw.rms_norm_eps
            ));
        }

        Ok(Qwen2Config {
            model_type: raw.model_type,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: raw.head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rope_theta: theta,
            rms_norm_eps: raw.rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings,
            hidden_act: raw.hidden_act,
            attention_bias: raw.attention_bias,
            initializer_range: raw.initializer_range,
            bos_token_id: raw.bos_token_id,
            eos_token_id: raw.eos_token_id,
            extra: raw.extra,
        })
    }
}

impl Qwen2Config {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub(crate) fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias == Some(true)
    }

    pub(crate) fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias == Some(true)
    }

    pub(crate) fn qk_norm(&self) -> bool {
        self.model_type == "qwen3"
    }
}

/// A nanoGPT-style decoder: learned positions, pre-LayerNorm blocks, fused qkv projection,
/// tanh-approximated GELU MLP (4x), dropout in training mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    /// Always [`GPT_MODEL_TYPE`].
    pub model_type: String,
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// The context length: positions `0..block_size` have an embedding.
    pub block_size: usize,
    /// Probability for embedding, attention-probability and residual dropout (training only).
    #[serde(default)]
    pub dropout: f64,
    /// Biases in Linear layers and LayerNorms (nanoGPT's switch).
    #[serde(default = "default_true")]
    pub bias: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
}

fn default_true() -> bool {
    true
}

fn default_layer_norm_eps() -> f64 {
    1e-5
}

/// Keys that [`crate::Model::save`] and Hugging Face tooling add to any `config.json`; a GPT
/// config tolerates them and rejects every other unknown key (a typo must not pass silently).
const GPT_IGNORED_KEYS: [&str; 4] = [
    "dtype",
    "torch_dtype",
    "transformers_version",
    "architectures",
];

impl GptConfig {
    fn validate(&self) -> std::result::Result<(), String> {
        if self.model_type != GPT_MODEL_TYPE {
            return Err(format!(
                "model_type {:?} is not {GPT_MODEL_TYPE:?}",
                self.model_type
            ));
        }
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("block_size", self.block_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            ));
        }
        check_limits(&[
            ("vocab_size", self.vocab_size, MAX_WIDTH),
            ("n_embd", self.n_embd, MAX_WIDTH),
            ("n_layer", self.n_layer, MAX_LAYERS),
            ("block_size", self.block_size, MAX_WIDTH),
        ])?;
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout {} is outside [0, 1)", self.dropout));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(format!(
                "layer_norm_eps {} must be positive",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}

/// Either architecture, as read from a checkpoint's `config.json`.
// Unboxed variants keep matching plain; a config exists once per model, so size is irrelevant.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ModelConfig {
    Qwen2(Qwen2Config),
    Gpt(GptConfig),
}

impl ModelConfig {
    /// Reads a `config.json`, dispatching on its `model_type`.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        ModelConfig::from_json_str(&text).map_err(|reason| Error::Config {
            path: path.to_path_buf(),
            reason,
        })
    }

    pub fn from_json_str(s: &str) -> std::result::Result<ModelConfig, String> {
        let mut value: Value = serde_json::from_str(s).map_err(|e| e.to_string())?;
        let obj = value.as_object_mut().ok_or("config is not a JSON object")?;
        let model_type = match obj.get("model_type") {
            Some(Value::String(t)) => t.clone(),
            Some(other) => return Err(format!("model_type {other} is not a string")),
            None => return Err("no model_type".to_string()),
        };
        match model_type.as_str() {
            "qwen2" | "qwen3" | "llama" => {
                serde_json::from_value(value).map(ModelConfig::Qwen2).map_err(|e| e.to_string())
            }
            GPT_MODEL_TYPE => {
                for key in GPT_IGNORED_KEYS {
                    obj.remove(key);
                }
                let cfg: GptConfig = serde_json::from_value(value).map_err(|e| e.to_string())?;
                cfg.validate()?;
                Ok(ModelConfig::Gpt(cfg))
            }
            other => Err(format!(
                "unsupported model_type {other:?} (supported: qwen2, qwen3, llama, {GPT_MODEL_TYPE})"
            )),
        }
    }

    /// Pretty JSON, as written to `config.json`.
    pub fn to_json_string(&self) -> String {
        let value = self.to_json_value();
        serde_json::to_string_pretty(&value).expect("a JSON value always serialises")
    }

    pub(crate) fn to_json_value(&self) -> Value {
        let value = match self {
            ModelConfig::Qwen2(c) => serde_json::to_value(c),
            ModelConfig::Gpt(c) => serde_json::to_value(c),
        };
        value.expect("config fields are plain JSON data")
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Qwen2(c) => c.vocab_size,
            ModelConfig::Gpt(c) => c.vocab_size,
        }
    }

    /// The longest sequence the model accepts (positions `0..max_positions()`).
    pub fn max_positions(&self) -> usize {
        match self {
            ModelConfig::Qwen2(c) => c.max_position_embeddings,
            ModelConfig::Gpt(c) => c.block_size,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::Qwen2(c) => c.hidden_size,
            ModelConfig::Gpt(c) => c.n_embd,
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::Qwen2(c) => c.num_hidden_layers,
            ModelConfig::Gpt(c) => c.n_layer,
        }
    }

    /// Dropout probability in training mode (Qwen2 checkpoints train without dropout here).
    pub fn dropout(&self) -> f64 {
        match self {
            ModelConfig::Qwen2(_) => 0.0,
            ModelConfig::Gpt(c) => c.dropout,
        }
    }

    pub fn tie_word_embeddings(&self) -> bool {
        match self {
            ModelConfig::Qwen2(c) => c.tie_word_embeddings,
            ModelConfig::Gpt(c) => c.tie_word_embeddings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN2_05B: &str = r#"{
      "architectures": ["Qwen2ForCausalLM"],
      "attention_dropout": 0.0,
      "bos_token_id": 151643,
      "eos_token_id": 151643,
      "hidden_act": "silu",
      "hidden_size": 896,
      "initializer_range": 0.02,
      "intermediate_size": 4864,
      "max_position_embeddings": 32768,
      "max_window_layers": 24,
      "model_type": "qwen2",
      "num_attention_heads": 14,
      "num_hidden_layers": 24,
      "num_key_value_heads": 2,
      "rms_norm_eps": 1e-06,
      "rope_scaling": null,
      "rope_theta": 1000000.0,
      "sliding_window": 32768,
      "tie_word_embeddings": true,
      "torch_dtype": "bfloat16",
      "transformers_version": "4.43.1",
      "use_cache": true,
      "use_sliding_window": false,
      "vocab_size": 151936
    }"#;

    fn qwen(cfg: &ModelConfig) -> &Qwen2Config {
        match cfg {
            ModelConfig::Qwen2(c) => c,
            ModelConfig::Gpt(_) => panic!("expected a Qwen2-family config"),
        }
    }

    #[test]
    fn qwen2_05b_parses_and_counts_494m_params() {
        let cfg = ModelConfig::from_json_str(QWEN2_05B).unwrap();
        let q = qwen(&cfg);
        assert_eq!(
            (q.head_dim(), q.rope_theta, q.tie_word_embeddings),
            (64, 1e6, true)
        );
        assert!(q.qkv_bias() && !q.o_bias() && !q.qk_norm());
        assert_eq!(cfg.num_params(), 494_032_768);
        assert_eq!(cfg.max_positions(), 32768);
    }

    #[test]
    fn unknown_fields_round_trip() {
        let cfg = ModelConfig::from_json_str(QWEN2_05B).unwrap();
        let back: Value = serde_json::from_str(&cfg.to_json_string()).unwrap();
        let orig: Value = serde_json::from_str(QWEN2_05B).unwrap();
        for (k, v) in orig.as_object().unwrap() {
            assert_eq!(back.get(k), Some(v), "{k}");
        }
        let again = ModelConfig::from_json_str(&cfg.to_json_string()).unwrap();
        assert_eq!(again.to_json_string(), cfg.to_json_string());
    }

    #[test]
    fn transformers5_rope_parameters() {
        let s = QWEN2_05B.replace(
            r#""rope_theta": 1000000.0,"#,
            r#""rope_parameters": {"rope_theta": 500.0, "rope_type": "default"},"#,
        );
        assert_eq!(
            qwen(&ModelConfig::from_json_str(&s).unwrap()).rope_theta,
            500.0
        );
        let s = QWEN2_05B.replace(
            r#""rope_theta": 1000000.0,"#,
            r#""rope_parameters": {"rope_theta": 500.0, "rope_type": "yarn"},"#,
        );
        assert!(ModelConfig::from_json_str(&s).unwrap_err().contains("yarn"));
    }

    #[test]
    fn unsupported_options_are_errors() {
        let cases = [
            (
                r#""rope_scaling": null"#,
                r#""rope_scaling": {"type": "linear", "factor": 2.0}"#,
                "rope_scaling",
            ),
            (
                r#""use_sliding_window": false"#,
                r#""use_sliding_window": true"#,
                "use_sliding_window",
            ),
            (r#""hidden_act": "silu""#, r#""hidden_act": "gelu""#, "gelu"),
            (
                r#""model_type": "qwen2""#,
                r#""model_type": "mistral""#,
                "mistral",
            ),
            (
                r#""num_key_value_heads": 2"#,
                r#""num_key_value_heads": 3"#,
                "num_key_value_heads",
            ),
        ];
        for (from, to, needle) in cases {
            let s = QWEN2_05B.replace(from, to);
            assert_ne!(s, QWEN2_05B);
            let err = ModelConfig::from_json_str(&s).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    /// Sizes far beyond any model are errors before anything multiplies or allocates them:
    /// they overflowed shape products (a panic), or built specs and RoPE tables without end.
    #[test]
    fn absurd_sizes_and_rope_bases_are_errors() {
        let cases = [
            (
                r#""num_hidden_layers": 24"#,
                r#""num_hidden_layers": 4611686018427387904"#,
            ),
            (r#""num_hidden_layers": 24"#, r#""num_hidden_layers": 5000"#),
            (
                r#""hidden_size": 896"#,
                r#""hidden_size": 4611686018427387904, "head_dim": 64"#,
            ),
            (
                r#""vocab_size": 151936"#,
                r#""vocab_size": 18446744073709551615"#,
            ),
            (
                r#""intermediate_size": 4864"#,
                r#""intermediate_size": 9223372036854775807"#,
            ),
            (
                r#""num_key_value_heads": 2"#,
                r#""head_dim": 4611686018427387904, "num_key_value_heads": 2"#,
            ),
            (
                r#""num_attention_heads": 14"#,
                r#""num_attention_heads": 4611686018427387904, "head_dim": 8"#,
            ),
            (
                r#""max_position_embeddings": 32768"#,
                r#""max_position_embeddings": 1099511627776"#,
            ),
            (r#""rope_theta": 1000000.0"#, r#""rope_theta": 0.0"#),
            (r#""rope_theta": 1000000.0"#, r#""rope_theta": -1.0"#),
        ];
        for (from, to) in cases {
            let s = QWEN2_05B.replace(from, to);
            assert_ne!(s, QWEN2_05B);
            let err = ModelConfig::from_json_str(&s).unwrap_err();
            let field = to[1..].split('"').next().unwrap();
            assert!(err.contains(field), "{to}: {err}");
        }
        // Qwen2.5's 1M-token context is within the limits.
        let long = QWEN2_05B.replace("32768,", "1010000,");
        assert_eq!(
            ModelConfig::from_json_str(&long).unwrap().max_positions(),
            1_010_000
        );
        let gpt = r#"{"model_type": "sft-gpt", "vocab_size": 65, "n_embd": 32, "n_layer": 2,
                      "n_head": 4, "block_size": 64}"#;
        for (field, from, to) in [
            (
                "n_layer",
                "\"n_layer\": 2",
                "\"n_layer\": 4611686018427387904",
            ),
            (
                "block_size",
                "\"block_size\": 64",
                "\"block_size\": 1099511627776",
            ),
        ] {
            let err = ModelConfig::from_json_str(&gpt.replace(from, to)).unwrap_err();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn gpt_defaults_and_typos() {
        let s = r#"{"model_type": "sft-gpt", "vocab_size": 65, "n_embd": 32, "n_layer": 2,
                    "n_head": 4, "block_size": 64, "dtype": "float32"}"#;
        let ModelConfig::Gpt(g) = ModelConfig::from_json_str(s).unwrap() else {
            panic!()
        };
        assert_eq!(
            (g.dropout, g.bias, g.tie_word_embeddings),
            (0.0, true, true)
        );
        assert_eq!((g.layer_norm_eps, g.initializer_range), (1e-5, 0.02));
        let typo = s.replace("\"dtype\"", "\"dropuot\"");
        assert!(ModelConfig::from_json_str(&typo)
            .unwrap_err()
            .contains("dropuot"));
        let bad = s.replace("\"n_head\": 4", "\"n_head\": 5");
        assert!(ModelConfig::from_json_str(&bad)
            .unwrap_err()
            .contains("n_head"));
    }
}
