//! Helpers shared by the integration tests: fixtures, tiny configs, a reference masked
//! cross-entropy, and a self-deleting temporary directory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use serde_json::Value;
use sft_model::{Model, ModelConfig};

pub const FIXTURES: [&str; 8] = [
    "qwen2-tied",
    "qwen2-untied",
    "qwen3",
    "llama-bias",
    "llama3",
    "mistral",
    "gemma2",
    "gemma3",
];

/// Fixtures whose training runs through candle's backward only: Gemma 2's attention soft-cap
/// has no fused kernel.
pub const GRAPH_ONLY: [&str; 1] = ["gemma2"];

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/models")
        .join(name)
}

pub fn golden(name: &str) -> Value {
    let path = fixture(&format!("{name}.golden.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

pub fn load(name: &str, dtype: DType) -> Model {
    Model::load(&fixture(name), dtype, &Device::Cpu).unwrap()
}

/// A small GPT; `dropout` > 0 only matters in training mode.
pub fn gpt_config(tied: bool, bias: bool, dropout: f64) -> ModelConfig {
    ModelConfig::from_json_str(&format!(
        r#"{{"model_type": "sft-gpt", "vocab_size": 61, "n_embd": 24, "n_layer": 2, "n_head": 3,
            "block_size": 32, "dropout": {dropout}, "bias": {bias}, "tie_word_embeddings": {tied},
            "initializer_range": 0.2}}"#
    ))
    .unwrap()
}

/// A fresh GPT with non-trivial biases and LayerNorm gains (init makes them 0 and 1).
pub fn gpt(tied: bool, bias: bool, dropout: f64, dtype: DType) -> Model {
    let model = Model::init(&gpt_config(tied, bias, dropout), 5, dtype, &Device::Cpu).unwrap();
    perturb_biases_and_norms(&model, 11);
    model
}

/// Adds small deterministic noise to every 1-D parameter (biases, norm gains).
pub fn perturb_biases_and_norms(model: &Model, seed: u64) {
    for (i, (_, var)) in model.params().iter().enumerate() {
        if var.rank() != 1 {
            continue;
        }
        let n = var.elem_count();
        let noise: Vec<f64> = (0..n)
            .map(|j| 0.1 * (((seed + i as u64) * 7919 + j as u64 * 104_729) as f64).sin())
            .collect();
        let noise = Tensor::from_vec(noise, n, &Device::Cpu)
            .unwrap()
            .to_dtype(var.dtype())
            .unwrap();
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
}

pub fn ids(rows: &[Vec<u32>]) -> Tensor {
    Tensor::new(rows.to_vec(), &Device::Cpu).unwrap()
}

/// Positions `0..t` for every row.
pub fn positions(b: usize, t: usize) -> Tensor {
    ids(&vec![(0..t as u32).collect(); b])
}

/// `sum(-log softmax(logits)[target]) / count` over targets != -100; differentiable, computed in
/// the logits' dtype.
pub fn masked_ce(logits: &Tensor, targets: &[Vec<i64>]) -> Tensor {
    let (b, t, v) = logits.dims3().unwrap();
    let flat: Vec<i64> = targets.iter().flatten().copied().collect();
    assert_eq!(flat.len(), b * t);
    let count = flat.iter().filter(|&&x| x != -100).count();
    let idx: Vec<u32> = flat
        .iter()
        .map(|&x| if x == -100 { 0 } else { x as u32 })
        .collect();
    let keep: Vec<f64> = flat
        .iter()
        .map(|&x| if x == -100 { 0.0 } else { 1.0 })
        .collect();
    let dev = logits.device();
    let logp =
        candle_nn::ops::log_softmax(&logits.reshape((b * t, v)).unwrap(), D::Minus1).unwrap();
    let picked = logp
        .gather(&Tensor::from_vec(idx, (b * t, 1), dev).unwrap(), 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let keep = Tensor::from_vec(keep, b * t, dev)
        .unwrap()
        .to_dtype(logits.dtype())
        .unwrap();
    ((picked * keep).unwrap().sum_all().unwrap() * (-1.0 / count as f64)).unwrap()
}

pub fn to_f64(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    to_f64(&d.abs().unwrap().flatten_all().unwrap().max(0).unwrap())
}

pub fn rel_err(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("sft-model-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `model` with fresh LoRA adapters whose B matrices are made non-zero (PEFT starts them at
/// zero, which would leave A without a gradient and the adapters without an effect).
pub fn with_lora(model: Model, lora: &sft_model::LoraConfig) -> Model {
    let model = model.with_lora(lora, 9).unwrap();
    for (i, (name, var)) in model.params().iter().enumerate() {
        if !name.ends_with("lora_B.weight") {
            continue;
        }
        let n = var.elem_count();
        let noise: Vec<f64> = (0..n)
            .map(|j| 0.2 * (((i * 7919 + j * 104_729) as f64) * 0.37).sin())
            .collect();
        let noise = Tensor::from_vec(noise, var.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(var.dtype())
            .unwrap();
        var.set(&noise).unwrap();
    }
    model
}

/// A LoRA configuration for the tests: rank 4, alpha 8, the given dropout and targets.
pub fn lora_config(dropout: f64, targets: &[&str], save: &[&str]) -> sft_model::LoraConfig {
    sft_model::LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout,
        use_rslora: false,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
        modules_to_save: save.iter().map(|s| s.to_string()).collect(),
        base_quant: None,
    }
}

/// The logits of a right-padded batch (`attention` 1 for real tokens, 0 for padding), and their
/// largest distance to `want` over the real positions.
pub fn padded_logits(
    model: &Model,
    input: &[Vec<u32>],
    attention: &[Vec<u32>],
    want: &[Vec<Vec<f32>>],
) -> (Tensor, f32) {
    let (b, t) = (input.len(), input[0].len());
    // Right padding: real tokens are segment 1, padding segment 0.
    let segments = ids(attention);
    let logits = model
        .forward(
            &ids(input),
            &positions(b, t),
            &sft_model::AttentionMask::Segments(&segments),
            None,
        )
        .unwrap();
    let got: Vec<Vec<Vec<f32>>> = logits.to_vec3().unwrap();
    let mut worst = 0f32;
    for r in 0..b {
        for i in (0..t).filter(|&i| attention[r][i] == 1) {
            for (x, y) in got[r][i].iter().zip(&want[r][i]) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    (logits, worst)
}
