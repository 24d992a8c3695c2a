//! The configs of Gemma 2 and Gemma 3 (text) (`transformers`' `Gemma2ForCausalLM` and
//! `Gemma3ForCausalLM`), as the [`Layout`] of the shared decoder (`decoder.rs`).
//!
//! Against Llama's layout: the embedding is scaled by `sqrt(hidden)`; every RMSNorm multiplies
//! by `1 + w` (gains are stored around 0); each layer norms the attention's and the MLP's output
//! too (`post_attention_layernorm`, `pre_`/`post_feedforward_layernorm`); the MLP gate is GELU
//! (tanh approximation); scores are scaled by `query_pre_attn_scalar^-0.5`; layers alternate
//! between sliding-window (`sliding_attention`) and full attention, each kind with its own RoPE
//! base; Gemma 2 soft-caps the attention scores and the logits (`c tanh(x / c)`), Gemma 3 norms
//! each query and key head (`q_norm`, `k_norm`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::decoder::RopeParams;
use crate::decoder::{Activation, Gain, Layout, NormNames};
use crate::hf::{INPUT_NORM, POST_ATTN_NORM};
use crate::hfconfig::{default_initializer_range, rope_scaling, DecoderSizes};
use crate::rope::RopeScaling;

// Gemma's own module names; the rest are Llama's (`crate::hf`).
const PRE_FF_NORM: &str = "pre_feedforward_layernorm";
const POST_FF_NORM: &str = "post_feedforward_layernorm";

/// Gemma's norms: `post_attention_layernorm` normalises the attention's output, and the MLP has
/// a norm before and after.
const NORMS: NormNames = NormNames {
    attn_in: INPUT_NORM,
    attn_out: Some(POST_ATTN_NORM),
    mlp_in: PRE_FF_NORM,
    mlp_out: Some(POST_FF_NORM),
};

/// The `model_type`s this file reads.
pub(crate) const GEMMA_MODEL_TYPES: [&str; 2] = ["gemma2", "gemma3_text"];

/// A Gemma 2 or Gemma 3 text decoder, read from a Hugging Face `config.json`. Fields that only
/// select behaviour are read from `extra` (and written back through it) with `transformers`'
/// defaults for the model type.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RawGemmaConfig")]
pub struct GemmaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub initializer_range: f64,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    /// Every other field of `config.json`, kept so that a saved config round-trips.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// Biases on q/k/v/o (`attention_bias`).
    #[serde(skip)]
    pub attention_bias: bool,
    /// Scores are scaled by `query_pre_attn_scalar^-0.5` (not `head_dim^-0.5`).
    #[serde(skip)]
    pub query_pre_attn_scalar: f64,
    /// Per layer: whether it is a sliding-window layer (`layer_types`).
    #[serde(skip)]
    pub sliding: Vec<bool>,
    /// The window of the sliding layers (`sliding_window`; none: they attend everything).
    #[serde(skip)]
    pub sliding_window: Option<usize>,
    /// Gemma 2's `c tanh(s / c)` on attention scores (`attn_logit_softcapping`).
    #[serde(skip)]
    pub attn_softcap: Option<f64>,
    /// `final_logit_softcapping`.
    #[serde(skip)]
    pub final_softcap: Option<f64>,
    /// RoPE base and scaling of the full-attention layers.
    #[serde(skip)]
    pub rope_global: RopeParams,
    /// RoPE base and scaling of the sliding-window layers.
    #[serde(skip)]
    pub rope_local: RopeParams,
    /// The decoder this config describes.
    #[serde(skip)]
    pub(crate) layout: Layout,
}

/// The serde image of `config.json` before defaults and validation.
#[derive(Deserialize)]
struct RawGemmaConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_true")]
    tie_word_embeddings: bool,
    #[serde(default = "default_initializer_range")]
    initializer_range: f64,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_true() -> bool {
    true
}

