//! The configs of Qwen2, Qwen3, Llama and Mistral (`transformers`' `Qwen2ForCausalLM`,
//! `Qwen3ForCausalLM`, `LlamaForCausalLM`, `MistralForCausalLM`): what each `config.json` says,
//! as the [`Layout`] of the shared decoder (`decoder.rs`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::decoder::{Activation, Gain, Layout, NormNames};
use crate::hf::{INPUT_NORM, POST_ATTN_NORM};
use crate::hfconfig::{default_initializer_range, rope_scaling, DecoderSizes};
use crate::rope::RopeScaling;

/// Llama's norms: `post_attention_layernorm` is the MLP's input norm.
const NORMS: NormNames = NormNames {
    attn_in: INPUT_NORM,
    attn_out: None,
    mlp_in: POST_ATTN_NORM,
    mlp_out: None,
};

/// A decoder of the Qwen2 family, read from a Hugging Face `config.json`.
///
/// - `qwen2`: q/k/v projections always have a bias (as `transformers`' Qwen2), o_proj never.
/// - `qwen3`: `attention_bias` (default false) on q/k/v/o; RMSNorm over `head_dim` on every query
///   and key head (`q_norm`, `k_norm`) before RoPE.
/// - `llama`: `attention_bias` (default false) on q/k/v/o; no q/k norm; `mlp_bias`, RoPE scaling.
/// - `mistral`: Llama's layout with a `sliding_window` on attention.
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
    /// Every other field of `config.json`, kept so that a saved config round-trips
    /// (`rope_scaling` and `mlp_bias` among them: they are read from here).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// `rope_scaling` / `rope_parameters`, as read (written back through `extra`).
    #[serde(skip)]
    pub rope_scaling: RopeScaling,
    /// Biases on gate/up/down (`mlp_bias`, Llama).
    #[serde(skip)]
    pub mlp_bias: bool,
    /// Mistral's attention window (`sliding_window`).
    #[serde(skip)]
    pub sliding_window: Option<usize>,
    /// The decoder this config describes.
    #[serde(skip)]
    pub(crate) layout: Layout,
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

/// `transformers`' default RoPE base when a config names none.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

/// The RoPE base (`rope_theta`, or transformers 5's `rope_parameters.rope_theta`) and scaling
/// (`rope_scaling` or `rope_parameters`), which must agree where both are given.
fn rope(
    top_theta: Option<f64>,
    extra: &Map<String, Value>,
) -> Result<(Option<f64>, RopeScaling), String> {
    let mut scaling = match extra.get("rope_scaling").filter(|v| !v.is_null()) {
        Some(v) => rope_scaling("rope_scaling", v)?,
        None => RopeScaling::None,
    };
    let mut theta = top_theta;
    if let Some(params) = extra.get("rope_parameters").filter(|v| !v.is_null()) {
        let from_params = rope_scaling("rope_parameters", params)?;
        if scaling != RopeScaling::None && from_params != scaling {
            return Err("rope_scaling and rope_parameters disagree".to_string());
        }
        scaling = from_params;
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
    Ok((theta, scaling))
}

impl TryFrom<RawQwen2Config> for Qwen2Config {
    type Error = String;

    fn try_from(raw: RawQwen2Config) -> Result<Self, String> {
        if !matches!(
            raw.model_type.as_str(),
            "qwen2" | "qwen3" | "llama" | "mistral"
        ) {
            return Err(format!(
                "model_type {:?} is not a Qwen2-family model (qwen2, qwen3, llama, mistral)",
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
        let (theta, scaling) = rope(raw.rope_theta, extra)?;
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
        let mlp_bias = extra.get("mlp_bias").and_then(Value::as_bool) == Some(true);
        // Mistral's `sliding_window` (null: none); Qwen2's is switched by `use_sliding_window`
        // (refused above) and ignored otherwise, as transformers does.
        let sliding_window = match (raw.model_type.as_str(), extra.get("sliding_window")) {
            ("mistral", Some(v)) if !v.is_null() => match v.as_u64() {
                Some(w) if w > 0 => Some(w as usize),
                _ => return Err(format!("sliding_window {v} must be a positive integer")),
            },
            _ => None,
        };

        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        let head_dim = match raw.head_dim {
            Some(d) => d,
            // A zero count is reported by the size checks below.
            None if heads == 0 => 0,
            None if raw.hidden_size.is_multiple_of(heads) => raw.hidden_size / heads,
            None => {
                return Err(format!(
                    "hidden_size {} is not a multiple of num_attention_heads {heads}",
                    raw.hidden_size
                ))
            }
        };
        let sizes = DecoderSizes {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
        };
        sizes.check()?;
        let theta = theta.unwrap_or(DEFAULT_ROPE_THETA);
        if !(theta.is_finite() && theta > 0.0) {
            return Err(format!("rope_theta {theta} must be positive"));
        }
        let model_type = raw.model_type.as_str();
        let layout = Layout {
            tie_word_embeddings: raw.tie_word_embeddings,
            initializer_range: raw.initializer_range,
            norm_names: NORMS,
            gain: Gain::Plain,
            activation: Activation::Silu,
            // Qwen2's q/k/v always have a bias and its o_proj never; the others follow
            // `attention_bias`.
            qkv_bias: model_type == "qwen2" || raw.attention_bias == Some(true),
            o_bias: model_type != "qwen2" && raw.attention_bias == Some(true),
            mlp_bias,
            qk_norm: model_type == "qwen3",
            embed_scale: None,
            query_scale: None,
            attn_softcap: None,
            final_softcap: None,
            sliding: vec![sliding_window.is_some(); sizes.num_hidden_layers],
            window: sliding_window,
            rope_global: (theta, scaling),
            rope_local: (theta, scaling),
            sizes,
        };

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
            rope_scaling: scaling,
            mlp_bias,
            sliding_window,
            layout,
        })
    }
}

impl Qwen2Config {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}
