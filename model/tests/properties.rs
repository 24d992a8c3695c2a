//! Properties every model must have: gradients reach every parameter and agree with finite
//! differences; causality; padding, batching and packing do not change a sample's logits;
//! dropout is seeded.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use sft_model::{AttentionMask, Error, Model};

/// The models under test: the Qwen-family fixtures and GPTs (tied/untied, with/without bias).
fn models(dtype: DType) -> Vec<(String, Model)> {
    let mut out: Vec<(String, Model)> = FIXTURES
        .iter()
        .map(|n| (n.to_string(), load(n, dtype)))
        .collect();
    out.push(("gpt-tied-bias".into(), gpt(true, true, 0.0, dtype)));
    out.push(("gpt-untied-nobias".into(), gpt(false, false, 0.0, dtype)));
    out
}

fn forward(model: &Model, rows: &[Vec<u32>], mask: &AttentionMask<'_>, pos: &Tensor) -> Tensor {
    model.forward(&ids(rows), pos, mask, None).unwrap()
}

fn causal(model: &Model, rows: &[Vec<u32>]) -> Tensor {
    forward(
        model,
        rows,
        &AttentionMask::Causal,
        &positions(rows.len(), rows[0].len()),
    )
}

#[test]
fn every_parameter_gets_a_nonzero_gradient() {
    let mut all = models(DType::F32);
    all.push(("gpt-dropout".into(), gpt(true, true, 0.2, DType::F32)));
    for (name, model) in &all {
        let rows = vec![
            vec![3u32, 9, 27, 14, 50, 2, 33],
            vec![7, 1, 8, 2, 8, 18, 28],
        ];
        let seg = ids(&[vec![1, 1, 1, 1, 1, 1, 1], vec![1, 1, 1, 1, 1, 0, 0]]);
        let logits = model
            .forward(
                &ids(&rows),
                &positions(2, 7),
                &AttentionMask::Segments(&seg),
                Some(1),
            )
            .unwrap();
        let targets: Vec<Vec<i64>> = rows
            .iter()
            .map(|r| r.iter().map(|&x| (x as i64 * 5 + 1) % 61).collect())
            .collect();
        let grads = masked_ce(&logits, &targets).backward().unwrap();
        for (n, var) in model.params() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
            let size = to_f64(&g.abs().unwrap().sum_all().unwrap());
            assert!(size > 0.0, "{name}: zero gradient for {n}");
        }
    }
}

/// Mean cross-entropy through `forward_hidden` and `lm_head_weight` in the model dtype (f64
/// here), on a padded batch, in training mode when `dropout_seed` is set.
fn loss(model: &Model, dropout_seed: Option<u64>) -> Tensor {
    let rows = vec![vec![3u32, 9, 27, 14, 50, 2], vec![7, 1, 8, 2, 0, 0]];
    let seg = ids(&[vec![1, 1, 1, 1, 1, 1], vec![1, 1, 1, 1, 0, 0]]);
    let hidden = model
        .forward_hidden(
            &ids(&rows),
            &positions(2, 6),
            &AttentionMask::Segments(&seg),
            dropout_seed,
        )
        .unwrap();
    let logits = hidden
        .broadcast_matmul(&model.lm_head_weight().dense().unwrap().t().unwrap())
        .unwrap();
    let targets = vec![
        vec![9, 27, 14, 50, 2, -100],
        vec![1, 8, 2, -100, -100, -100],
    ];
    masked_ce(&logits, &targets)
}

fn check_finite_differences(model: &Model, entries: &[(&str, usize)], dropout_seed: Option<u64>) {
    let grads = loss(model, dropout_seed).backward().unwrap();
    for &(name, index) in entries {
        let var = &model
            .params()
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .1;
        let analytic: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let original = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let eps = 1e-6;
        let at = |delta: f64| {
            let mut v = original.clone();
            v[index] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), var.device()).unwrap())
                .unwrap();
            to_f64(&loss(model, dropout_seed))
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        at(0.0);
        let g = analytic[index];
        assert!(
            g != 0.0,
            "{name}[{index}]: zero analytic gradient, pick another entry"
        );
        assert!(
            (numeric - g).abs() < 1e-6 * g.abs().max(1.0),
            "{name}[{index}]: backward {g}, finite difference {numeric}"
        );
    }
}