/// `transformers`' Gemma defaults: head_dim, query_pre_attn_scalar, sliding_window.
const DEFAULT_HEAD_DIM: usize = 256;
const DEFAULT_QUERY_PRE_ATTN_SCALAR: f64 = 256.0;
const DEFAULT_SLIDING_WINDOW: u64 = 4096;

/// A number of `extra`: absent or null gives `default`.
fn opt_f64(
    extra: &Map<String, Value>,
    key: &str,
    default: Option<f64>,
) -> Result<Option<f64>, String> {
    match extra.get(key) {
        None => Ok(default),
        Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
            _ => Err(format!("{key} {v} must be a positive number or null")),
        },
    }
}

/// The RoPE base and scaling of one layer type from a `rope_parameters` entry.
fn rope_entry(field: &str, v: &Value) -> Result<RopeParams, String> {
    let scaling = rope_scaling(field, v)?;
    let theta = match v.get("rope_theta") {
        Some(t) => t
            .as_f64()
            .filter(|t| t.is_finite() && *t > 0.0)
            .ok_or_else(|| format!("{field}.rope_theta {t} must be positive"))?,
        None => return Err(format!("{field}.rope_theta is missing")),
    };
    Ok((theta, scaling))
}

/// (global, local) RoPE: transformers 5's `rope_parameters` (one entry per layer type for Gemma
/// 3, a single one for Gemma 2), or the older `rope_theta` / `rope_local_base_freq` /
/// `rope_scaling` (which applies to the full-attention layers).
fn rope_params(
    model_type: &str,
    extra: &Map<String, Value>,
) -> Result<(RopeParams, RopeParams), String> {
    let gemma3 = model_type == "gemma3_text";
    if let Some(p) = extra.get("rope_parameters").filter(|v| !v.is_null()) {
        if gemma3 && p.get("full_attention").is_some() {
            let entry = |kind: &str| match p.get(kind) {
                Some(v) if !v.is_null() => rope_entry(&format!("rope_parameters.{kind}"), v),
                _ => Err(format!("rope_parameters.{kind} is missing")),
            };
            return Ok((entry("full_attention")?, entry("sliding_attention")?));
        }
        let one = rope_entry("rope_parameters", p)?;
        if gemma3 {
            return Err(
                "rope_parameters of gemma3_text must have one entry per layer type \
                 (full_attention, sliding_attention)"
                    .into(),
            );
        }
        return Ok((one, one));
    }
    let num = |k: &str, default: f64| -> Result<f64, String> {
        Ok(opt_f64(extra, k, Some(default))?.unwrap_or(default))
    };
    let scaling = match extra.get("rope_scaling").filter(|v| !v.is_null()) {
        Some(v) => rope_scaling("rope_scaling", v)?,
        None => RopeScaling::None,
    };
    if gemma3 {
        let global = (num("rope_theta", 1_000_000.0)?, scaling);
        let local = (num("rope_local_base_freq", 10_000.0)?, RopeScaling::None);
        Ok((global, local))
    } else {
        let one = (num("rope_theta", 10_000.0)?, scaling);
        Ok((one, one))
    }
}

/// Per layer, whether it slides: `layer_types`, else Gemma 2's alternation (even layers slide)
/// or Gemma 3's `sliding_window_pattern` (every `n`-th layer is global).
fn layer_kinds(
    model_type: &str,
    layers: usize,
    extra: &Map<String, Value>,
) -> Result<Vec<bool>, String> {
    if let Some(types) = extra.get("layer_types").filter(|v| !v.is_null()) {
        let types = types.as_array().ok_or("layer_types must be a list")?;
        if types.len() != layers {
            return Err(format!(
                "layer_types has {} entries for {layers} layers",
                types.len()
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(format!(
                    "layer_types entry {t} is not supported (sliding_attention, full_attention)"
                )),
            })
            .collect();
    }
    let pattern =
        match model_type {
            "gemma2" => 2,
            _ => match extra.get("sliding_window_pattern") {
                None | Some(Value::Null) => 6,
                Some(v) => v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                    format!("sliding_window_pattern {v} must be a positive integer")
                })? as usize,
            },
        };
    Ok((0..layers).map(|i| (i + 1) % pattern != 0).collect())
}

