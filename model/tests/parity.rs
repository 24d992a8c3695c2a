//! Parity with `transformers`: logits, masked cross-entropy, gradient norms and greedy
//! generation of tiny random checkpoints (tests/data/scripts/golden_model.py).

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use common::*;
use sft_model::generate::{generate, SamplingParams};
use sft_model::AttentionMask;

fn rows<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Vec<Vec<T>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn check_fixture(name: &str) {
    let g = golden(name);
    let model = load(name, DType::F32);
    let input: Vec<Vec<u32>> = rows(&g["input_ids"]);
    let attention: Vec<Vec<u32>> = rows(&g["attention_mask"]);
    let targets: Vec<Vec<i64>> = rows(&g["targets"]);
    let want: Vec<Vec<Vec<f32>>> = serde_json::from_value(g["logits"].clone()).unwrap();
    let (b, t) = (input.len(), input[0].len());

    let (logits, worst) = padded_logits(&model, &input, &attention, &want);
    assert_eq!(logits.dims(), [b, t, 256]);
    assert_eq!(logits.dtype(), DType::F32);
    assert!(
        worst < 1e-4,
        "{name}: max |logits - transformers| = {worst}"
    );

    let loss = masked_ce(&logits, &targets);
    let want_loss = g["loss"].as_f64().unwrap();
    assert!(
        rel_err(to_f64(&loss), want_loss) < 1e-5,
        "{name}: loss {} vs {want_loss}",
        to_f64(&loss)
    );

    let grads = loss.backward().unwrap();
    let mut norms = BTreeMap::new();
    for (n, var) in model.params() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
        norms.insert(
            n.clone(),
            to_f64(&g.sqr().unwrap().sum_all().unwrap()).sqrt(),
        );
    }
    let want_norms: BTreeMap<String, f64> =
        serde_json::from_value(g["param_grad_norms"].clone()).unwrap();
    assert_eq!(
        norms.keys().collect::<Vec<_>>(),
        want_norms.keys().collect::<Vec<_>>(),
        "{name}: parameter names"
    );
    for (n, want) in &want_norms {
        assert!(
            rel_err(norms[n], *want) < 1e-3,
            "{name}: grad norm of {n}: {} vs {want}",
            norms[n]
        );
    }
    let global = norms.values().map(|x| x * x).sum::<f64>().sqrt();
    let want_global = g["grad_norm"].as_f64().unwrap();
    assert!(
        rel_err(global, want_global) < 1e-4,
        "{name}: grad norm {global} vs {want_global}"
    );

    let prompt: Vec<u32> = serde_json::from_value(g["prompt"].clone()).unwrap();
    let greedy: Vec<u32> = serde_json::from_value(g["greedy"].clone()).unwrap();
    let params = SamplingParams {
        max_new_tokens: greedy.len(),
        temperature: 0.0,
        top_k: None,
        top_p: None,
        repetition_penalty: 1.0,
        stop_ids: vec![],
        seed: 0,
    };
    let out = generate(&model, &[prompt], &params).unwrap();
    assert_eq!(out[0].ids, greedy, "{name}: greedy continuation");
    assert_eq!(out[0].stop_id, None);
}

#[test]
fn qwen2_tied_matches_transformers() {
    check_fixture("qwen2-tied");
}

#[test]
fn qwen2_untied_matches_transformers() {
    check_fixture("qwen2-untied");
}

#[test]
fn qwen3_matches_transformers() {
    check_fixture("qwen3");
}

#[test]
fn llama_with_bias_matches_transformers() {
    check_fixture("llama-bias");
}

/// Llama 3.x: llama3 rope scaling (as transformers 5 writes it, `rope_parameters`), head_dim
/// given explicitly, MLP biases.
#[test]
fn llama3_matches_transformers() {
    check_fixture("llama3");
}

/// Mistral: a sliding window of 4 positions, in the batch's mask and in generation with the KV
/// cache (the greedy reference runs 15 positions).
#[test]
fn mistral_matches_transformers() {
    check_fixture("mistral");
}

/// Gemma 2: (1 + w) norms, pre/post feed-forward norms, GELU gate, scaled embedding, scores
/// scaled by query_pre_attn_scalar, soft-capped scores and logits, sliding and full layers
/// alternating.
#[test]
fn gemma2_matches_transformers() {
    check_fixture("gemma2");
}

/// Gemma 3: q/k norms, two sliding layers and a full one with their own RoPE bases (the full
/// one linearly scaled), untied head.
#[test]
fn gemma3_matches_transformers() {
    check_fixture("gemma3");
}

#[test]
fn logits_are_the_head_applied_to_hidden_states() {
    let model = load("qwen3", DType::F32);
    let x = ids(&[vec![5, 6, 7, 8]]);
    let p = positions(1, 4);
    let logits = model.forward(&x, &p, &AttentionMask::Causal, None).unwrap();
    let hidden = model
        .forward_hidden(&x, &p, &AttentionMask::Causal, None)
        .unwrap();
    assert_eq!(hidden.dims(), [1, 4, 32]);
    let head: &Tensor = model.lm_head_weight().dense().unwrap();
    let manual = hidden
        .squeeze(0)
        .unwrap()
        .matmul(&head.t().unwrap())
        .unwrap();
    assert!(max_abs_diff(&logits.squeeze(0).unwrap(), &manual) < 1e-6);
}
