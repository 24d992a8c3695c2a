//! Checkpoint save/load: bit-exact round trips, dtype casts, shards, and errors that name the
//! offending tensor.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use serde_json::Value;
use sft_model::{AttentionMask, Error, Model};

fn read_tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

fn write_tensors(dir: &Path, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn assert_same_params(a: &Model, b: &Model, tolerance: f64) {
    let names = |m: &Model| {
        m.params()
            .iter()
            .map(|(n, _)| n.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(a), names(b));
    for ((n, x), (_, y)) in a.params().iter().zip(b.params()) {
        assert_eq!(x.dims(), y.dims(), "{n}");
        let d = max_abs_diff(x.as_tensor(), y.as_tensor());
        assert!(d <= tolerance, "{n} differs by {d}");
    }
}

fn logits(m: &Model) -> Tensor {
    m.forward(
        &ids(&[vec![1u32, 5, 9, 13]]),
        &positions(1, 4),
        &AttentionMask::Causal,
        None,
    )
    .unwrap()
}

#[test]
fn f32_round_trip_is_bit_exact() {
    let mut models: Vec<(String, Model)> = FIXTURES
        .iter()
        .map(|n| (n.to_string(), load(n, DType::F32)))
        .collect();
    models.push(("gpt-tied".into(), gpt(true, true, 0.1, DType::F32)));
    models.push(("gpt-untied".into(), gpt(false, false, 0.0, DType::F32)));
    for (name, model) in models {
        let dir = TempDir::new(&format!("roundtrip-{name}"));
        model.save(dir.path(), DType::F32).unwrap();
        let back = Model::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
        assert_same_params(&model, &back, 0.0);
        assert_eq!(max_abs_diff(&logits(&model), &logits(&back)), 0.0, "{name}");
        let without_dtype = |m: &Model| {
            let mut v: Value = serde_json::from_str(&m.config().to_json_string()).unwrap();
            v.as_object_mut()
                .unwrap()
                .retain(|k, _| k != "dtype" && k != "torch_dtype");
            v
        };
        assert_eq!(without_dtype(&back), without_dtype(&model), "{name}");

        let stored = read_tensors(dir.path());
        assert_eq!(
            stored.contains_key("lm_head.weight"),
            !model.config().tie_word_embeddings(),
            "{name}"
        );
        assert_eq!(stored.len(), model.params().len(), "{name}");
        let config = read_json(&dir.path().join("config.json"));
        assert_eq!(config["dtype"], "float32");
        assert_eq!(config["torch_dtype"], "float32");
    }
}

#[test]
fn config_and_generation_config_keep_the_users_fields() {
    let model = load("qwen3", DType::F32);
    let dir = TempDir::new("qwen3-config");
    model.save(dir.path(), DType::BF16).unwrap();
    let original = read_json(&fixture("qwen3").join("config.json"));
    let saved = read_json(&dir.path().join("config.json"));
    for (k, v) in original.as_object().unwrap() {
        if k != "dtype" {
            assert_eq!(&saved[k], v, "{k}");
        }
    }
    assert_eq!(saved["dtype"], "bfloat16");
    let gen = read_json(&dir.path().join("generation_config.json"));
    assert_eq!(gen["bos_token_id"], 1);
    assert_eq!(gen["eos_token_id"], serde_json::json!([2, 3]));
    // The safetensors header carries transformers' format tag.
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt");
    assert_eq!(header["model.norm.weight"]["dtype"], "BF16");
}

#[test]
fn bf16_save_loads_as_the_rounded_weights() {
    let model = load("qwen2-untied", DType::F32);
    let dir = TempDir::new("bf16");
    model.save(dir.path(), DType::BF16).unwrap();
    assert!(read_tensors(dir.path())
        .values()
        .all(|t| t.dtype() == DType::BF16));
    let back = Model::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.dtype(), DType::F32);
    for ((n, x), (_, y)) in model.params().iter().zip(back.params()) {
        let rounded = x
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(max_abs_diff(&rounded, y.as_tensor()), 0.0, "{n}");
        assert_eq!(y.dtype(), DType::F32);
    }
    // And loading into bf16 keeps the stored values exactly.
    let half = Model::load(dir.path(), DType::BF16, &Device::Cpu).unwrap();
    assert_same_params(&back, &half, 0.0);
}

#[test]
fn sharded_checkpoint_loads() {
    let model = load("qwen2-untied", DType::F32);
    let dir = TempDir::new("sharded");
    model.save(dir.path(), DType::F32).unwrap();
    let tensors = read_tensors(dir.path());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let mut shards = [HashMap::new(), HashMap::new()];
    let mut weight_map = serde_json::Map::new();
    for (i, (name, _)) in model.params().iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i % 2 + 1);
        shards[i % 2].insert(name.clone(), tensors[name].clone());
        weight_map.insert(name.clone(), Value::String(file));
    }
    for (i, shard) in shards.iter().enumerate() {
        candle_core::safetensors::save(
            shard,
            dir.path()
                .join(format!("model-{:05}-of-00002.safetensors", i + 1)),
        )
        .unwrap();
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let back = Model::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_same_params(&model, &back, 0.0);
}