impl TryFrom<RawGemmaConfig> for GemmaConfig {
    type Error = String;

    fn try_from(raw: RawGemmaConfig) -> Result<Self, String> {
        let mt = raw.model_type.as_str();
        if !GEMMA_MODEL_TYPES.contains(&mt) {
            return Err(format!(
                "model_type {mt:?} is not a Gemma model ({})",
                GEMMA_MODEL_TYPES.join(", ")
            ));
        }
        let extra = &raw.extra;
        let act = extra
            .get("hidden_activation")
            .and_then(Value::as_str)
            .unwrap_or("gelu_pytorch_tanh");
        if !matches!(act, "gelu_pytorch_tanh" | "gelu_new") {
            return Err(format!(
                "hidden_activation {act:?} is not supported (only \"gelu_pytorch_tanh\")"
            ));
        }
        if extra
            .get("use_bidirectional_attention")
            .and_then(Value::as_bool)
            == Some(true)
        {
            return Err("use_bidirectional_attention = true is not supported".into());
        }
        if let Some(factor) = extra.get("partial_rotary_factor").and_then(Value::as_f64) {
            if factor != 1.0 {
                return Err(format!("partial_rotary_factor {factor} is not supported"));
            }
        }
        let attention_bias = extra.get("attention_bias").and_then(Value::as_bool) == Some(true);
        let query_pre_attn_scalar = opt_f64(
            extra,
            "query_pre_attn_scalar",
            Some(DEFAULT_QUERY_PRE_ATTN_SCALAR),
        )?
        .ok_or("query_pre_attn_scalar must be a number")?;
        let sliding_window = match extra.get("sliding_window") {
            None => Some(DEFAULT_SLIDING_WINDOW as usize),
            Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(w) if w > 0 => Some(w as usize),
                _ => return Err(format!("sliding_window {v} must be a positive integer")),
            },
        };
        let gemma2 = mt == "gemma2";
        // Gemma 3's attention has no soft-cap in transformers, whatever its config says.
        let attn_softcap = match gemma2 {
            true => opt_f64(extra, "attn_logit_softcapping", Some(50.0))?,
            false => None,
        };
        let final_softcap = opt_f64(extra, "final_logit_softcapping", gemma2.then_some(30.0))?;
        let (rope_global, rope_local) = rope_params(mt, extra)?;
        let sliding = layer_kinds(mt, raw.num_hidden_layers, extra)?;

        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        let head_dim = raw.head_dim.unwrap_or(DEFAULT_HEAD_DIM);
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
        // What q is multiplied by so that the attention's `1 / sqrt(head_dim)` becomes
        // `1 / sqrt(query_pre_attn_scalar)`; none when they agree (Gemma 2 2B/9B, Gemma 3).
        let query_scale =
            Some((head_dim as f64 / query_pre_attn_scalar).sqrt()).filter(|&s| s != 1.0);
        let layout = Layout {
            tie_word_embeddings: raw.tie_word_embeddings,
            initializer_range: raw.initializer_range,
            norm_names: NORMS,
            gain: Gain::PlusOne,
            activation: Activation::GeluTanh,
            qkv_bias: attention_bias,
            o_bias: attention_bias,
            mlp_bias: false,
            qk_norm: mt == "gemma3_text",
            // `sqrt(hidden)`, as `transformers` rounds it to f32.
            embed_scale: Some((raw.hidden_size as f64).sqrt() as f32 as f64),
            query_scale,
            attn_softcap,
            final_softcap,
            sliding: sliding.clone(),
            window: sliding_window,
            rope_global,
            rope_local,
            sizes,
        };
        Ok(GemmaConfig {
            model_type: raw.model_type,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings,
            initializer_range: raw.initializer_range,
            bos_token_id: raw.bos_token_id,
            eos_token_id: raw.eos_token_id,
            extra: raw.extra,
            attention_bias,
            query_pre_attn_scalar,
            sliding,
            sliding_window,
            attn_softcap,
            final_softcap,
            rope_global,
            rope_local,
            layout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// google/gemma-3-1b-it's config.json as transformers 4.50 wrote it: RoPE in the older
    /// fields, the layer kinds from `sliding_window_pattern`.
    const GEMMA3_1B: &str = r#"{
      "architectures": ["Gemma3ForCausalLM"],
      "attention_bias": false, "attention_dropout": 0.0, "attn_logit_softcapping": null,
      "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
      "final_logit_softcapping": null, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
      "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912,
      "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
      "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
      "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
      "rope_scaling": null, "rope_theta": 1000000, "sliding_window": 512,
      "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
      "use_cache": true, "vocab_size": 262144
    }"#;

    fn parse(s: &str) -> Result<GemmaConfig, String> {
        serde_json::from_str(s).map_err(|e| e.to_string())
    }

    #[test]
    fn gemma3_1b_reads_its_layer_kinds_and_two_rope_bases() {
        let c = parse(GEMMA3_1B).unwrap();
        let globals: Vec<usize> = (0..26).filter(|&i| !c.sliding[i]).collect();
        assert_eq!(globals, [5, 11, 17, 23]);
        assert_eq!(c.rope_global, (1e6, RopeScaling::None));
        assert_eq!(c.rope_local, (1e4, RopeScaling::None));
        assert_eq!(
            (c.sliding_window, c.attn_softcap, c.final_softcap),
            (Some(512), None, None)
        );
        assert_eq!(c.layout.query_scale, None);
        assert!(c.layout.qk_norm && c.tie_word_embeddings);
        // Round trip: every key written back as read (and the default tie written out).
        let back = serde_json::to_value(&c).unwrap();
        let orig: Value = serde_json::from_str(GEMMA3_1B).unwrap();
        for (k, v) in orig.as_object().unwrap() {
            assert_eq!(back.get(k), Some(v), "{k}");
        }
        assert_eq!(back["tie_word_embeddings"], Value::Bool(true));
    }

    #[test]
    fn gemma2_defaults_are_transformers() {
        let s = GEMMA3_1B
            .replace(
                r#""model_type": "gemma3_text""#,
                r#""model_type": "gemma2""#,
            )
            .replace(r#""attn_logit_softcapping": null,"#, "")
            .replace(r#""final_logit_softcapping": null,"#, "")
            .replace(
                r#""query_pre_attn_scalar": 256, "#,
                r#""query_pre_attn_scalar": 144, "#,
            );
        let c = parse(&s).unwrap();
        assert_eq!((c.attn_softcap, c.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!(c.sliding[..4], [true, false, true, false]);
        // Gemma 2 has one RoPE base: rope_theta.
        assert_eq!(c.rope_global, c.rope_local);
        assert_eq!(c.rope_global.0, 1e6);
        assert!(!c.layout.qk_norm);
        let s = (256.0f64 / 144.0).sqrt();
        assert_eq!(c.layout.query_scale, Some(s));
    }

    #[test]
    fn what_gemma_cannot_do_is_refused_by_name() {
        for (from, to, needle) in [
            (
                r#""use_cache": true"#,
                r#""use_bidirectional_attention": true"#,
                "bidirectional",
            ),
            (
                r#""hidden_activation": "gelu_pytorch_tanh""#,
                r#""hidden_activation": "relu""#,
                "relu",
            ),
            (
                r#""rope_scaling": null"#,
                r#""rope_scaling": {"rope_type": "yarn", "factor": 8.0}"#,
                "yarn",
            ),
            (
                r#""use_cache": true"#,
                r#""layer_types": ["chunked_attention"]"#,
                "layer_types",
            ),
            (
                r#""sliding_window": 512"#,
                r#""sliding_window": 0"#,
                "sliding_window",
            ),
            (r#""head_dim": 256"#, r#""head_dim": 255"#, "head_dim"),
        ] {
            let s = GEMMA3_1B.replace(from, to);
            assert_ne!(s, GEMMA3_1B, "{from}");
            let err = parse(&s).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
