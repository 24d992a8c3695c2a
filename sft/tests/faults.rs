//! The failures a user met with `save_every = 1`, `keep_last` and killed runs, as tests: a
//! resumed run whose checkpoint (and base model) are gone by its next save, a deletion cut short
//! mid-rotation, a resumed run that is given a new length, and a fresh run into a used
//! directory.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device};
use sft::checkpoint::{list_checkpoints, resolve_resume, TrainerState};
use sft::{train, Event, RunOptions, TrainConfig};
use sft_model::Model;

mod common;
use common::{poems, scratch};

/// A tiny from-scratch GPT; `model` lines replace the fresh model (to fine-tune a base).
fn config(data: &Path, out: &Path, model: &str, sets: &[&str]) -> TrainConfig {
    let text = format!(
        r#"
        [model]
        {model}
        [tokenizer]
        build = "char"
        [data]
        train = ["{}"]
        max_len = 96
        [optim]
        lr = 3e-3
        [train]
        batch_size = 4
        max_steps = 6
        [run]
        out_dir = "{}"
        log_every = 1
        save_every = 1
        keep_last = 2
        "#,
        data.display(),
        out.display()
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    TrainConfig::from_toml_str(&text, &sets).unwrap()
}

const FRESH: &str = "preset = \"tiny-gpt\"\ninit = { n_embd = 32 }";

fn weights_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

fn steps(dir: &Path) -> Vec<u64> {
    list_checkpoints(dir)
        .unwrap()
        .into_iter()
        .map(|c| c.0)
        .collect()
}

#[test]
fn a_resumed_run_saves_after_its_checkpoint_and_base_model_are_gone() {
    let dir = scratch("gone");
    let data = poems(&dir, 40);
    // A base model to fine-tune, with its tokenizer.
    let pre = config(&data, &dir.join("pre"), FRESH, &["train.max_steps=2"]);
    let base = train(&pre, &RunOptions::default(), &mut |_| {})
        .unwrap()
        .final_model;
    let base_copy = dir.join("base");
    let copy_base = || {
        std::fs::create_dir_all(&base_copy).unwrap();
        for f in std::fs::read_dir(&base).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, base_copy.join(f.file_name().unwrap())).unwrap();
        }
    };
    copy_base();
    let model_line = format!("path = \"{}\"", base_copy.display());
    let out = dir.join("ft");
    let mut ft = config(&data, &out, &model_line, &["train.max_steps=8"]);
    ft.tokenizer.build = None;

    // The base directory disappears once the run is under way; the run is stopped at step 3.
    let stop = Arc::new(AtomicBool::new(false));
    let opts = RunOptions {
        resume: None,
        stop: Some(stop.clone()),
    };
    let stopped = train(&ft, &opts, &mut |e| match e {
        Event::Checkpoint { step: 2, .. } => std::fs::remove_dir_all(&base_copy).unwrap(),
        Event::Step(m) if m.step == 3 => stop.store(true, Ordering::SeqCst),
        _ => {}
    })
    .unwrap();
    assert!(stopped.interrupted && !base_copy.exists());
    assert_eq!(steps(&out), vec![2, 3]);

    // Resumed from checkpoint 3 with keep_last = 1: the first save rotates the checkpoint the
    // run resumed from away, and the saves after it must not need it.
    let mut resumed_cfg = ft.clone();
    resumed_cfg.run.keep_last = 1;
    let resume = RunOptions {
        resume: Some(out.join("checkpoint-000003")),
        ..Default::default()
    };
    let s = train(&resumed_cfg, &resume, &mut |_| {}).unwrap();
    assert_eq!(s.steps, 8);
    assert_eq!(steps(&out), vec![8]);
    // Every checkpoint stands alone.
    let last = out.join("checkpoint-000008");
    Model::load(&last, DType::F32, &Device::Cpu).unwrap();
    sft_tokenizer::Tokenizer::from_path(&last).unwrap();

    // And the result is the uninterrupted run's, bit for bit.
    copy_base();
    let mut reference = ft.clone();
    reference.run.out_dir = dir.join("reference");
    train(&reference, &RunOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(
        weights_bytes(&out.join("final")),
        weights_bytes(&dir.join("reference/final"))
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_deletion_cut_short_never_leaves_a_partial_checkpoint() {
    let dir = scratch("rotation");
    let data = poems(&dir, 40);
    let out = dir.join("out");
    let cfg = config(&data, &out, FRESH, &["run.keep_last=3"]);
    train(&cfg, &RunOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(steps(&out), vec![4, 5, 6]);

    // What a kill mid-rotation leaves now: the doomed checkpoint under a hidden name, half
    // deleted. No `checkpoint-*` directory is partial, and resuming the run directory works.
    let doomed = out.join(format!(
        ".checkpoint-000004.deleting-{}",
        std::process::id() + 1
    ));
    std::fs::rename(out.join("checkpoint-000004"), &doomed).unwrap();
    std::fs::remove_file(doomed.join("tokenizer.json"))
        .or_else(|_| std::fs::remove_file(doomed.join("char_tokenizer.json")))
        .unwrap();
    assert_eq!(steps(&out), vec![5, 6]);

    // What it left before (a partial directory under the checkpoint's own name) is recognised
    // as incomplete, by name of what is missing, and passed over.
    let partial = out.join("checkpoint-000006");
    std::fs::remove_file(partial.join("char_tokenizer.json")).unwrap();
    std::fs::remove_file(partial.join("optimizer.safetensors")).unwrap();
    let err = Model::load(&partial, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("incomplete checkpoint")
            && err.contains("char_tokenizer.json missing")
            && err.contains("optimizer.safetensors missing")
            && !err.contains('\n'),
        "{err}"
    );
    let from = resolve_resume(&out).unwrap();
    assert_eq!(from.checkpoint, out.join("checkpoint-000005"));
    assert!(from.from_run_dir);
    assert_eq!(from.skipped.len(), 1);
    assert!(from.skipped[0].1.contains("char_tokenizer.json missing"));
    let err = resolve_resume(&partial).unwrap_err().to_string();
    assert!(err.contains("char_tokenizer.json missing"), "{err}");

    // Resuming the run directory cleans the leftover, continues from step 5 and ends where the
    // uninterrupted run ended.
    let finished = weights_bytes(&out.join("final"));
    let mut cleaned = vec![];
    let mut resumed_at = None;
    let resume = RunOptions {
        resume: Some(out.clone()),
        ..Default::default()
    };
    train(&cfg, &resume, &mut |e| match e {
        Event::Cleaned(c) => cleaned.extend(c.removed.clone()),
        Event::Resumed { from, .. } => resumed_at = Some(from.checkpoint.clone()),
        _ => {}
    })
    .unwrap();
    assert_eq!(cleaned, vec![doomed.clone()]);
    assert!(!doomed.exists());
    assert_eq!(resumed_at, Some(out.join("checkpoint-000005")));
    assert_eq!(weights_bytes(&out.join("final")), finished);
    // The log holds each step once: the resumed run dropped what the first logged after step 5.
    let (train_losses, _) = sft::metrics::read_loss_series(&out.join("metrics.jsonl")).unwrap();
    let logged: Vec<u64> = train_losses.iter().map(|p| p.0).collect();
    assert_eq!(logged, vec![1, 2, 3, 4, 5, 6]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_resumed_run_takes_a_new_length_and_refuses_other_changes() {
    let dir = scratch("extend");
    let data = poems(&dir, 40);
    let out = dir.join("out");
    let cfg = config(&data, &out, FRESH, &["schedule.kind=cosine"]);
    train(&cfg, &RunOptions::default(), &mut |_| {}).unwrap();
    let resume = RunOptions {
        resume: Some(out.clone()),
        ..Default::default()
    };

    // Longer: the schedule is planned for the new total, and the run goes on to it.
    let longer = config(
        &data,
        &out,
        FRESH,
        &[
            "schedule.kind=cosine",
            "train.max_steps=9",
            "run.log_every=2",
        ],
    );
    let mut totals = None;
    let mut changed = vec![];
    let s = train(&longer, &resume, &mut |e| {
        if let Event::Resumed {
            total_steps,
            changes,
            ..
        } = e
        {
            totals = Some(total_steps);
            changed = changes.iter().map(|c| c.to_string()).collect();
        }
    })
    .unwrap();
    assert_eq!(totals, Some((6, 9)));
    assert_eq!(changed, ["run.log_every 1 -> 2", "train.max_steps 6 -> 9"]);
    assert_eq!(s.steps, 9);
    let state = TrainerState::read(&out.join("checkpoint-000009")).unwrap();
    assert_eq!((state.step, state.total_steps), (9, 9));
    // The learning rate after the resume point follows the new total's curve.
    let lr_at_9 = longer.schedule.lr(longer.optim.lr, 8, 9);
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 9);
    assert_eq!(last["lr"].as_f64().unwrap(), lr_at_9);

    // Shorter than where the checkpoint stands: refused, by name.
    let shorter = config(
        &data,
        &out,
        FRESH,
        &["schedule.kind=cosine", "train.max_steps=4"],
    );
    let err = train(&shorter, &resume, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("past the new schedule's total of 4"), "{err}");

    // Anything that shapes the trajectory: refused, every differing key listed.
    let other = config(
        &data,
        &out,
        FRESH,
        &[
            "schedule.kind=cosine",
            "train.max_steps=12",
            "optim.lr=1e-3",
            "run.seed=1",
            "train.batch_size=2",
        ],
    );
    let err = train(&other, &resume, &mut |_| {}).unwrap_err().to_string();
    assert!(
        err.contains("optim.lr 0.003 -> 0.001")
            && err.contains("run.seed 42 -> 1")
            && err.contains("train.batch_size 4 -> 2")
            && !err.contains("max_steps 9"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_fresh_run_into_a_used_directory_is_refused_unless_overwriting() {
    let dir = scratch("used");
    let data = poems(&dir, 40);
    let out = dir.join("out");
    let cfg = config(&data, &out, FRESH, &["train.max_steps=2"]);
    train(&cfg, &RunOptions::default(), &mut |_| {}).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let err = train(&cfg, &RunOptions::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("holds another run's files and 2 checkpoint(s)")
            && err.contains("--resume")
            && err.contains("--overwrite"),
        "{err}"
    );
    let mut over = cfg.clone();
    over.run.overwrite = true;
    over.train.max_steps = Some(1);
    // An overwriting run that fails to set up leaves the previous run as it was.
    let mut broken = over.clone();
    broken.data.train = vec![dir.join("missing.jsonl").into()];
    let err = train(&broken, &RunOptions::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.jsonl"), "{err}");
    assert_eq!(steps(&out), vec![1, 2]);
    assert!(out.join("final/model.safetensors").is_file());
    let mut removed = vec![];
    train(&over, &RunOptions::default(), &mut |e| {
        if let Event::Overwrote { removed: r } = e {
            removed = r.to_vec();
        }
    })
    .unwrap();
    assert!(removed.contains(&out.join("checkpoint-000002")));
    assert_eq!(steps(&out), vec![1]);
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"train\"")).count(), 1);
    // What the user put there is theirs.
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_stop_request_saves_the_step_and_resumes_to_the_same_weights() {
    let dir = scratch("stop");
    let data = poems(&dir, 40);
    let full = config(&data, &dir.join("full"), FRESH, &["run.save_every=100"]);
    let done = train(&full, &RunOptions::default(), &mut |_| {}).unwrap();
    assert!(!done.interrupted);

    let out = dir.join("stopped");
    let cfg = config(&data, &out, FRESH, &["run.save_every=100"]);
    let stop = Arc::new(AtomicBool::new(false));
    let opts = RunOptions {
        resume: None,
        stop: Some(stop.clone()),
    };
    let s = train(&cfg, &opts, &mut |e| {
        if let Event::Step(m) = e {
            if m.step == 3 {
                stop.store(true, Ordering::SeqCst);
            }
        }
    })
    .unwrap();
    assert!(s.interrupted);
    assert_eq!(s.steps, 3);
    assert_eq!(s.last_checkpoint, out.join("checkpoint-000003"));
    assert!(!out.join("final").exists());
    let resume = RunOptions {
        resume: Some(out.clone()),
        ..Default::default()
    };
    let s = train(&cfg, &resume, &mut |_| {}).unwrap();
    assert!(!s.interrupted);
    assert_eq!(
        weights_bytes(&out.join("final")),
        weights_bytes(&dir.join("full/final"))
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_max_len_beyond_the_models_context_is_refused_at_the_start() {
    let dir = scratch("max-len");
    let data = poems(&dir, 20);
    // tiny-gpt has 128 positions.
    let cfg = config(&data, &dir.join("out"), FRESH, &["data.max_len=256"]);
    let err = train(&cfg, &RunOptions::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data.max_len = 256 is longer than the model's context of 128 positions"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
