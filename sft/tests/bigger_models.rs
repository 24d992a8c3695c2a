//! Bigger models on the same machine, each pinned by a test: LoRA on a quantized base is LoRA on
//! that base's dequantized values; activation checkpointing trains the same run bit for bit;
//! half precision with f32 master weights tracks f32 where in-place updates do not.

mod common;

use candle_core::{DType, Tensor};
use common::{eight_samples, load, load_as, lora, max_abs, scratch};
use sft::step::{accumulate_micro_batch, GradAccumulator};
use sft::{AdamW, OptimConfig};
use sft_data::{collate, Batch, Rendered};
use sft_model::quant::{quant_type, QUANT_NAMES};
use sft_model::{frozen_matrices, Model, Quantize};

/// The eight samples as one padded micro-batch.
fn batch() -> Batch {
    let samples = eight_samples();
    let rows: Vec<Vec<&Rendered>> = samples.iter().map(|r| vec![r]).collect();
    collate(&rows, 0, None)
}

/// `steps` AdamW steps on `batch`: each step's loss and gradient norm, and the optimizer.
fn train_steps(
    model: &Model,
    batch: &Batch,
    steps: u64,
    cfg: &OptimConfig,
) -> (Vec<(f64, f64)>, AdamW) {
    let mut opt = AdamW::new(model.params(), cfg).unwrap();
    let stats = (0..steps)
        .map(|step| {
            let mut grads = GradAccumulator::new(model.params().len());
            let scale = opt.loss_scale() / batch.n_targets as f64;
            let stats =
                accumulate_micro_batch(model, batch, scale, Some(step), &mut grads).unwrap();
            let s = opt.step(&grads.take(), cfg.lr).unwrap();
            (stats.mean(), s.grad_norm)
        })
        .collect();
    (stats, opt)
}

