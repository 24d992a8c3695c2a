//! LoRA adapters: a fresh adapter changes nothing, gradients agree with finite differences,
//! adapters round-trip through PEFT's files, merging equals the unmerged model, and the
//! settings a model cannot honour are refused by name.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use sft_model::{read_adapter_config, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use sft_model::{AttentionMask, LoraConfig, Model};

const ROWS: [[u32; 7]; 2] = [[3, 9, 27, 3, 50, 9, 3], [7, 1, 8, 2, 8, 18, 28]];

fn logits(model: &Model) -> Tensor {
    let rows: Vec<Vec<u32>> = ROWS.iter().map(|r| r.to_vec()).collect();
    model
        .detached()
        .forward(&ids(&rows), &positions(2, 7), &AttentionMask::Causal, None)
        .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
    v.to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn a_fresh_adapter_leaves_the_outputs_exactly_as_they_were() {
    for name in FIXTURES {
        let base = logits(&load(name, DType::F32));
        let cfg = LoraConfig {
            dropout: 0.0,
            ..LoraConfig::default()
        };
        let model = load(name, DType::F32).with_lora(&cfg, 1).unwrap();
        assert_eq!(bits(&logits(&model)), bits(&base), "{name}");
        // Only the adapters train: two per linear layer (7 per layer).
        let layers = model.config().num_layers();
        assert_eq!(model.params().len(), 2 * 7 * layers, "{name}");
        assert!(model
            .params()
            .iter()
            .all(|(n, _)| n.ends_with("lora_A.weight") || n.ends_with("lora_B.weight")));
        // A is Kaiming-uniform with bound 1/sqrt(fan_in), B zero.
        for (n, v) in model.params() {
            let max = v
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            match n.ends_with("lora_A.weight") {
                true => {
                    let bound = 1.0 / (v.dim(1).unwrap() as f32).sqrt();
                    assert!(max > 0.5 * bound && max <= bound, "{n}: {max} vs {bound}");
                }
                false => assert_eq!(max, 0.0, "{n}"),
            }
        }
    }
}

/// d loss / d adapter against central differences of the loss, in f64 (logits through the head
/// in f64: `forward` returns f32), in training mode with the adapters' dropout on.
#[test]
fn adapter_gradients_agree_with_finite_differences() {
    let cfg = lora_config(0.1, &["q_proj", "down_proj"], &["model.norm", "lm_head"]);
    let model = with_lora(load("qwen2-untied", DType::F64), &cfg);
    let rows: Vec<Vec<u32>> = ROWS.iter().map(|r| r.to_vec()).collect();
    let targets: Vec<Vec<i64>> = ROWS
        .iter()
        .map(|r| r[1..].iter().map(|&t| t as i64).chain([-100]).collect())
        .collect();
    let loss = |m: &Model| {
        let mask = AttentionMask::Causal;
        let h = m
            .forward_hidden(&ids(&rows), &positions(2, 7), &mask, Some(5))
            .unwrap();
        let logits = h
            .broadcast_matmul(&m.lm_head_weight().dense().unwrap().t().unwrap())
            .unwrap();
        masked_ce(&logits, &targets)
    };
    let grads = loss(&model).backward().unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    for (name, var) in model.params() {
        let g = grads
            .get(var.as_tensor())
            .expect("every trainable tensor has a gradient");
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let orig = var.as_tensor().copy().unwrap();
        let flat = orig.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for i in [0, flat.len() / 2, flat.len() - 1] {
            let at = |d: f64| {
                let mut v = flat.clone();
                v[i] += d;
                var.set(&Tensor::from_vec(v, orig.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let l = loss(&model).to_scalar::<f64>().unwrap();
                var.set(&orig).unwrap();
                l
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "{name}[{i}]: analytic {} vs finite differences {fd}",
                g[i]
            );
            checked += 1;
        }
    }
    // A and B of two modules in two layers, the final norm and the head.
    assert_eq!(checked, 3 * (2 * 2 * 2 + 2));
}

#[test]
fn adapters_round_trip_through_peft_files_and_merge_to_the_same_model() {
    let cases = [
        (
            "qwen2-untied",
            lora_config(0.0, &["all-linear"], &["lm_head"]),
        ),
        ("qwen3", {
            let mut c = lora_config(0.1, &["q_proj", "v_proj"], &["embed_tokens", "lm_head"]);
            c.use_rslora = true;
            c
        }),
        ("llama-bias", lora_config(0.0, &["o_proj"], &[])),
    ];
    for (name, cfg) in cases {
        let model = with_lora(load(name, DType::F32), &cfg);
        // Fully trained modules must round-trip too: make them differ from the base.
        for (n, v) in model.params() {
            if !n.contains("lora_") {
                v.set(&v.as_tensor().affine(1.5, 0.01).unwrap()).unwrap();
            }
        }
        let dir = TempDir::new(&format!("lora-{name}"));
        model.save_adapter(dir.path(), "../base").unwrap();
        let ac = read_adapter_config(dir.path()).unwrap();
        assert_eq!(ac.base.as_deref(), Some("../base"));
        assert_eq!(ac.lora.r, cfg.r);
        assert_eq!(ac.lora.use_rslora, cfg.use_rslora);

        let back = load(name, DType::F32).load_adapter(dir.path()).unwrap();
        let (a, b) = (logits(&model), logits(&back));
        assert_eq!(bits(&a), bits(&b), "{name}: reloaded");
        // The base stays the base: not a tensor of it is stored in the adapter except those
        // trained fully.
        let merged = model.merged().unwrap();
        assert!(merged.lora().is_none() && merged.frozen().is_empty());
        let d = max_abs_diff(&logits(&merged), &a);
        assert!(d < 1e-4, "{name}: merged differs by {d}");
        assert!(max_abs_diff(&logits(&load(name, DType::F32)), &a) > 1e-3);
    }
}

#[test]
fn settings_the_model_cannot_honour_are_refused_by_name() {
    let err = |name: &str, cfg: LoraConfig| {
        load(name, DType::F32)
            .with_lora(&cfg, 0)
            .unwrap_err()
            .to_string()
    };
    let e = err("qwen2-tied", lora_config(0.0, &["c_attn"], &[]));
    assert!(
        e.contains("no module named c_attn") && e.contains("q_proj"),
        "{e}"
    );
    let e = err("qwen2-tied", lora_config(0.0, &["embed_tokens"], &[]));
    assert!(
        e.contains("not a linear layer") && e.contains("modules_to_save"),
        "{e}"
    );
    let e = err("qwen2-tied", lora_config(0.0, &["q_proj"], &["lm_head"]));
    assert!(
        e.contains("ties its output head") && e.contains("embed_tokens"),
        "{e}"
    );
    let e = err("qwen2-tied", lora_config(0.0, &["q_proj"], &["q_proj"]));
    assert!(e.contains("both adapted"), "{e}");
    let e = err(
        "qwen2-tied",
        lora_config(0.0, &["q_proj"], &["vision_tower"]),
    );
    assert!(e.contains("no module named vision_tower"), "{e}");
    let mut zero = lora_config(0.0, &["q_proj"], &[]);
    zero.r = 0;
    assert!(err("qwen2-tied", zero).contains("lora.r"));

    // A model with adapters takes no second set, and does not save as a full checkpoint.
    let model = load("qwen2-tied", DType::F32)
        .with_lora(&lora_config(0.0, &["q_proj"], &[]), 0)
        .unwrap();
    let dir = TempDir::new("lora-refused");
    assert!(model
        .save(dir.path(), DType::F32)
        .unwrap_err()
        .to_string()
        .contains("save_adapter"));
    let again = model.with_lora(&lora_config(0.0, &["q_proj"], &[]), 0);
    assert!(again.unwrap_err().to_string().contains("already carries"));
}

#[test]
fn a_broken_adapter_names_its_file_and_tensor() {
    let model = with_lora(
        load("qwen2-untied", DType::F32),
        &lora_config(0.0, &["q_proj", "v_proj"], &[]),
    );
    let dir = TempDir::new("lora-broken");
    model.save_adapter(dir.path(), "x").unwrap();
    // An adapter for another rank: shape mismatch, named.
    let config = dir.path().join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"r\": 4", "\"r\": 8")).unwrap();
    let e = load("qwen2-untied", DType::F32)
        .load_adapter(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(ADAPTER_WEIGHTS_FILE) && e.contains("lora_A.weight"),
        "{e}"
    );
    // Options PEFT has and this crate does not implement are refused by name.
    std::fs::write(
        &config,
        text.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    let e = read_adapter_config(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("use_dora") && e.contains(ADAPTER_CONFIG_FILE),
        "{e}"
    );
    // Targets the file does not hold: a missing tensor, named.
    std::fs::write(&config, text.replace("\"v_proj\"", "\"k_proj\"")).unwrap();
    let e = load("qwen2-untied", DType::F32)
        .load_adapter(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("k_proj.lora_A.weight") || e.contains("v_proj"),
        "{e}"
    );
}

/// Max |ours - PEFT's| over the real (unpadded) positions of the golden batch.
fn worst_vs(model: &Model, g: &serde_json::Value, key: &str, entry: &serde_json::Value) -> f32 {
    let input: Vec<Vec<u32>> = serde_json::from_value(g["input_ids"].clone()).unwrap();
    let attention: Vec<Vec<u32>> = serde_json::from_value(g["attention_mask"].clone()).unwrap();
    let want: Vec<Vec<Vec<f32>>> = serde_json::from_value(entry[key].clone()).unwrap();
    padded_logits(&model.detached(), &input, &attention, &want).1
}

/// Adapters PEFT made (all-linear with a saved head; rsLoRA on three modules) and adapters `sft`
/// trained (tests/data/models/lora/), loaded here: PEFT's logits, and `merged` gives
/// `merge_and_unload`'s (`tests/data/scripts/golden_lora.py`).
#[test]
fn adapters_give_pefts_logits_both_ways() {
    let g = golden("lora");
    let mut seen = Vec::new();
    for side in ["peft", "sft"] {
        for entry in g[side].as_array().unwrap() {
            let (base, adapter) = (
                entry["base"].as_str().unwrap(),
                entry["adapter"].as_str().unwrap(),
            );
            let model = load(base, DType::F32)
                .load_adapter(&fixture(adapter))
                .unwrap_or_else(|e| panic!("{adapter}: {e}"));
            let d = worst_vs(&model, &g, "logits", entry);
            assert!(d <= 1e-4, "{adapter}: max |logits - PEFT| = {d}");
            let merged = model.merged().unwrap();
            let d = worst_vs(&merged, &g, "merged_logits", entry);
            assert!(d <= 1e-4, "{adapter}: merged, max |logits - PEFT| = {d}");
            // And the adapter does change the model (a loader that skipped it would fail here).
            let plain = worst_vs(&load(base, DType::F32), &g, "logits", entry);
            assert!(plain > 1e-2, "{adapter}: the base alone is within {plain}");
            seen.push(adapter.to_string());
        }
    }
    assert_eq!(
        seen,
        [
            "qwen2-untied-lora-peft",
            "qwen3-lora-peft",
            "qwen2-tied-lora-sft",
            "qwen2-untied-lora-sft"
        ]
    );
    // The PEFT-made adapter's base is found from its own adapter_config.json ("../qwen2-untied").
    let base = sft_model::base_dir(
        &fixture("qwen2-untied-lora-peft"),
        &read_adapter_config(&fixture("qwen2-untied-lora-peft"))
            .unwrap()
            .base
            .unwrap(),
    )
    .unwrap();
    assert!(base.ends_with("../qwen2-untied"));
}
