//! Helpers shared by the integration tests of `sft` (each test file is its own crate and uses
//! what it needs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sft_data::Rendered;
use sft_model::{LoraConfig, Model};

pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

/// A fresh, empty directory for one test (per process: each test file is its own binary).
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sft-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The first `n` poems of the bundled subset, as `dir/poems.jsonl`.
pub fn poems(dir: &Path, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(data_dir().join("poems/poems-small.jsonl")).unwrap();
    let path = dir.join("poems.jsonl");
    let lines: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

pub fn load(name: &str) -> Model {
    load_as(name, DType::F32)
}

pub fn load_as(name: &str, dtype: DType) -> Model {
    Model::load(&data_dir().join("models").join(name), dtype, &Device::Cpu).unwrap()
}

/// LoRA on every linear layer (rank 4, no dropout) plus `save`, with B made non-zero so that A
/// has a gradient.
pub fn lora(model: Model, save: &[&str]) -> Model {
    let cfg = LoraConfig {
        r: 4,
        dropout: 0.0,
        modules_to_save: save.iter().map(|s| s.to_string()).collect(),
        ..LoraConfig::default()
    };
    let model = model.with_lora(&cfg, 7).unwrap();
    for (i, (name, var)) in model.params().iter().enumerate() {
        if name.ends_with("lora_B.weight") {
            let n = var.elem_count();
            let v: Vec<f32> = (0..n).map(|j| 0.1 * ((i * 131 + j) as f32).sin()).collect();
            let v = Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap();
            var.set(&v.to_dtype(var.dtype()).unwrap()).unwrap();
        }
    }
    model
}

pub fn eight_samples() -> Vec<Rendered> {
    (0..8u32)
        .map(|k| {
            let len = 4 + (k as usize * 5) % 13;
            let ids: Vec<u32> = (0..len as u32)
                .map(|i| (i * 31 + k * 17 + 3) % 256)
                .collect();
            let start = 1 + (k as usize) % (len - 2);
            let mask = (0..len).map(|i| i >= start).collect();
            Rendered::new(ids, mask).unwrap()
        })
        .collect()
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_diff(a: &[Tensor], b: &[Tensor]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| max_abs(&(x - y).unwrap()))
        .fold(0.0, f32::max)
}