fn train(model: &Model, batch: &Batch, steps: u64, cfg: &OptimConfig) -> Vec<(f64, f64)> {
    train_steps(model, batch, steps, cfg).0
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The base of every fixture kept as blocks (q8_0; q4_k, whose 256-value blocks the tiny
/// fixtures' rows do not fill, falls back as llama.cpp does), with LoRA on every linear layer:
/// three steps give the losses, gradient norms and adapters of the same LoRA on the base's
/// dequantized values (to 1e-5), and the blocks stay as they were.
#[test]
fn lora_on_a_quantized_base_is_lora_on_its_dequantized_values() {
    let batch = batch();
    let cfg = OptimConfig {
        lr: 1e-2,
        ..OptimConfig::default()
    };
    for (name, quant) in [
        ("qwen2-tied", "q8_0"),
        ("qwen2-untied", "q4_k"),
        ("qwen3", "q8_0"),
        ("llama3", "q4_0"),
        ("mistral", "q8_0"),
        ("gemma2", "q8_0"),
        ("gemma3", "q6_k"),
    ] {
        let base = load(name);
        let lora_cfg = sft_model::LoraConfig {
            r: 4,
            dropout: 0.0,
            ..Default::default()
        };
        let names = frozen_matrices(base.config(), &lora_cfg).unwrap();
        let quantize = Quantize {
            dtype: quant_type(quant).unwrap(),
            names,
        };
        let quantized = base.quantized_with(&quantize).unwrap();
        let blocks = quantized.quantized().len();
        assert!(blocks > 0, "{name}: the base kept blocks");
        // The reference: the same values, as ordinary frozen tensors.
        let dequantized = load(name)
            .quantized_with(&quantize)
            .unwrap()
            .dequantized()
            .unwrap();
        let (q, d) = (lora(quantized, &[]), lora(dequantized, &[]));
        assert_eq!(q.quantized().len(), blocks);
        assert!(d.quantized().is_empty());
        let before: Vec<Vec<u8>> = q
            .quantized()
            .iter()
            .map(|(_, w)| w.bytes().unwrap().to_vec())
            .collect();
        let (a, b) = (train(&q, &batch, 3, &cfg), train(&d, &batch, 3, &cfg));
        for (k, ((la, ga), (lb, gb))) in a.iter().zip(&b).enumerate() {
            assert!(
                (la - lb).abs() <= 1e-5 * lb.abs(),
                "{name} step {k}: loss {la} vs {lb}"
            );
            assert!(
                (ga - gb).abs() <= 1e-5 * gb.abs(),
                "{name} step {k}: norm {ga} vs {gb}"
            );
        }
        for ((n, x), (_, y)) in q.params().iter().zip(d.params()) {
            let diff = max_abs(&(x.as_tensor() - y.as_tensor()).unwrap());
            assert!(diff <= 1e-5, "{name}: adapter {n} differs by {diff}");
        }
        for ((n, w), bytes) in q.quantized().iter().zip(&before) {
            assert_eq!(&w.bytes().unwrap().to_vec(), bytes, "{name}: {n} is frozen");
        }
    }
    assert!(QUANT_NAMES.iter().any(|(n, _)| *n == "q4_k"));
}

/// `train.gradient_checkpointing` on whole runs (packing; a GPT with dropout; evaluation):
/// the final weights are the runs' without it, bit for bit.
#[test]
fn activation_checkpointing_trains_the_same_run() {
    let dir = scratch("checkpointing");
    let data = common::poems(&dir, 40);
    let run = |name: &str, model: &str, checkpointing: bool| {
        let toml = format!(
            r#"
            [model]
            {model}
            [tokenizer]
            build = "char"
            [data]
            train = [{data:?}]
            packing = true
            max_len = 64
            val_ratio = 0.1
            [train]
            batch_size = 2
            max_steps = 4
            gradient_checkpointing = {checkpointing}
            [run]
            out_dir = {out:?}
            eval_every = 2
            "#,
            data = data.display().to_string(),
            out = dir.join(name).display().to_string(),
        );
        let cfg = sft::TrainConfig::from_toml_str(&toml, &[]).unwrap();
        sft::train(&cfg, &sft::RunOptions::default(), &mut |_| {}).unwrap();
        std::fs::read(dir.join(name).join("final/model.safetensors")).unwrap()
    };
    for (name, model) in [
        ("qwen3", r#"preset = "tiny-qwen3""#),
        ("gpt", "preset = \"tiny-gpt\"\ninit = { dropout = 0.1 }"),
    ] {
        let plain = run(&format!("{name}-plain"), model, false);
        let checkpointed = run(&format!("{name}-checkpointed"), model, true);
        assert!(plain == checkpointed, "{name}: the runs differ");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// 50 steps at lr 1e-5 on a tiny untied Qwen2: bf16 with f32 master weights tracks f32's losses
/// within bf16's rounding and moves every parameter f32 moves (its master weights: most of a
/// norm gain's 50 updates of about 1e-5 are below half a bf16 step near 1, so its rounded copy
/// moves only as they add up); bf16 updated in place leaves most parameters, and every norm
/// gain, where they were.
#[test]
fn master_weights_keep_the_updates_bf16_rounds_away() {
    let batch = batch();
    let cfg = |master| OptimConfig {
        lr: 1e-5,
        master_weights: master,
        ..OptimConfig::default()
    };
    // Per parameter, the share of its trained values (the master weights where there are
    // some) that changed, and the step losses.
    let run = |dtype, master| {
        let model = load_as("qwen2-untied", dtype);
        let before: Vec<Vec<f32>> = model
            .params()
            .iter()
            .map(|(_, v)| values(v.as_tensor()))
            .collect();
        let (losses, opt) = train_steps(&model, &batch, 50, &cfg(master));
        let moved: Vec<f64> = model
            .params()
            .iter()
            .enumerate()
            .zip(&before)
            .map(|((i, (_, v)), old)| {
                let new = values(opt.master(i).unwrap_or(v.as_tensor()));
                let n = new.iter().zip(old).filter(|(a, b)| a != b).count();
                n as f64 / new.len() as f64
            })
            .collect();
        (losses, moved)
    };
    let (f32_losses, f32_moved) = run(DType::F32, true);
    let (master_losses, master_moved) = run(DType::BF16, true);
    let (inplace_losses, inplace_moved) = run(DType::BF16, false);
    let names: Vec<String> = load("qwen2-untied")
        .params()
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    for (i, name) in names.iter().enumerate() {
        if f32_moved[i] > 0.0 {
            assert!(master_moved[i] > 0.0, "master weights: {name} never moved");
        }
    }
    let still_in_place = (0..names.len())
        .filter(|&i| f32_moved[i] > 0.0 && inplace_moved[i] == 0.0)
        .count();
    let norms: Vec<usize> = (0..names.len())
        .filter(|&i| names[i].contains("norm"))
        .collect();
    assert!(
        norms
            .iter()
            .all(|&i| inplace_moved[i] == 0.0 && f32_moved[i] > 0.0),
        "in place, every norm gain stays put"
    );
    assert!(still_in_place >= norms.len());
    // The losses track f32's to bf16's rounding of the forward pass.
    for (k, ((lf, _), (lm, _))) in f32_losses.iter().zip(&master_losses).enumerate() {
        assert!(
            (lf - lm).abs() < 0.02 * lf.abs(),
            "step {k}: f32 {lf} vs master {lm}"
        );
    }
    let fall = |l: &[(f64, f64)]| l[0].0 - l[49].0;
    let (f, m, p) = (
        fall(&f32_losses),
        fall(&master_losses),
        fall(&inplace_losses),
    );
    assert!(f > 0.0, "f32: the loss fell");
    assert!(m > 0.5 * f, "master weights: the loss fell {m}, f32's {f}");
    assert!(
        p < m,
        "in place: the loss fell {p}, with master weights {m}"
    );
}
