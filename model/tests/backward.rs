//! The models' own backward pass (`forward_traced` + `backward`) against candle's backward
//! through `forward_hidden`: the same hidden states and the same gradients, bit for bit, on every
//! model shape, with packed segments, padding and dropout, in f32 and f64.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use sft_model::{AttentionMask, Model};

fn models(dtype: DType) -> Vec<(String, Model)> {
    let mut out: Vec<(String, Model)> = FIXTURES
        .iter()
        .map(|n| {
            let m = load(n, dtype);
            perturb_biases_and_norms(&m, 3);
            (n.to_string(), m)
        })
        .collect();
    out.push(("gpt-tied-bias".into(), gpt(true, true, 0.0, dtype)));
    out.push(("gpt-untied-nobias".into(), gpt(false, false, 0.0, dtype)));
    out.push(("gpt-dropout".into(), gpt(true, true, 0.3, dtype)));
    // LoRA: frozen bases, adapters with dropout, fully trained modules (a tied pair included).
    let lora = |m: Model, cfg| with_lora(m, &cfg);
    out.push((
        "qwen2-untied+lora".into(),
        lora(
            load("qwen2-untied", dtype),
            lora_config(0.2, &["all-linear"], &["lm_head"]),
        ),
    ));
    let mut rs = lora_config(
        0.0,
        &["q_proj", "v_proj", "down_proj"],
        &["embed_tokens", "lm_head"],
    );
    rs.use_rslora = true;
    out.push(("qwen3+rslora".into(), lora(load("qwen3", dtype), rs)));
    out.push((
        "llama-bias+lora".into(),
        lora(
            load("llama-bias", dtype),
            lora_config(0.1, &["o_proj", "up_proj"], &["model.norm"]),
        ),
    ));
    out.push((
        "gpt-dropout+lora".into(),
        lora(
            gpt(true, true, 0.3, dtype),
            lora_config(0.1, &["c_attn", "c_proj"], &[]),
        ),
    ));
    out
}

fn bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits() as u64)
            .collect(),
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits() as u64)
            .collect(),
        _ => t
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect(),
    }
}

