//! Data and runs as users have them: time budgets and early stopping, weighted mixtures, the
//! disk cache of rendered data, and streamed data, each resuming exactly where it applies.

use std::path::Path;

use sft::checkpoint::TrainerState;
use sft::{train, Event, Replan, RunOptions, TrainConfig};

mod common;
use common::scratch;

fn config(dir: &Path, sets: &[&str]) -> TrainConfig {
    let data = common::poems(dir, 60);
    let toml = format!(
        r#"
        [model]
        preset = "tiny-gpt"
        init = {{ n_embd = 32 }}
        [tokenizer]
        build = "char"
        [data]
        train = ["{}"]
        val_ratio = 0.1
        max_len = 96
        [optim]
        lr = 3e-3
        [schedule]
        kind = "cosine"
        [train]
        batch_size = 4
        threads = 1
        [run]
        out_dir = "{}"
        log_every = 1
        "#,
        data.display(),
        dir.join("out").display()
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    TrainConfig::from_toml_str(&toml, &sets).unwrap()
}

#[test]
fn a_time_budget_ends_the_run_within_a_step_with_the_schedule_at_its_end() {
    let dir = scratch("time");
    let cfg = config(&dir, &["train.max_time=\"2s\"", "run.eval_every=50"]);
    let mut replans = vec![];
    let s = train(&cfg, &RunOptions::default(), &mut |e| {
        if let Event::Replanned { total_steps, why } = e {
            replans.push((total_steps, why.clone()));
        }
    })
    .unwrap();
    let state = TrainerState::read(&s.last_checkpoint).unwrap();
    // Ended at the first step past the budget: the step before it was inside.
    let per_step = state.train_s / state.step as f64;
    assert!(
        state.train_s >= 2.0,
        "{} at step {}: {:?}",
        state.train_s,
        state.step,
        &replans[replans.len().saturating_sub(4)..]
    );
    assert!(
        state.train_s - 2.0 < 3.0 * per_step + 0.5,
        "{} s for a 2 s budget at {per_step} s/step",
        state.train_s
    );
    // The schedule was planned for where the run ended: its total is the last step, and the
    // first estimate (one epoch is 14 steps, far fewer than fit) came after the first steps.
    assert_eq!(state.total_steps, state.step);
    assert!(state.step > 14, "{}", state.step);
    let ((first_before, _), first_why) = &replans[0];
    assert_eq!(
        *first_before, 14,
        "the plan before the first estimate is one epoch"
    );
    assert!(matches!(first_why, Replan::Budget { .. }));
    let lrs: Vec<f64> = std::fs::read_to_string(&s.metrics)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"train\""))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["lr"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let last = *lrs.last().unwrap();
    assert!(
        last < 0.05 * cfg.optim.lr,
        "the last step's lr {last} is not near the floor"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn early_stopping_ends_the_run_after_patience_evaluations_without_improvement() {
    let dir = scratch("early");
    // No improvement of 100 nats is possible: the first evaluation sets the best, the next two
    // do not improve on it by that much.
    let cfg = config(
        &dir,
        &[
            "train.max_steps=40",
            "run.eval_every=2",
            "train.early_stopping={patience = 2, min_delta = 100.0}",
        ],
    );
    let mut stopped = None;
    let s = train(&cfg, &RunOptions::default(), &mut |e| {
        if let Event::Replanned { total_steps, why } = e {
            stopped = Some((total_steps, why.clone()));
        }
    })
    .unwrap();
    assert_eq!(s.steps, 6);
    let ((before, after), why) = stopped.unwrap();
    assert_eq!((before, after), (40, 6));
    assert!(matches!(why, Replan::EarlyStopping { evaluations: 2, .. }));
    let out = dir.join("out");
    assert!(out.join("best/model.safetensors").is_file());
    assert!(out.join("final/model.safetensors").is_file());
    let state = TrainerState::read(&out.join("checkpoint-000006")).unwrap();
    assert_eq!((state.step, state.evals_without_improvement), (6, 2));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_weighted_mixture_is_reported_and_resumes_exactly() {
    let dir = scratch("mixture");
    let base = config(&dir, &[]);
    let all = match &base.data.train[0] {
        sft::config::DataSource::Path(p) => p.clone(),
        other => panic!("{other:?}"),
    };
    // Two sources: the first 40 poems and the next 20, mixed 0.25 / 0.75, plus 5 drawn from a
    // third each epoch.
    let text = std::fs::read_to_string(&all).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (a, b, c) = (
        dir.join("a.jsonl"),
        dir.join("b.jsonl"),
        dir.join("c.jsonl"),
    );
    std::fs::write(&a, lines[..40].join("\n")).unwrap();
    std::fs::write(&b, lines[40..].join("\n")).unwrap();
    std::fs::write(&c, lines[..3].join("\n")).unwrap();
    let sources = format!(
        r#"data.train=[{{path = "{}", weight = 0.25}}, {{path = "{}", weight = 0.75}}, {{path = "{}", samples = 5}}]"#,
        a.display(),
        b.display(),
        c.display()
    );
    let cfg = config(
        &dir,
        &[
            &sources,
            "data.val_ratio=0.0",
            "train.epochs=3",
            "run.save_every=4",
            "run.keep_last=20",
        ],
    );
    let mut reported = vec![];
    let full = train(&cfg, &RunOptions::default(), &mut |e| {
        if let Event::Mixture { sources } = e {
            reported = sources.to_vec();
        }
    })
    .unwrap();
    let counts: Vec<(usize, usize, usize)> = reported
        .iter()
        .map(|s| (s.records, s.kept, s.drawn))
        .collect();
    // One poem of `b` is longer than max_len: 59 weighted samples split 15 / 44; the third
    // source gives 5 of its 3 (one pass and 2 more).
    assert_eq!(counts, vec![(40, 40, 15), (20, 19, 44), (3, 3, 5)]);
    let share: f64 = reported.iter().map(|s| s.target_share).sum();
    assert!((share - 1.0).abs() < 1e-9);
    assert!(dir.join("out/mixture.json").is_file());
    // 64 samples an epoch in batches of 4: 16 steps, three epochs.
    assert_eq!(full.steps, 48);

    // Resumed from the middle of epoch 1, the run ends with the same weights.
    let resumed_dir = dir.join("resumed");
    let mut again = cfg.clone();
    again.run.out_dir = resumed_dir.clone();
    let resume = RunOptions {
        resume: Some(dir.join("out/checkpoint-000024")),
        ..Default::default()
    };
    train(&again, &resume, &mut |_| {}).unwrap();
    assert_eq!(
        std::fs::read(dir.join("out/final/model.safetensors")).unwrap(),
        std::fs::read(resumed_dir.join("final/model.safetensors")).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rendered_data_is_cached_until_an_input_changes() {
    let dir = scratch("cache");
    let mut cfg = config(&dir, &["train.max_steps=4", "run.save_every=2"]);
    let hits = |cfg: &TrainConfig, opts: &RunOptions| {
        let mut hit = None;
        let s = train(cfg, opts, &mut |e| {
            if let Event::DataCache { hit: h, .. } = e {
                hit = Some(h);
            }
        })
        .unwrap();
        (hit.expect("the cache reports"), s)
    };
    let (hit, first) = hits(&cfg, &RunOptions::default());
    assert!(!hit);
    let weights = std::fs::read(first.final_model.join("model.safetensors")).unwrap();
    let preflight = std::fs::read(dir.join("out/preflight.json")).unwrap();
    // A re-run (over the first) and a resumed run read it back, and train the same.
    cfg.run.overwrite = true;
    let (hit, again) = hits(&cfg, &RunOptions::default());
    assert!(hit);
    assert_eq!(
        std::fs::read(again.final_model.join("model.safetensors")).unwrap(),
        weights
    );
    assert_eq!(
        std::fs::read(dir.join("out/preflight.json")).unwrap(),
        preflight
    );
    let resume = RunOptions {
        resume: Some(dir.join("out/checkpoint-000002")),
        ..Default::default()
    };
    let (hit, _) = hits(&cfg, &resume);
    assert!(hit);
    assert_eq!(
        std::fs::read(dir.join("out/final/model.safetensors")).unwrap(),
        weights
    );
    // Any input that changes what rendering makes is a miss: the data, the rendering options.
    let (hit, _) = hits(&cfg, &RunOptions::default());
    assert!(hit);
    let data = dir.join("poems.jsonl");
    let text = std::fs::read_to_string(&data).unwrap();
    std::fs::write(&data, text.replacen("李", "杜", 1)).unwrap();
    let (hit, _) = hits(&cfg, &RunOptions::default());
    assert!(!hit);
    cfg.data.max_len = Some(80);
    let (hit, _) = hits(&cfg, &RunOptions::default());
    assert!(!hit);
    let cached: Vec<_> = std::fs::read_dir(dir.join("out/cache")).unwrap().collect();
    assert_eq!(
        cached.len(),
        4,
        "train and validation of the current key only"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_streamed_run_resumes_bit_identically_across_epochs() {
    let dir = scratch("stream");
    for packing in [false, true] {
        let sets = [
            "data.streaming=true",
            "data.shuffle_buffer=8",
            "data.val_ratio=0.0",
            "train.max_steps=40",
            "run.save_every=5",
            "run.keep_last=20",
        ];
        let mut sets: Vec<&str> = sets.to_vec();
        if packing {
            sets.push("data.packing=true");
        }
        let mut cfg = config(&dir, &sets);
        cfg.run.out_dir = dir.join(format!("full-{packing}"));
        // 60 poems in batches of 4: about 15 steps an epoch, so 40 steps cross two epochs.
        let full = train(&cfg, &RunOptions::default(), &mut |_| {}).unwrap();
        assert_eq!(full.steps, 40);
        let state = TrainerState::read(&full.last_checkpoint).unwrap();
        assert!(state.epoch >= 2, "epoch {}", state.epoch);
        // The summary counts what the stream read past its preflight's first buffer.
        let counts = full.streamed.expect("a streamed run's counts");
        assert!(counts.records > 2 * 60, "{counts:?}");
        let mut again = cfg.clone();
        again.run.out_dir = dir.join(format!("resumed-{packing}"));
        let resume = RunOptions {
            resume: Some(cfg.run.out_dir.join("checkpoint-000025")),
            ..Default::default()
        };
        train(&again, &resume, &mut |_| {}).unwrap();
        assert_eq!(
            std::fs::read(full.final_model.join("model.safetensors")).unwrap(),
            std::fs::read(again.run.out_dir.join("final/model.safetensors")).unwrap(),
            "packing {packing}"
        );
    }
    // What a stream cannot do is refused by name.
    let err = TrainConfig::from_toml_str(
        &config(&dir, &["train.max_steps=4"]).to_toml_string(),
        &["data.streaming=true".into()],
    )
    .unwrap_err();
    assert!(err.contains("val_ratio"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_resumed_run_continues_its_time_budget() {
    let dir = scratch("budget-resume");
    let cfg = config(&dir, &["train.max_time=\"2s\"", "run.save_every=1000000"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let opts = RunOptions {
        resume: None,
        stop: Some(stop.clone()),
    };
    let t0 = std::time::Instant::now();
    let first = train(&cfg, &opts, &mut |e| {
        if let Event::Step(_) = e {
            if t0.elapsed().as_secs_f64() > 1.3 {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    })
    .unwrap();
    assert!(first.interrupted);
    let used = TrainerState::read(&first.last_checkpoint).unwrap().train_s;
    assert!((0.5..2.0).contains(&used), "{used}");
    let resume = RunOptions {
        resume: Some(dir.join("out")),
        ..Default::default()
    };
    let second = train(&cfg, &resume, &mut |_| {}).unwrap();
    let state = TrainerState::read(&second.last_checkpoint).unwrap();
    // The budget counts both runs' loops: the second ran for what was left (a fresh budget
    // would have taken the total past `used` + 2 s).
    assert!(
        (2.0..used + 1.9).contains(&state.train_s),
        "{} s in all with {used} s used before the resume",
        state.train_s
    );
    assert_eq!(state.total_steps, state.step);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn records_are_selected_by_field_after_their_values_are_mapped() {
    let dir = scratch("filter");
    let base = config(&dir, &[]);
    let data = match &base.data.train[0] {
        sft::config::DataSource::Path(p) => p.clone(),
        other => panic!("{other:?}"),
    };
    // The poems' own authors and styles, to pick from.
    let records = sft_data::read_jsonl(&data, None, sft_data::InvalidPolicy::Error).unwrap();
    let poem = |i: usize| match &records.records[i].sample {
        sft_data::Sample::Poem(p) => p.clone(),
        other => panic!("{other:?}"),
    };
    let (first, second) = (poem(0), poem(1));
    let map = dir.join("authors.json");
    std::fs::write(
        &map,
        serde_json::json!({ first.author.clone(): "甲" }).to_string(),
    )
    .unwrap();
    let wanted = |p: &sft_data::Poem| p.author == first.author || p.style == second.style;
    let expected = (0..records.records.len())
        .filter(|&i| wanted(&poem(i)))
        .count();
    let filter = format!(
        r#"data.filter={{author = ["甲"], style = ["{}"]}}"#,
        second.style
    );
    let cfg = config(
        &dir,
        &[
            &filter,
            "data.filter_any=true",
            &format!(r#"data.field_map={{author = "{}"}}"#, map.display()),
            "data.val_ratio=0.0",
            "data.metadata_keep_prob=1.0",
            "train.max_steps=2",
        ],
    );
    let mut report = None;
    train(&cfg, &RunOptions::default(), &mut |e| {
        if let Event::Preflight {
            split: "train",
            report: r,
        } = e
        {
            report = Some(r.clone());
        }
    })
    .unwrap();
    let report = report.unwrap();
    assert_eq!(report.records_read, expected);
    assert_eq!(report.filtered_out, records.records.len() - expected);
    // The mapped name is what the model reads (the first poem is kept, by its author).
    let example: String = report.example.iter().map(|t| t.token.as_str()).collect();
    assert!(example.contains('甲'), "{example}");
    assert!(!example.contains(&first.author), "{example}");
    let err = TrainConfig::from_toml_str(
        &cfg.to_toml_string(),
        &["data.filter={colour = [\"red\"]}".into()],
    )
    .unwrap_err();
    assert!(err.contains("unknown field `colour`"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One file listed twice: as it is, and filtered to one style with `repeat = 2` (a rare kind
/// weighted up, as configs/nanopoet-full-sft.toml weights the ci). The filtered source's samples
/// are drawn exactly twice an epoch, and `val_ratio` holds a line out whole: no copy of a
/// validation poem is trained on.
#[test]
fn a_source_filter_and_repeat_weight_records_up_and_hold_lines_out_whole() {
    let dir = scratch("repeat");
    let base = config(&dir, &[]);
    let all = match &base.data.train[0] {
        sft::config::DataSource::Path(p) => p.clone(),
        other => panic!("{other:?}"),
    };
    let sources = format!(
        r#"data.train=["{0}", {{path = "{0}", filter = {{style = ["五言绝句"]}}, repeat = 2}}]"#,
        all.display()
    );
    // Seed 2 holds out a copy of a 五言绝句 from the second source whose twin is in the first.
    let cfg = config(
        &dir,
        &[
            &sources,
            "data.val_ratio=0.3",
            "train.max_steps=2",
            "run.seed=2",
        ],
    );
    let (mut reported, mut val_records) = (vec![], None);
    train(&cfg, &RunOptions::default(), &mut |e| match e {
        Event::Mixture { sources } => reported = sources.to_vec(),
        Event::Preflight {
            split: "validation",
            report,
        } => val_records = Some(report.records_read),
        _ => {}
    })
    .unwrap();
    let (whole, jueju) = (&reported[0], &reported[1]);
    // The file has 60 poems, 9 of them 五言绝句; every line is trained (in the first source)
    // or held out, never both.
    assert_eq!(whole.records + val_records.unwrap(), 60);
    assert!(
        jueju.records < 9,
        "some jueju are held out: {}",
        jueju.records
    );
    assert!(jueju.kept > 0);
    assert_eq!(jueju.drawn, 2 * jueju.kept);
    assert_eq!(whole.drawn, whole.kept);

    // A filter on a field poems do not have is refused when the config is read.
    let bad = format!(
        r#"data.train=[{{path = "{}", filter = {{colour = ["red"]}}}}]"#,
        all.display()
    );
    let toml = std::fs::read_to_string(dir.join("out/train_config.toml")).unwrap();
    let err = TrainConfig::from_toml_str(&toml, &[bad]).unwrap_err();
    assert!(err.to_string().contains("colour"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
