//! Named architectures for fresh models: `config.json` objects without `vocab_size`, which the
//! caller sets from its tokenizer (and may override any other field) before
//! [`crate::ModelConfig::from_json_str`] and [`crate::Model::init`].

use serde_json::{json, Value};

use crate::gpt::GPT_MODEL_TYPE;

/// Every preset name, smallest first.
pub const NAMES: &[&str] = &[
    "tiny-gpt",
    "nanogpt-char",
    "nanopoet-gpt",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-llama3",
    "tiny-mistral",
    "tiny-gemma3",
    "bench-qwen2",
    "smollm2-135m",
    "qwen2.5-0.5b",
    "gemma3-1b",
    "llama3.2-1b",
    "qwen2.5-3b",
    "llama3.1-8b",
];

/// The preset's config fields, or `None` for an unknown name.
pub fn preset(name: &str) -> Option<Value> {
    let v = match name {
        // Seconds per step on a laptop CPU: smoke tests and demos.
        "tiny-gpt" => json!({
            "model_type": GPT_MODEL_TYPE,
            "n_embd": 64, "n_layer": 2, "n_head": 4, "block_size": 128,
            "dropout": 0.0, "bias": true, "tie_word_embeddings": true,
        }),
        // nanoGPT's config/train_shakespeare_char.py (10.7M parameters with a 65-char vocab).
        "nanogpt-char" => json!({
            "model_type": GPT_MODEL_TYPE,
            "n_embd": 384, "n_layer": 6, "n_head": 6, "block_size": 256,
            "dropout": 0.2, "bias": false, "tie_word_embeddings": true,
        }),
        // The nanopoet tutorial's model (and benchmark configuration (c)).
        "nanopoet-gpt" => json!({
            "model_type": GPT_MODEL_TYPE,
            "n_embd": 256, "n_layer": 8, "n_head": 8, "block_size": 256,
            "dropout": 0.1, "bias": true, "tie_word_embeddings": true,
        }),
        // Benchmark configurations (a) and (b): a small Qwen2 whose cost the vocabulary dominates.
        "bench-qwen2" => json!({
            "model_type": "qwen2",
            "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
            "hidden_act": "silu", "initializer_range": 0.02,
        }),
        "tiny-qwen2" => json!({
            "model_type": "qwen2",
            "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
            "hidden_act": "silu", "initializer_range": 0.02,
        }),
        "tiny-qwen3" => json!({
            "model_type": "qwen3",
            "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": true, "attention_bias": false, "hidden_act": "silu",
            "initializer_range": 0.02,
        }),
        // Llama 3.x's layout at the tiny-qwen2 size, with llama3 rope scaling (an original
        // context of 128 positions, so training at 512 uses the scaled frequencies).
        "tiny-llama3" => json!({
            "model_type": "llama",
            "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
            "hidden_act": "silu", "initializer_range": 0.02, "attention_bias": false,
            "mlp_bias": false,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
        }),
        // Mistral's layout at the tiny-qwen2 size, with a sliding window of 128 positions.
        "tiny-mistral" => json!({
            "model_type": "mistral",
            "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": false,
            "hidden_act": "silu", "initializer_range": 0.02, "sliding_window": 128,
        }),
        // Gemma 3's layout at the tiny-qwen2 size: five sliding layers (window 128) per full one,
        // q/k norms, RoPE bases 1e4 (sliding) and 1e6 (full).
        "tiny-gemma3" => json!({
            "model_type": "gemma3_text",
            "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 6,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "query_pre_attn_scalar": 16, "max_position_embeddings": 512, "sliding_window": 128,
            "sliding_window_pattern": 6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
            "hidden_activation": "gelu_pytorch_tanh", "initializer_range": 0.02,
        }),
        // google/gemma-3-1b-pt's architecture (999,885,952 parameters with its 262,144-token
        // vocabulary).
        "gemma3-1b" => json!({
            "model_type": "gemma3_text",
            "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
            "query_pre_attn_scalar": 256, "max_position_embeddings": 32768, "sliding_window": 512,
            "sliding_window_pattern": 6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
            "hidden_activation": "gelu_pytorch_tanh", "initializer_range": 0.02,
        }),
        // HuggingFaceTB/SmolLM2-135M's architecture (vocabulary 49,152).
        "smollm2-135m" => json!({
            "model_type": "llama",
            "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
            "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
            "hidden_act": "silu", "initializer_range": 0.041666666666666664,
            "attention_bias": false, "mlp_bias": false,
        }),
        // meta-llama/Llama-3.2-1B's architecture (1,235,814,400 parameters with its 128,256-token
        // vocabulary).
        "llama3.2-1b" => json!({
            "model_type": "llama",
            "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
            "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": true, "hidden_act": "silu", "initializer_range": 0.02,
            "attention_bias": false, "mlp_bias": false,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        }),
        // Qwen2.5-0.5B's architecture (494M parameters with its 151,936-token vocabulary).
        "qwen2.5-0.5b" => json!({
            "model_type": "qwen2",
            "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
            "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
            "hidden_act": "silu", "initializer_range": 0.02, "use_sliding_window": false,
        }),
        // Qwen2.5-3B's architecture (3.09B parameters with its 151,936-token vocabulary).
        "qwen2.5-3b" => json!({
            "model_type": "qwen2",
            "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
            "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 32768,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
            "hidden_act": "silu", "initializer_range": 0.02, "use_sliding_window": false,
        }),
        // Llama 3.1 8B's architecture (8.03B parameters with its 128,256-token vocabulary).
        "llama3.1-8b" => json!({
            "model_type": "llama",
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": false, "hidden_act": "silu", "initializer_range": 0.02,
            "attention_bias": false, "mlp_bias": false,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        }),
        _ => return None,
    };
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    #[test]
    fn every_preset_is_a_valid_config_once_given_a_vocabulary() {
        for name in NAMES {
            let mut v = preset(name).unwrap();
            assert!(v.get("vocab_size").is_none(), "{name}");
            v["vocab_size"] = json!(65);
            let cfg = ModelConfig::from_json_str(&v.to_string())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(cfg.vocab_size(), 65);
        }
        assert!(preset("gpt-9000").is_none());
        let mut v = preset("nanogpt-char").unwrap();
        v["vocab_size"] = json!(65);
        // nanoGPT reports 10.65M (it excludes position embeddings): 10,745,088 - 256 * 384.
        assert_eq!(
            ModelConfig::from_json_str(&v.to_string())
                .unwrap()
                .num_params(),
            10_745_088
        );
        let mut v = preset("qwen2.5-0.5b").unwrap();
        v["vocab_size"] = json!(151936);
        assert_eq!(
            ModelConfig::from_json_str(&v.to_string())
                .unwrap()
                .num_params(),
            494_032_768
        );
        let mut v = preset("llama3.2-1b").unwrap();
        v["vocab_size"] = json!(128_256);
        assert_eq!(
            ModelConfig::from_json_str(&v.to_string())
                .unwrap()
                .num_params(),
            1_235_814_400
        );
        for (name, vocab, params) in [
            ("gemma3-1b", 262_144, 999_885_952),
            ("qwen2.5-3b", 151_936, 3_085_938_688),
            ("llama3.1-8b", 128_256, 8_030_261_248),
        ] {
            let mut v = preset(name).unwrap();
            v["vocab_size"] = json!(vocab);
            let cfg = ModelConfig::from_json_str(&v.to_string()).unwrap();
            assert_eq!(cfg.num_params(), params, "{name}");
        }
    }
}
