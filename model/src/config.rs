//! Model configurations: which family a `config.json` describes (`model_type`), and what every
//! family tells the rest of the crate, dispatched in one place ([`ModelConfig::family`]). Each
//! family's own config (fields, defaults, validation) lives in its file: `qwen2.rs` (Qwen2,
//! Qwen3, Llama, Mistral) and `gemma.rs` (Gemma 2, Gemma 3) describe a `decoder::Layout`,
//! `gpt.rs` our small GPT.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::family::Family;
use crate::gemma::{GemmaConfig, GEMMA_MODEL_TYPES};
use crate::gpt::{GptConfig, GPT_IGNORED_KEYS, GPT_MODEL_TYPE};
use crate::hfconfig::hf_generation_config;
use crate::params::ParamSpec;
use crate::qwen2::Qwen2Config;

/// Any supported architecture, as read from a checkpoint's `config.json`.
// Unboxed variants keep matching plain; a config exists once per model, so size is irrelevant.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ModelConfig {
    Qwen2(Qwen2Config),
    Gemma(GemmaConfig),
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
            "qwen2" | "qwen3" | "llama" | "mistral" => {
                serde_json::from_value(value).map(ModelConfig::Qwen2).map_err(|e| e.to_string())
            }
            t if GEMMA_MODEL_TYPES.contains(&t) => {
                serde_json::from_value(value).map(ModelConfig::Gemma).map_err(|e| e.to_string())
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
                "unsupported model_type {other:?} (supported: qwen2, qwen3, llama, mistral, gemma2, gemma3_text, {GPT_MODEL_TYPE})"
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
            ModelConfig::Gemma(c) => serde_json::to_value(c),
            ModelConfig::Gpt(c) => serde_json::to_value(c),
        };
        value.expect("config fields are plain JSON data")
    }

    /// `generation_config.json` beside a saved checkpoint, for the families whose tools read
    /// one (`transformers` writes its bos and eos ids).
    pub(crate) fn generation_config(&self) -> Option<Value> {
        match self {
            ModelConfig::Qwen2(c) => Some(hf_generation_config(&c.bos_token_id, &c.eos_token_id)),
            ModelConfig::Gemma(c) => Some(hf_generation_config(&c.bos_token_id, &c.eos_token_id)),
            ModelConfig::Gpt(_) => None,
        }
    }

    /// The network this config describes: the one place that matches on the family.
    pub(crate) fn family(&self) -> &dyn Family {
        match self {
            ModelConfig::Qwen2(c) => &c.layout,
            ModelConfig::Gemma(c) => &c.layout,
            ModelConfig::Gpt(c) => c,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.family().vocab_size()
    }

    /// The longest sequence the model accepts (positions `0..max_positions()`).
    pub fn max_positions(&self) -> usize {
        self.family().max_positions()
    }

    pub fn hidden_size(&self) -> usize {
        self.family().hidden_size()
    }

    pub fn num_layers(&self) -> usize {
        self.family().num_layers()
    }

    /// Dropout probability in training mode (Qwen2 checkpoints train without dropout here).
    pub fn dropout(&self) -> f64 {
        self.family().dropout()
    }

    pub fn tie_word_embeddings(&self) -> bool {
        self.family().tie_word_embeddings()
    }

    /// [`params::param_specs`](crate::params): every trainable tensor of the model, the single
    /// source of truth for init, loading, saving and the parameter count.
    pub(crate) fn param_specs(&self) -> Vec<ParamSpec> {
        self.family().param_specs()
    }

    /// Every trainable tensor's shape, computed without allocating (a tied head once).
    pub fn param_shapes(&self) -> Vec<Vec<usize>> {
        self.param_specs().into_iter().map(|s| s.shape).collect()
    }

    /// Number of trainable scalars (a tied head counted once), computed without allocating.
    pub fn num_params(&self) -> usize {
        self.param_specs()
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
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
            _ => panic!("expected a Qwen2-family config"),
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
        assert!(q.layout.qkv_bias && !q.layout.o_bias && !q.layout.qk_norm);
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
                r#""rope_scaling": {"type": "yarn", "factor": 2.0}"#,
                "yarn",
            ),
            (
                r#""rope_scaling": null"#,
                r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#,
                "rope_scaling.low_freq_factor is required",
            ),
            (
                r#""use_sliding_window": false"#,
                r#""use_sliding_window": true"#,
                "use_sliding_window",
            ),
            (r#""hidden_act": "silu""#, r#""hidden_act": "gelu""#, "gelu"),
            (
                r#""model_type": "qwen2""#,
                r#""model_type": "phi3""#,
                "phi3",
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

    /// Llama 3's `rope_scaling` as the Llama 3.2 checkpoints write it, `linear` and `dynamic`
    /// (the identity within `max_position_embeddings`), and `mlp_bias`, are read.
    #[test]
    fn llama_rope_scaling_and_mlp_bias_are_read() {
        use crate::rope::RopeScaling;
        let llama3 = r#""rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}"#;
        let cases = [
            (
                llama3.to_string(),
                RopeScaling::Llama3 {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192.0,
                },
            ),
            (
                r#""rope_scaling": {"type": "linear", "factor": 2.0}"#.to_string(),
                RopeScaling::Linear { factor: 2.0 },
            ),
            (
                r#""rope_scaling": {"type": "dynamic", "factor": 2.0}"#.to_string(),
                RopeScaling::None,
            ),
        ];
        for (json, want) in cases {
            let s = QWEN2_05B.replace(r#""rope_scaling": null"#, &json).replace(
                r#""model_type": "qwen2""#,
                r#""model_type": "llama", "mlp_bias": true"#,
            );
            let cfg = ModelConfig::from_json_str(&s).unwrap();
            assert_eq!(qwen(&cfg).rope_scaling, want);
            assert!(qwen(&cfg).mlp_bias);
            // Written back as read.
            assert!(cfg.to_json_string().contains("rope_scaling"));
            let again = ModelConfig::from_json_str(&cfg.to_json_string()).unwrap();
            assert_eq!(qwen(&again).rope_scaling, want);
        }
        // llama3 on the frequencies: high kept, low divided by the factor, a ramp between.
        let mut inv: Vec<f32> = vec![1.0, 0.01, 1e-4];
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        }
        .apply(&mut inv);
        assert_eq!(inv[0], 1.0);
        assert_eq!(inv[2], 1e-4 / 8.0);
        assert!(inv[1] < 0.01 && inv[1] > 0.01 / 8.0 || inv[1] == 0.01);
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
