//! Fresh-model initialisation: seeded, thread-count independent, with the intended scales.

mod common;

use candle_core::{DType, Device};
use common::*;
use sft_model::{Model, ModelConfig};

fn qwen_config() -> ModelConfig {
    ModelConfig::from_json_str(
        r#"{"model_type": "qwen2", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128, "initializer_range": 0.05, "tie_word_embeddings": false}"#,
    )
    .unwrap()
}

fn values(m: &Model) -> Vec<(String, Vec<f32>)> {
    m.params()
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            )
        })
        .collect()
}

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[test]
fn init_is_seeded_and_independent_of_threads() {
    let cfg = qwen_config();
    let a = values(&Model::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let b = pool.install(|| values(&Model::init(&cfg, 1, DType::F32, &Device::Cpu).unwrap()));
    assert_eq!(a, b);
    let c = values(&Model::init(&cfg, 2, DType::F32, &Device::Cpu).unwrap());
    assert_ne!(a[0].1, c[0].1);
    // Distinct tensors of one shape get distinct values.
    let by_name = |n: &str| &a.iter().find(|(m, _)| m == n).unwrap().1;
    assert_ne!(
        by_name("model.layers.0.mlp.gate_proj.weight"),
        by_name("model.layers.0.mlp.up_proj.weight")
    );
}

#[test]
fn qwen_init_scales() {
    let model = Model::init(&qwen_config(), 3, DType::F32, &Device::Cpu).unwrap();
    let names: Vec<_> = model.params().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[0], "model.embed_tokens.weight");
    assert_eq!(
        names[names.len() - 2..],
        ["model.norm.weight", "lm_head.weight"]
    );
    assert_eq!(model.params().len(), 1 + 2 * 12 + 2);
    let count: usize = model.params().iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(count, model.config().num_params());
    let shapes: Vec<Vec<usize>> = model
        .params()
        .iter()
        .map(|(_, v)| v.as_tensor().dims().to_vec())
        .collect();
    assert_eq!(shapes, model.config().param_shapes());
    for (name, v) in values(&model) {
        let (mean, std) = mean_std(&v);
        if name.ends_with(".bias") {
            assert!(v.iter().all(|&x| x == 0.0), "{name}");
        } else if name.contains("norm") {
            assert!(v.iter().all(|&x| x == 1.0), "{name}");
        } else {
            assert!(
                mean.abs() < 0.01 && (std - 0.05).abs() < 0.05 * 0.08,
                "{name}: mean {mean}, std {std}"
            );
        }
    }
}

#[test]
fn gpt_init_scales_residual_projections() {
    let model = Model::init(&gpt_config(false, true, 0.0), 3, DType::F32, &Device::Cpu).unwrap();
    for (name, v) in values(&model) {
        let (_, std) = mean_std(&v);
        // nanoGPT: 0.2 / sqrt(2 * n_layer) with n_layer = 2.
        let want = if name.ends_with("c_proj.weight") {
            0.1
        } else {
            0.2
        };
        if name.ends_with(".bias") {
            assert!(v.iter().all(|&x| x == 0.0), "{name}");
        } else if name.contains("ln_") {
            assert!(v.iter().all(|&x| x == 1.0), "{name}");
        } else {
            assert!(
                (std - want).abs() < want * 0.1,
                "{name}: std {std}, want {want}"
            );
        }
    }
}

#[test]
fn init_in_bf16_is_the_rounded_f32_init() {
    let cfg = qwen_config();
    let f = Model::init(&cfg, 4, DType::F32, &Device::Cpu).unwrap();
    let h = Model::init(&cfg, 4, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(h.dtype(), DType::BF16);
    for ((n, a), (_, b)) in f.params().iter().zip(h.params()) {
        assert_eq!(b.dtype(), DType::BF16);
        let rounded = a.to_dtype(DType::BF16).unwrap();
        assert_eq!(max_abs_diff(&rounded, b.as_tensor()), 0.0, "{n}");
    }
}

/// A fresh model quantized as it is drawn (chunks of whole random streams, no f32 matrix held)
/// has the blocks of the same fresh model drawn whole and then quantized.
#[test]
fn drawing_a_quantized_model_gives_the_blocks_of_quantizing_it_after() {
    use candle_core::quantized::GgmlDType;
    // An embedding of 3,000 x 512: 1.5M values, more than one random stream of 2^20.
    let cfg = ModelConfig::from_json_str(
        r#"{"model_type": "qwen2", "vocab_size": 3000, "hidden_size": 512,
            "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    let names = sft_model::frozen_matrices(&cfg, &sft_model::LoraConfig::default()).unwrap();
    assert!(names.contains("model.embed_tokens.weight"));
    let q = sft_model::Quantize {
        dtype: GgmlDType::Q8_0,
        names,
    };
    let drawn = Model::init_with(&cfg, 9, DType::F32, &Device::Cpu, &q).unwrap();
    let after = Model::init(&cfg, 9, DType::F32, &Device::Cpu)
        .unwrap()
        .quantized_with(&q)
        .unwrap();
    assert_eq!(drawn.quantized().len(), after.quantized().len());
    for ((n, a), (m, b)) in drawn.quantized().iter().zip(after.quantized()) {
        assert_eq!(n, m);
        assert!(a.bytes().unwrap() == b.bytes().unwrap(), "{n}");
    }
    for ((n, a), (_, b)) in drawn.params().iter().zip(after.params()) {
        let (a, b) = (a.as_tensor(), b.as_tensor());
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{n}");
    }
}
