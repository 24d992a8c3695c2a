//! KV-cache decoding and sampling: cached logits equal full forwards, greedy generation equals a
//! cache-free loop and `transformers`, and the stopping rules hold.

mod common;

use candle_core::{DType, IndexOp, Tensor};
use common::*;
use sft_model::generate::{generate, generate_streaming, SamplingParams};
use sft_model::{AttentionMask, Model};

fn greedy(max_new_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_new_tokens,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        repetition_penalty: 1.0,
        stop_ids: vec![],
        seed: 0,
    }
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_k: Some(40),
        top_p: Some(0.95),
        seed,
        ..greedy(8)
    }
}

fn all_models() -> Vec<(String, Model)> {
    let mut out: Vec<(String, Model)> = FIXTURES
        .iter()
        .map(|n| (n.to_string(), load(n, DType::F32)))
        .collect();
    out.push(("gpt".into(), gpt(true, true, 0.1, DType::F32)));
    out
}

fn full_logits(model: &Model, seq: &[u32]) -> Tensor {
    model
        .forward(
            &ids(&[seq.to_vec()]),
            &positions(1, seq.len()),
            &AttentionMask::Causal,
            None,
        )
        .unwrap()
}

#[test]
fn cached_logits_equal_full_forward() {
    for (name, model) in all_models() {
        let seq = [3u32, 14, 15, 9, 26, 5, 35, 8, 9, 7];
        let full = full_logits(&model, &seq);
        // Relative to the logits' size (Gemma 3's reach 8; float noise grows with them).
        let size = full
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let tol = 1e-5 * f64::from(size.max(1.0));
        let mut cache = model.new_cache();
        // A prompt chunk, single tokens, then a multi-token chunk on a non-empty cache.
        let mut at = 0;
        for chunk in [4, 1, 1, 3, 1] {
            let part = ids(&[seq[at..at + chunk].to_vec()]);
            let got = model.forward_cached(&part, &mut cache).unwrap();
            let diff = max_abs_diff(&got, &full.narrow(1, at, chunk).unwrap());
            assert!(diff < tol, "{name}: tokens {at}..{}: {diff}", at + chunk);
            at += chunk;
            assert_eq!(cache.len(), at);
        }
        cache.reset();
        assert!(cache.is_empty());
        let again = model
            .forward_cached(&ids(&[seq.to_vec()]), &mut cache)
            .unwrap();
        assert!(max_abs_diff(&again, &full) < tol, "{name}: after reset");
    }
}

#[test]
fn greedy_generation_equals_recomputing_the_full_forward() {
    for (name, model) in all_models() {
        let prompt = vec![1u32, 42, 7, 19, 13];
        let got = generate(&model, std::slice::from_ref(&prompt), &greedy(12))
            .unwrap()
            .remove(0);
        let mut seq = prompt.clone();
        for _ in 0..12 {
            let logits = full_logits(&model, &seq);
            let last: Vec<f32> = logits.i((0, seq.len() - 1)).unwrap().to_vec1().unwrap();
            let best = (0..last.len()).fold(0, |b, i| if last[i] > last[b] { i } else { b });
            seq.push(best as u32);
        }
        assert_eq!(got.ids, seq[prompt.len()..], "{name}");
        assert_eq!(got.stop_id, None);
    }
}

#[test]
fn repetition_penalty_matches_transformers() {
    for name in FIXTURES {
        let g = golden(name);
        let model = load(name, DType::F32);
        let prompt: Vec<u32> = serde_json::from_value(g["prompt"].clone()).unwrap();
        let want: Vec<u32> = serde_json::from_value(g["greedy_penalized"].clone()).unwrap();
        let params = SamplingParams {
            repetition_penalty: g["repetition_penalty"].as_f64().unwrap(),
            ..greedy(want.len())
        };
        assert_eq!(
            generate(&model, &[prompt], &params).unwrap()[0].ids,
            want,
            "{name}"
        );
    }
}

#[test]
fn sampling_is_seeded_per_prompt() {
    let model = load("qwen2-untied", DType::F32);
    let (a, b, c) = (vec![1u32, 2, 3], vec![9u32, 8, 7, 6], vec![100u32]);
    let first = generate(&model, &[a.clone(), b.clone()], &sampled(7)).unwrap();
    let again = generate(&model, &[c, b.clone()], &sampled(7)).unwrap();
    assert_eq!(
        first[1], again[1],
        "a prompt's output must not depend on its neighbours"
    );
    assert_eq!(
        first,
        generate(&model, &[a.clone(), b], &sampled(7)).unwrap()
    );
    let other_seed = generate(&model, std::slice::from_ref(&a), &sampled(8)).unwrap();
    assert_ne!(first[0], other_seed[0]);

    let mut streamed = vec![];
    let out = generate_streaming(&model, &a, &sampled(7), &mut |t| {
        streamed.push(t);
        true
    })
    .unwrap();
    assert_eq!(out, first[0]);
    assert_eq!(streamed, out.ids);
}

#[test]
fn stopping_rules() {
    let model = gpt(true, true, 0.0, DType::F32);
    let prompt = vec![1u32, 5, 9];
    let free = generate(&model, std::slice::from_ref(&prompt), &greedy(6))
        .unwrap()
        .remove(0);
    assert_eq!(free.ids.len(), 6);

    // A stop id ends generation and is not part of the output.
    let stop = free.ids[2];
    let first_stop = free.ids.iter().position(|&t| t == stop).unwrap();
    let params = SamplingParams {
        stop_ids: vec![60, stop],
        ..greedy(6)
    };
    let stopped = generate(&model, std::slice::from_ref(&prompt), &params)
        .unwrap()
        .remove(0);
    assert_eq!(stopped.ids, free.ids[..first_stop]);
    assert_eq!(stopped.stop_id, Some(stop));

    // The callback can stop early.
    let mut seen = 0;
    let early = generate_streaming(&model, &prompt, &greedy(6), &mut |_| {
        seen += 1;
        seen < 2
    })
    .unwrap();
    assert_eq!(
        (early.ids.as_slice(), early.stop_id),
        (&free.ids[..2], None)
    );

    // block_size is 32: a 30-token prompt leaves room for 2 tokens.
    let long: Vec<u32> = (0..30).map(|i| i % 61).collect();
    let full = generate(&model, std::slice::from_ref(&long), &greedy(10))
        .unwrap()
        .remove(0);
    assert_eq!((full.ids.len(), full.stop_id), (2, None));
    let too_long: Vec<u32> = (0..33).map(|i| i % 61).collect();
    assert!(generate(&model, &[too_long], &greedy(1)).is_err());
    assert!(generate(&model, &[vec![]], &greedy(1)).is_err());
}