#[test]
fn qwen_gradients_match_finite_differences() {
    // Token 27 is in the batch, so its embedding row has a gradient (hidden size 32).
    let entries = [
        ("model.embed_tokens.weight", 27 * 32 + 4),
        ("model.layers.0.self_attn.q_proj.weight", 37),
        ("model.layers.0.self_attn.k_proj.bias", 3),
        ("model.layers.1.self_attn.v_proj.weight", 100),
        ("model.layers.0.self_attn.o_proj.weight", 5),
        ("model.layers.1.input_layernorm.weight", 7),
        ("model.layers.0.post_attention_layernorm.weight", 2),
        ("model.layers.0.mlp.gate_proj.weight", 11),
        ("model.layers.1.mlp.down_proj.weight", 300),
        ("model.norm.weight", 9),
        ("lm_head.weight", 2 * 32 + 1),
    ];
    check_finite_differences(&load("qwen2-untied", DType::F64), &entries, None);
    let entries = [
        ("model.embed_tokens.weight", 9 * 32 + 1),
        ("model.layers.0.self_attn.q_norm.weight", 3),
        ("model.layers.1.self_attn.k_norm.weight", 12),
        ("model.layers.1.self_attn.q_proj.weight", 200),
        ("model.layers.0.mlp.up_proj.weight", 42),
    ];
    check_finite_differences(&load("qwen3", DType::F64), &entries, None);
    let entries = [
        ("model.layers.0.self_attn.o_proj.bias", 6),
        ("model.layers.1.self_attn.q_proj.bias", 1),
    ];
    check_finite_differences(&load("llama-bias", DType::F64), &entries, None);
}

#[test]
fn gpt_gradients_match_finite_differences() {
    let entries = [
        ("wte.weight", 27 * 24 + 5),
        ("wpe.weight", 3 * 24 + 2),
        ("h.0.ln_1.weight", 4),
        ("h.0.ln_1.bias", 8),
        ("h.0.attn.c_attn.weight", 24 * 30 + 3),
        ("h.1.attn.c_attn.bias", 50),
        ("h.0.attn.c_proj.weight", 17),
        ("h.1.mlp.c_fc.weight", 400),
        ("h.0.mlp.c_proj.bias", 5),
        ("ln_f.bias", 1),
        ("lm_head.weight", 9 * 24 + 7),
    ];
    // Training mode: the same seed draws the same dropout masks in every evaluation.
    check_finite_differences(&gpt(false, true, 0.1, DType::F64), &entries, Some(42));
}

#[test]
fn changing_a_later_token_leaves_earlier_logits_unchanged() {
    for (name, model) in models(DType::F32) {
        let a = vec![vec![5u32, 17, 3, 44, 8, 21, 30, 2, 9, 12]];
        let mut b = a.clone();
        b[0][6] = 55;
        let (la, lb) = (causal(&model, &a), causal(&model, &b));
        let before = |t: &Tensor| t.narrow(1, 0, 6).unwrap();
        let after = |t: &Tensor| t.narrow(1, 6, 4).unwrap();
        assert!(
            max_abs_diff(&before(&la), &before(&lb)) < 1e-6,
            "{name}: causality"
        );
        assert!(
            max_abs_diff(&after(&la), &after(&lb)) > 1e-3,
            "{name}: later logits must change"
        );
    }
}

#[test]
fn batch_rows_equal_rows_alone() {
    // Guards the CPU matmul layout trap, which shows only with batch > 1.
    for (name, model) in models(DType::F32) {
        let rows = vec![vec![5u32, 17, 3, 44, 8, 21], vec![40, 2, 19, 19, 7, 1]];
        let both = causal(&model, &rows);
        for (r, row) in rows.iter().enumerate() {
            let alone = causal(&model, std::slice::from_ref(row));
            let diff = max_abs_diff(&both.narrow(0, r, 1).unwrap(), &alone);
            assert!(diff < 1e-5, "{name}: row {r} differs by {diff}");
        }
    }
}

#[test]
fn right_padding_does_not_change_a_rows_logits() {
    for (name, model) in models(DType::F32) {
        let short = vec![5u32, 17, 3, 44, 8];
        let long = vec![40u32, 2, 19, 19, 7, 1, 33, 14, 6];
        let alone = causal(&model, std::slice::from_ref(&short));
        let mut padded = short.clone();
        padded.resize(long.len(), 0);
        let seg = ids(&[vec![1; 9], [vec![1; 5], vec![0; 4]].concat()]);
        let batch = forward(
            &model,
            &[long.clone(), padded],
            &AttentionMask::Segments(&seg),
            &positions(2, 9),
        );
        let diff = max_abs_diff(
            &batch.narrow(0, 1, 1).unwrap().narrow(1, 0, 5).unwrap(),
            &alone,
        );
        assert!(diff < 1e-5, "{name}: padded row differs by {diff}");
        let diff = max_abs_diff(&batch.narrow(0, 0, 1).unwrap(), &causal(&model, &[long]));
        assert!(diff < 1e-5, "{name}: full row differs by {diff}");
        let finite = batch
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|x| x.is_finite());
        assert!(finite, "{name}: padding positions must stay finite");
    }
}