/// Saves `model`, edits its tensors with `edit`, and returns the load error.
fn load_error(model: &Model, tag: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> Error {
    let dir = TempDir::new(tag);
    model.save(dir.path(), DType::F32).unwrap();
    let mut tensors = read_tensors(dir.path());
    edit(&mut tensors);
    write_tensors(dir.path(), &tensors);
    Model::load(dir.path(), DType::F32, &Device::Cpu).unwrap_err()
}

#[test]
fn missing_extra_and_misshaped_tensors_are_named() {
    let untied = load("qwen2-untied", DType::F32);
    let name = "model.layers.1.mlp.up_proj.weight";
    let err = load_error(&untied, "missing", |t| {
        t.remove(name);
    });
    assert!(
        matches!(&err, Error::MissingTensor { name: n, .. } if n == name),
        "{err}"
    );
    assert!(
        err.to_string().contains(name) && err.to_string().contains("model.safetensors"),
        "{err}"
    );

    let err = load_error(&untied, "missing-head", |t| {
        t.remove("lm_head.weight");
    });
    assert!(
        matches!(&err, Error::MissingTensor { name: n, .. } if n == "lm_head.weight"),
        "{err}"
    );

    let extra = "model.layers.0.self_attn.rotary_extra.weight";
    let err = load_error(&untied, "extra", |t| {
        t.insert(
            extra.into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert!(
        matches!(&err, Error::UnexpectedTensor { name: n, .. } if n == extra),
        "{err}"
    );

    let q = "model.layers.0.self_attn.q_proj.weight";
    let err = load_error(&untied, "shape", |t| {
        t.insert(
            q.into(),
            Tensor::zeros((32, 31), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    match &err {
        Error::ShapeMismatch {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(
                (name.as_str(), expected.as_slice(), found.as_slice()),
                (q, &[32, 32][..], &[32, 31][..])
            )
        }
        other => panic!("expected a shape mismatch, got {other}"),
    }
    assert!(err.to_string().contains(q));
}

#[test]
fn a_tied_model_ignores_a_stored_head_of_the_right_shape() {
    let tied = load("qwen2-tied", DType::F32);
    let dir = TempDir::new("tied-head");
    tied.save(dir.path(), DType::F32).unwrap();
    let mut tensors = read_tensors(dir.path());
    let embed = tensors["model.embed_tokens.weight"].clone();
    tensors.insert("lm_head.weight".into(), embed);
    write_tensors(dir.path(), &tensors);
    let back = Model::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_same_params(&tied, &back, 0.0);

    tensors.insert(
        "lm_head.weight".into(),
        Tensor::zeros((255, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    write_tensors(dir.path(), &tensors);
    let err = Model::load(dir.path(), DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { name, .. } if name == "lm_head.weight"),
        "{err}"
    );
}

#[test]
fn detached_model_shares_storage_without_a_graph() {
    let model = load("qwen2-tied", DType::F32);
    let detached = model.detached();
    let before = logits(&detached);
    let (_, var) = &model.params()[0];
    var.set(&(var.as_tensor() * 2.0).unwrap()).unwrap();
    let after = logits(&detached);
    assert!(
        max_abs_diff(&before, &after) > 1e-3,
        "the detached copy must see in-place updates"
    );
    assert_eq!(max_abs_diff(&after, &logits(&model)), 0.0);
    let grads = after.sum_all().unwrap().backward().unwrap();
    assert!(model
        .params()
        .iter()
        .all(|(_, v)| grads.get(v.as_tensor()).is_none()));
}