#[test]
fn own_backward_equals_candles_backward_bit_for_bit() {
    // Row 0: two packed samples; row 1: one sample, then padding.
    let rows = vec![
        vec![3u32, 9, 27, 14, 50, 2, 33, 5, 41],
        vec![7, 1, 8, 2, 8, 18, 28, 0, 0],
    ];
    let seg = ids(&[
        vec![1, 1, 1, 1, 2, 2, 2, 2, 2],
        vec![1, 1, 1, 1, 1, 1, 1, 0, 0],
    ]);
    let pos = ids(&[
        vec![0, 1, 2, 3, 0, 1, 2, 3, 4],
        vec![0, 1, 2, 3, 4, 5, 6, 0, 0],
    ]);
    for dtype in [DType::F64, DType::F32] {
        for (name, model) in models(dtype) {
            for mask in [AttentionMask::Segments(&seg), AttentionMask::Causal] {
                let (input, seed) = (ids(&rows), Some(17));
                let hidden = model.forward_hidden(&input, &pos, &mask, seed).unwrap();
                let width = hidden.dim(2).unwrap();
                let g: Vec<f64> = (0..hidden.elem_count())
                    .map(|i| ((i as f64) * 0.731).sin())
                    .collect();
                let g = Tensor::from_vec(g, (2, 9, width), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let graph = (&hidden * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();

                let traced = model.forward_traced(&input, &pos, &mask, seed).unwrap();
                if GRAPH_ONLY.contains(&name.as_str()) {
                    assert!(traced.is_none(), "{name}: an own backward it cannot have");
                    continue;
                }
                let (own_hidden, trace) =
                    traced.unwrap_or_else(|| panic!("{name}: no own backward on the CPU"));
                assert_eq!(bits(&own_hidden), bits(&hidden), "{name} {dtype:?}: hidden");
                let own = model.backward(trace, &g, Vec::new()).unwrap();
                assert_eq!(own.len(), model.params().len());
                for ((pname, var), own) in model.params().iter().zip(&own) {
                    let expected = graph.get(var.as_tensor());
                    match (own, expected) {
                        (Some(o), Some(e)) => {
                            assert_eq!(o.dims(), e.dims(), "{name}: {pname}");
                            assert!(
                                bits(o) == bits(e),
                                "{name} {dtype:?}: {pname} differs by {}",
                                max_abs_diff(o, e)
                            );
                        }
                        (None, None) => {}
                        (o, e) => {
                            panic!("{name}: {pname}: own {} graph {}", o.is_some(), e.is_some())
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn half_precision_has_no_own_backward() {
    let model = gpt(true, true, 0.0, DType::BF16);
    let rows = vec![vec![3u32, 9, 27]];
    let traced = model
        .forward_traced(&ids(&rows), &positions(1, 3), &AttentionMask::Causal, None)
        .unwrap();
    assert!(traced.is_none());
}

#[test]
fn seeded_gradients_are_the_seed_plus_the_gradient() {
    let rows = vec![vec![3u32, 9, 27, 3, 50, 9, 3], vec![7, 1, 8, 2, 8, 18, 28]];
    for (name, model) in models(DType::F32) {
        if GRAPH_ONLY.contains(&name.as_str()) {
            continue;
        }
        let (input, pos) = (ids(&rows), positions(2, 7));
        let mask = AttentionMask::Causal;
        let run = |seeds: Vec<Option<Tensor>>| {
            let (hidden, trace) = model
                .forward_traced(&input, &pos, &mask, Some(5))
                .unwrap()
                .unwrap();
            let g = Tensor::ones_like(&hidden).unwrap();
            model.backward(trace, &g, seeds).unwrap()
        };
        let plain = run(Vec::new());
        // Every parameter seeded, the embedding table (first) included: its rows are added in
        // place, the others added as tensors.
        let seeds: Vec<Option<Tensor>> = model
            .params()
            .iter()
            .map(|(_, v)| Some(v.as_tensor().affine(0.5, 0.25).unwrap().copy().unwrap()))
            .collect();
        // Deep copies: a seeded table is updated in place.
        let copies = seeds.iter().map(|s| s.as_ref().map(|s| s.copy().unwrap()));
        let seeded = run(copies.collect());
        for (((pname, _), (s, p)), got) in model
            .params()
            .iter()
            .zip(seeds.iter().zip(&plain))
            .zip(&seeded)
        {
            let (s, got) = (s.as_ref().unwrap(), got.as_ref().unwrap());
            let want = match p {
                Some(p) => (s + p).unwrap(),
                None => s.clone(),
            };
            assert!(bits(got) == bits(&want), "{name}: {pname}");
        }
        let err = model
            .forward_traced(&input, &pos, &mask, None)
            .unwrap()
            .map(|(h, tr)| model.backward(tr, &h, vec![None]))
            .unwrap();
        assert!(err.unwrap_err().to_string().contains("seeds"), "{name}");
    }
}

#[test]
fn output_layer_gradients_match_candles_products() {
    let dev = Device::Cpu;
    let t = |n: usize, d: usize, s: f64| {
        let v: Vec<f32> = (0..n * d)
            .map(|i| ((i as f64 + 1.0) * s).sin() as f32)
            .collect();
        Tensor::from_vec(v, (n, d), &dev).unwrap()
    };
    let (x, w, g) = (t(37, 16, 0.37), t(50, 16, 0.91), t(37, 50, 1.3));
    let (dx, dw) = sft_model::linear_grads(&x, &w, &g, None).unwrap().unwrap();
    let want_dx = g.matmul(&w).unwrap();
    let want_dw = g.t().unwrap().matmul(&x).unwrap();
    assert!(max_abs_diff(&dx, &want_dx) < 1e-5);
    assert!(max_abs_diff(&dw, &want_dw) < 1e-5);
    // Accumulating: the earlier sum plus this chunk's product, in place.
    let acc = t(50, 16, 2.1);
    let before = acc.copy().unwrap();
    let (_, summed) = sft_model::linear_grads(&x, &w, &g, Some(&acc))
        .unwrap()
        .unwrap();
    assert!(max_abs_diff(&summed, &(&before + &want_dw).unwrap()) < 1e-5);
    assert!(
        max_abs_diff(&acc, &summed) == 0.0,
        "the sum is the accumulator itself"
    );
    // Half precision is the caller's (candle's matmul).
    let half = x.to_dtype(DType::BF16).unwrap();
    assert!(sft_model::linear_grads(&half, &w, &g, None)
        .unwrap()
        .is_none());
}

#[test]
fn a_trace_from_another_kind_of_model_is_refused() {
    let (qwen, gpt) = (
        load("qwen2-tied", DType::F32),
        gpt(true, true, 0.0, DType::F32),
    );
    let rows = vec![vec![3u32, 9, 27]];
    let (input, pos) = (ids(&rows), positions(1, 3));
    let (hidden, trace) = gpt
        .forward_traced(&input, &pos, &AttentionMask::Causal, None)
        .unwrap()
        .unwrap();
    let err = qwen.backward(trace, &hidden, Vec::new()).unwrap_err();
    assert!(err.to_string().contains("another kind of model"), "{err}");
}

/// Activation checkpointing keeps each layer's input and recomputes the layer in backward: the
/// gradients are the same bits as without it, through the own backward (f32, f64) and through
/// candle's graph one layer at a time (half precision, Gemma 2's soft-cap), with packed rows,
/// dropout and LoRA.
#[test]
fn activation_checkpointing_changes_no_gradient() {
    let rows = vec![
        vec![3u32, 9, 27, 14, 50, 2, 33, 5, 41],
        vec![7, 1, 8, 2, 8, 18, 28, 0, 0],
    ];
    let seg = ids(&[
        vec![1, 1, 1, 1, 2, 2, 2, 2, 2],
        vec![1, 1, 1, 1, 1, 1, 1, 0, 0],
    ]);
    let pos = ids(&[
        vec![0, 1, 2, 3, 0, 1, 2, 3, 4],
        vec![0, 1, 2, 3, 4, 5, 6, 0, 0],
    ]);
    let mask = AttentionMask::Segments(&seg);
    for dtype in [DType::F32, DType::BF16] {
        for (name, mut model) in models(dtype) {
            let (input, seed) = (ids(&rows), Some(17));
            let hidden = model.forward_hidden(&input, &pos, &mask, seed).unwrap();
            let width = hidden.dim(2).unwrap();
            let g: Vec<f64> = (0..hidden.elem_count())
                .map(|i| ((i as f64) * 0.731).sin())
                .collect();
            let g = Tensor::from_vec(g, (2, 9, width), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            // Without checkpointing: the own backward where it runs, else candle's graph.
            let reference: Vec<Option<Tensor>> =
                match model.forward_traced(&input, &pos, &mask, seed).unwrap() {
                    Some((_, trace)) => model.backward(trace, &g, Vec::new()).unwrap(),
                    None => {
                        let graph = (&hidden * &g).unwrap().sum_all().unwrap().backward();
                        let graph = graph.unwrap();
                        let params = model.params().iter();
                        params
                            .map(|(_, v)| graph.get(v.as_tensor()).cloned())
                            .collect()
                    }
                };
            model.set_checkpointing(true);
            let (ck_hidden, trace) = model
                .forward_traced(&input, &pos, &mask, seed)
                .unwrap()
                .unwrap_or_else(|| panic!("{name} {dtype:?}: a checkpointed pass has a trace"));
            assert_eq!(bits(&ck_hidden), bits(&hidden), "{name} {dtype:?}: hidden");
            let ck = model.backward(trace, &g, Vec::new()).unwrap();
            for (((pname, _), r), c) in model.params().iter().zip(&reference).zip(&ck) {
                match (r, c) {
                    (Some(r), Some(c)) => assert!(
                        bits(r) == bits(c),
                        "{name} {dtype:?}: {pname} differs by {}",
                        max_abs_diff(r, c)
                    ),
                    (None, None) => {}
                    (r, c) => panic!("{name}: {pname}: {} vs {}", r.is_some(), c.is_some()),
                }
            }
        }
    }
}