#[test]
fn packed_samples_equal_samples_alone() {
    for (name, model) in models(DType::F32) {
        let a = vec![5u32, 17, 3, 44];
        let b = vec![40u32, 2, 19, 19, 7];
        let packed = [a.clone(), b.clone(), vec![0, 0]].concat();
        let seg = ids(&[vec![1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0]]);
        let pos = ids(&[vec![0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 0]]);
        let out = forward(&model, &[packed], &AttentionMask::Segments(&seg), &pos);
        let diff_a = max_abs_diff(
            &out.narrow(1, 0, 4).unwrap(),
            &causal(&model, std::slice::from_ref(&a)),
        );
        let diff_b = max_abs_diff(
            &out.narrow(1, 4, 5).unwrap(),
            &causal(&model, std::slice::from_ref(&b)),
        );
        assert!(
            diff_a < 1e-5 && diff_b < 1e-5,
            "{name}: packed differs by {diff_a}, {diff_b}"
        );
    }
}

#[test]
fn dropout_is_deterministic_per_seed_and_off_in_eval() {
    let model = gpt(true, true, 0.2, DType::F32);
    let (x, p) = (ids(&[vec![1u32, 2, 3, 4, 5, 6]]), positions(1, 6));
    let run = |seed| model.forward(&x, &p, &AttentionMask::Causal, seed).unwrap();
    assert!(max_abs_diff(&run(Some(3)), &run(Some(3))) == 0.0);
    assert!(max_abs_diff(&run(Some(3)), &run(Some(4))) > 1e-3);
    assert!(max_abs_diff(&run(Some(3)), &run(None)) > 1e-3);
    assert!(max_abs_diff(&run(None), &run(None)) == 0.0);
    // Qwen models have no dropout: the seed changes nothing.
    let qwen = load("qwen3", DType::F32);
    let q = |seed| qwen.forward(&x, &p, &AttentionMask::Causal, seed).unwrap();
    assert!(max_abs_diff(&q(Some(3)), &q(None)) == 0.0);
}

#[test]
fn bad_inputs_are_errors() {
    let model = gpt(true, true, 0.0, DType::F32);
    let x = ids(&[vec![1u32, 2, 3]]);
    let beyond = ids(&[vec![30u32, 31, 32]]); // block_size is 32
    let err = model
        .forward(&x, &beyond, &AttentionMask::Causal, None)
        .unwrap_err();
    assert!(
        matches!(err, Error::Input { .. }) && err.to_string().contains("32"),
        "{err}"
    );
    let err = model
        .forward(
            &ids(&[vec![1u32, 61]]),
            &positions(1, 2),
            &AttentionMask::Causal,
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("61"), "{err}");
    let seg = ids(&[vec![1u32, 1]]);
    let err = model
        .forward(&x, &positions(1, 3), &AttentionMask::Segments(&seg), None)
        .unwrap_err();
    assert!(matches!(err, Error::Input { .. }), "{err}");
}

#[test]
fn half_precision_models_track_f32() {
    let rows = vec![vec![5u32, 17, 3, 44, 8, 21], vec![40, 2, 19, 0, 0, 0]];
    let seg = ids(&[vec![1u32; 6], vec![1, 1, 1, 0, 0, 0]]);
    let run = |m: &Model| forward(m, &rows, &AttentionMask::Segments(&seg), &positions(2, 6));
    for name in ["qwen2-untied", "qwen3"] {
        let reference = run(&load(name, DType::F32));
        for (dtype, tolerance) in [(DType::BF16, 0.1), (DType::F16, 0.02)] {
            let logits = run(&load(name, dtype));
            assert_eq!(logits.dtype(), DType::F32);
            let real = |t: &Tensor| t.narrow(1, 0, 3).unwrap();
            let diff = max_abs_diff(&real(&logits), &real(&reference));
            assert!(diff < tolerance, "{name} {dtype:?}: {diff}");
            assert!(
                diff > 0.0,
                "{name} {dtype:?} must actually compute in {dtype:?}"
            );
        }
    }
    let g = gpt(true, true, 0.0, DType::F32);
    let dir = TempDir::new("gpt-bf16");
    g.save(dir.path(), DType::BF16).unwrap();
    let h = Model::load(dir.path(), DType::BF16, &candle_core::Device::Cpu).unwrap();
    assert!(max_abs_diff(&run(&h), &run(&g)) < 0.15);
}
