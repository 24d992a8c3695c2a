//! Whole training runs through `sft::train`: resume continues bit-identically, a diverging run
//! stops with a clear error and leaves its last checkpoint loadable, outputs are all written.

use std::path::Path;

use candle_core::{DType, Device};
use sft::{train, Event, RunOptions, TrainConfig};
use sft_model::Model;

mod common;
use common::{poems, scratch};

/// A fresh GPT with dropout on, poem metadata dropout on, gradient accumulation, and enough
/// steps to cross an epoch boundary.
fn config(data: &Path, out: &Path) -> TrainConfig {
    let text = format!(
        r#"
        [model]
        preset = "tiny-gpt"
        init = {{ dropout = 0.1, n_embd = 32 }}
        [tokenizer]
        build = "char"
        [data]
        train = ["{}"]
        val_ratio = 0.1
        max_len = 96
        [optim]
        lr = 3e-3
        weight_decay = 0.1
        [train]
        batch_size = 4
        grad_accum = 2
        max_steps = 14
        [run]
        out_dir = "{}"
        log_every = 1
        save_every = 6
        keep_last = 3
        "#,
        data.display(),
        out.display()
    );
    TrainConfig::from_toml_str(&text, &[]).unwrap()
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let m = Model::load(dir, DType::F32, &Device::Cpu).unwrap();
    m.params()
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect()
}

fn train_losses(metrics: &Path) -> Vec<(u64, f64)> {
    sft::metrics::read_loss_series(metrics).unwrap().0
}

#[test]
fn resume_is_bit_identical_to_an_uninterrupted_run() {
    let dir = scratch("resume");
    let data = poems(&dir, 60);
    let full = config(&data, &dir.join("full"));
    let summary = train(&full, &RunOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(summary.steps, 14);
    // 54 training poems / 4 rows = 14 micro-batches = 7 steps per epoch: step 14 ends epoch 1.
    let resumed_cfg = config(&data, &dir.join("resumed"));
    let ckpt = dir.join("full/checkpoint-000006");
    let mut starts = vec![];
    let resume = RunOptions {
        resume: Some(ckpt),
        ..Default::default()
    };
    let resumed = train(&resumed_cfg, &resume, &mut |e| {
        if let Event::Started { start_step, .. } = e {
            starts.push(start_step)
        }
    })
    .unwrap();
    assert_eq!(starts, vec![6]);
    assert_eq!(resumed.steps, 14);
    let a = train_losses(&summary.metrics);
    let b = train_losses(&resumed.metrics);
    assert_eq!(&a[6..], &b[..], "losses after the resume point");
    assert_eq!(
        weights(&dir.join("full/checkpoint-000014")),
        weights(&dir.join("resumed/checkpoint-000014")),
        "final weights"
    );
    // Different data is refused rather than silently resumed on.
    let other = poems(&scratch("resume-other"), 40);
    let err = train(
        &config(&other, &dir.join("other")),
        &RunOptions {
            resume: Some(dir.join("full/checkpoint-000012")),
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("resuming with a different data.train"),
        "{err}"
    );
    // So is the same file with other contents.
    std::fs::copy(&other, &data).unwrap();
    let err = train(
        &config(&data, &dir.join("other")),
        &RunOptions {
            resume: Some(dir.join("full/checkpoint-000012")),
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("training data differs"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_run_writes_its_outputs() {
    let dir = scratch("outputs");
    let data = poems(&dir, 60);
    let cfg = config(&data, &dir.join("out"));
    let mut device = None;
    let s = train(&cfg, &RunOptions::default(), &mut |e| {
        if let Event::Started { device: d, .. } = e {
            device = Some(d);
        }
    })
    .unwrap();
    // The run names where it computes: the CPU unless built with a GPU backend (which may then
    // have found a GPU).
    let device = device.expect("the run reports its start");
    assert!(
        device == "cpu" || (cfg!(feature = "cuda") && device.starts_with("cuda:")),
        "{device}"
    );
    let out = dir.join("out");
    for f in [
        "metrics.jsonl",
        "loss.svg",
        "preflight.json",
        "train_config.toml",
        "final/config.json",
        "final/model.safetensors",
        "final/char_tokenizer.json",
        "best/model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // keep_last = 3 of the checkpoints at steps 6, 12, 14.
    let ckpts: Vec<u64> = sft::checkpoint::list_checkpoints(&out)
        .unwrap()
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(ckpts, vec![6, 12, 14]);
    let ck = out.join("checkpoint-000014");
    for f in [
        "optimizer.safetensors",
        "trainer_state.json",
        "train_config.toml",
    ] {
        assert!(ck.join(f).is_file(), "{f} missing");
    }
    let state = sft::checkpoint::TrainerState::read(&ck).unwrap();
    assert_eq!((state.step, state.epoch, state.micro_batch), (14, 2, 0));
    assert!(s.final_val_loss.unwrap().is_finite());
    let first = std::fs::read_to_string(&s.metrics).unwrap();
    let first: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    for key in [
        "step",
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "target_tokens",
        "tokens",
        "positions",
        "elapsed_s",
    ] {
        assert!(first.get(key).is_some(), "metrics line lacks {key}");
    }
    // Targets are tokens, tokens fill positions (the rest is padding).
    for line in std::fs::read_to_string(&s.metrics).unwrap().lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        if m["kind"] == "train" {
            let n = |k: &str| m[k].as_u64().unwrap();
            assert!(
                0 < n("target_tokens") && n("target_tokens") <= n("tokens"),
                "{line}"
            );
            assert!(n("tokens") <= n("positions"), "{line}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn divergence_stops_the_run_and_keeps_the_last_checkpoint() {
    let dir = scratch("nan");
    let data = poems(&dir, 60);
    let mut cfg = config(&data, &dir.join("out"));
    cfg.optim.lr = 1e30;
    cfg.optim.max_grad_norm = 0.0;
    cfg.run.save_every = Some(1);
    let err = train(&cfg, &RunOptions::default(), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("non-finite"), "{err}");
    let last = sft::checkpoint::list_checkpoints(&dir.join("out")).unwrap();
    let (_, path) = last.last().expect("the good steps were saved");
    Model::load(path, DType::F32, &Device::Cpu).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
