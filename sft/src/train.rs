//! The training run: `train(config) -> Summary`, readable top to bottom.
//!
//! 1. tokenizer (loaded, or built from the training text), 2. records and template,
//! 3. model (checkpoint, preset or init; or the checkpoint being resumed), 4. preflight report,
//! 5. the step loop: micro-batches -> accumulated gradients -> clip + AdamW -> log, evaluate,
//!    save.
//!
//! Every random draw derives from `run.seed` and the position in the run, which is what makes
//! resuming bit-identical without replaying data.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use sft_data::{
    collate, mixture_epoch, plan_epoch, prepare, read_records, split_train_val, BatchPlanOptions,
    InvalidPolicy, Prepared, ReadOutcome, Record, RecordStream, RenderOptions, Rendered, Report,
    Sample, Selection, Share, Template,
};
use sft_model::Model;
use sft_tokenizer::Tokenizer;

use crate::checkpoint::{self, Cleaned, ResumeFrom, TrainerState};
use crate::config::{parse_dtype, ConfigChange, DataSource, TrainConfig, RESUME_MUTABLE};
use crate::error::{Error, Result};
use crate::eval;
use crate::metrics::{EvalMetrics, MetricsLog, StepMetrics};
use crate::optim::AdamW;
use crate::plot;
use crate::prepcache::PrepCache;
use crate::seeds::dropout_seed;
use crate::setup;
use crate::step::{accumulate_micro_batch, GradAccumulator, LossStats};
use crate::stream::StreamFeed;

/// What the caller is told while the run goes (the CLI draws progress from these).
pub enum Event<'a> {
    /// Hidden directories of a crashed run were cleaned up (before anything else).
    Cleaned(&'a Cleaned),
    /// A fresh run with `run.overwrite` removed a previous run's files from its `out_dir`.
    Overwrote {
        removed: &'a [PathBuf],
    },
    /// `--resume` resolved to a checkpoint; what the new config changes.
    Resumed {
        from: &'a ResumeFrom,
        changes: &'a [ConfigChange],
        /// The schedule's total steps in the checkpoint and now (they differ when
        /// `train.max_steps` or `train.epochs` changed).
        total_steps: (u64, u64),
        /// Lines of `metrics.jsonl`/`samples.jsonl` after the checkpoint's step, dropped.
        dropped_log_lines: usize,
    },
    /// The data as it will be trained on, before any step.
    Preflight {
        split: &'static str,
        report: &'a Report,
    },
    Started {
        total_steps: u64,
        start_step: u64,
        /// Trainable scalars.
        n_params: usize,
        /// Frozen scalars (LoRA's base; 0 in full fine-tuning).
        n_frozen: usize,
        out_dir: &'a Path,
        /// Where the run computes: `cpu`, `cuda:0`.
        device: String,
    },
    /// Rendered data came from (`hit`) or went to the disk cache in `dir`.
    DataCache {
        dir: &'a Path,
        hit: bool,
    },
    /// The training sources of a mixture, as epoch 0 draws them (after `Preflight`).
    Mixture {
        sources: &'a [SourceReport],
    },
    Step(&'a StepMetrics),
    /// The schedule's total changed mid-run: the time budget's estimate, or early stopping.
    Replanned {
        total_steps: (u64, u64),
        why: &'a Replan,
    },
    Eval(&'a EvalMetrics),
    Sample {
        step: u64,
        prompt: &'a str,
        text: &'a str,
    },
    Checkpoint {
        step: u64,
        path: &'a Path,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub out_dir: PathBuf,
    pub steps: u64,
    pub final_train_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub final_val_accuracy: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub best_step: Option<u64>,
    /// The last checkpoint (resumable, training dtype).
    pub last_checkpoint: PathBuf,
    /// The exported model (`save_dtype`).
    pub final_model: PathBuf,
    pub metrics: PathBuf,
    pub plot: PathBuf,
    pub elapsed_s: f64,
    /// The run was stopped through [`RunOptions::stop`] before its last step: `last_checkpoint`
    /// holds where it stood, and `final_model` was not written.
    pub interrupted: bool,
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// A checkpoint directory to continue from, or a run directory (`run.out_dir`), whose newest
    /// complete checkpoint is taken.
    pub resume: Option<PathBuf>,
    /// Set (by a signal handler, say) to end the run after the current optimizer step, with a
    /// checkpoint of that step.
    pub stop: Option<Arc<AtomicBool>>,
}

const RNG_NOTE: &str =
    "derived: shuffling, packing and metadata dropout from (seed, epoch); dropout from (seed, step, micro-batch); no RNG state is carried";

pub fn train(
    cfg: &TrainConfig,
    opts: &RunOptions,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Summary> {
    let t0 = Instant::now();
    let out_dir = cfg.run.out_dir.clone();
    std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    let cleaned = checkpoint::clean_leftovers(&out_dir)?;
    if cleaned != Cleaned::default() {
        on_event(Event::Cleaned(&cleaned));
    }
    let resume = opts
        .resume
        .as_deref()
        .map(checkpoint::resolve_resume)
        .transpose()?;
    let resume_dir = resume.as_ref().map(|r| r.checkpoint.as_path());
    // A previous run in out_dir is refused now, and (with overwrite) removed only once this
    // run has set up without error, just before it writes its first file.
    let (changes, previous_run) = match resume_dir {
        Some(dir) => (resume_changes(cfg, dir)?, vec![]),
        None => (vec![], previous_run_files(&out_dir, cfg.run.overwrite)?),
    };
    let device = setup::device()?;
    let dtype = parse_dtype(&cfg.model.dtype).map_err(Error::Config)?;

    // 1-2. Records and tokenizer. A resumed run takes the tokenizer saved in its checkpoint.
    // Streaming reads only a first look (the preflight's records) here; the rest as it trains.
    let selection = setup::selection(cfg)?;
    let (train_read, train_files, source_of) = match cfg.data.streaming {
        true => {
            let (read, files) = stream_preview(cfg, &selection)?;
            (read, files, vec![])
        }
        false => read_all("data.train", &cfg.data.train, cfg)?,
    };
    let tok = match resume_dir {
        Some(dir) => Tokenizer::from_path(dir)?,
        None if cfg.data.streaming && cfg.tokenizer.build.is_some() => {
            setup::tokenizer(cfg, &char_covering_records(cfg, &train_files, &selection)?)?
        }
        None => setup::tokenizer(cfg, &train_read.records)?,
    };
    let template = setup::template(cfg, &tok)?;
    let (train_records, source_of, val_records) = split_records(cfg, train_read, source_of)?;
    let mixture = Mixture::new(cfg, source_of);

    // 3. Model.
    let model = match resume_dir {
        Some(dir) => setup::resumed_model(cfg, &tok, dir, dtype, &device)?,
        None => setup::model(cfg, &tok, dtype, &device)?,
    };
    setup::check_vocab(&model, &tok)?;
    let max_len = cfg.data.max_len.unwrap_or(model.config().max_positions());
    if max_len > model.config().max_positions() {
        // Found mid-run otherwise, at the first sample longer than the model's context.
        return Err(Error::Config(format!(
            "data.max_len = {max_len} is longer than the model's context of {} positions",
            model.config().max_positions()
        )));
    }
    let render_opts = RenderOptions {
        train_on: cfg.data.train_on,
        max_len: Some(max_len),
        length_policy: cfg.data.length_policy,
        metadata_keep_prob: cfg.data.metadata_keep_prob,
        seed: cfg.run.seed,
        check_invariants: true,
    };
    let stochastic = train_records
        .records
        .iter()
        .any(|r| matches!(r.sample, Sample::Poem(_)))
        && cfg.data.metadata_keep_prob < 1.0
        && cfg.data.metadata_keep_prob > 0.0;

    // 4. Preflight: the data exactly as epoch 0 will see it.
    let prep_cache = match cfg.data.cache && !cfg.data.streaming {
        true => {
            let dir = cfg
                .data
                .cache_dir
                .clone()
                .unwrap_or_else(|| out_dir.join("cache"));
            let val_files: Vec<Vec<PathBuf>> = cfg
                .data
                .validation
                .iter()
                .map(setup::data_files)
                .collect::<Result<_>>()?;
            let key = prep_cache_key(cfg, &tok, max_len, &train_files, &val_files)?;
            Some(PrepCache::open(&dir, key)?)
        }
        false => None,
    };
    let mut epoch_cache = EpochCache::new(
        &train_records,
        &template,
        &tok,
        &render_opts,
        prep_cache.as_ref(),
    );
    let first = epoch_cache.get(0, stochastic, mixture.as_ref(), cfg.run.seed)?;
    on_event(Event::Preflight {
        split: "train",
        report: &first.data.report,
    });
    if !previous_run.is_empty() {
        remove_run_files(&previous_run)?;
        on_event(Event::Overwrote {
            removed: &previous_run,
        });
    }
    write_json(&out_dir.join("preflight.json"), &first.data.report)?;
    if let (Some(m), Some(view)) = (&mixture, first.order) {
        let sources = m.report(&train_records, first.data, view);
        on_event(Event::Mixture { sources: &sources });
        write_json(&out_dir.join("mixture.json"), &sources)?;
    }
    let first = first.data;
    if first.samples.is_empty() {
        return Err(Error::Config(
            "no training sample survived rendering; see the preflight report".into(),
        ));
    }
    let data_fingerprint =
        checkpoint::fingerprint(first.samples.iter().map(|(_, r)| ids_bytes(r.ids())));
    if let Some(c) = &prep_cache {
        on_event(Event::DataCache {
            dir: c.dir(),
            hit: epoch_cache.hits > 0,
        });
    }
    let val = match &val_records {
        Some(records) => {
            let p = prepare_cached(
                prep_cache.as_ref(),
                "validation",
                records,
                &template,
                &tok,
                &render_opts,
                0,
            )?;
            on_event(Event::Preflight {
                split: "validation",
                report: &p.report,
            });
            Some(p)
        }
        None => None,
    };

    let plan_opts = BatchPlanOptions {
        batch_size: cfg.train.batch_size,
        packing: cfg.data.packing,
        pack_len: max_len,
        group_by_length: cfg.data.group_by_length,
        shuffle: cfg.data.shuffle,
        seed: cfg.run.seed,
        drop_last: false,
    };
    let accum = cfg.train.grad_accum;
    let mut stream = cfg.data.streaming.then(|| {
        StreamFeed::new(
            train_files.iter().flatten().cloned().collect(),
            cfg.data.format,
            invalid_policy(cfg),
            &template,
            &tok,
            &render_opts,
            cfg.train.batch_size,
            cfg.data.packing.then_some(max_len),
            cfg.data.shuffle_buffer,
            cfg.run.seed,
            &selection,
        )
    });
    let steps_in_epoch = |plan_len: usize| plan_len.div_ceil(accum) as u64;

    // The schedule's length: planned at the start and kept in the state, so a resumed run follows
    // the same curve; a resumed run with a new `max_steps` or `epochs` plans it anew, as the HF
    // Trainer does.
    let planned_total = |epoch_cache: &mut EpochCache| -> Result<u64> {
        if let Some(n) = cfg.train.max_steps {
            return Ok(n);
        }
        if cfg.data.streaming {
            // Only under a time budget (validated), which estimates the total after a few steps.
            return Ok(u64::MAX);
        }
        let mut total = 0;
        for e in 0..cfg.train.epochs {
            let lengths = epoch_cache
                .get(
                    e,
                    stochastic && cfg.data.packing,
                    mixture.as_ref(),
                    cfg.run.seed,
                )?
                .lengths();
            total += steps_in_epoch(plan_epoch(&lengths, &plan_opts, e)?.len());
        }
        Ok(total)
    };
    let mut state = match &resume {
        Some(from) => {
            let dir = &from.checkpoint;
            let mut s = TrainerState::read(dir)?;
            if s.data_fingerprint != data_fingerprint {
                return Err(Error::Checkpoint(format!(
                    "{}: the training data differs from the data this run started with (fingerprint {} vs {}); start a new run instead of resuming",
                    dir.display(),
                    s.data_fingerprint,
                    data_fingerprint
                )));
            }
            let before = s.total_steps;
            let total = match cfg.train.max_time_s() {
                // The budget's estimate stands (the loop re-estimates it); `max_steps` caps it.
                Some(_) => s.total_steps.min(cfg.train.max_steps.unwrap_or(u64::MAX)),
                None => planned_total(&mut epoch_cache)?,
            };
            if total < s.step {
                return Err(Error::Config(format!(
                    "{}: the checkpoint is at step {}, past the new schedule's total of {total} steps (train.max_steps / train.epochs)",
                    dir.display(),
                    s.step
                )));
            }
            s.total_steps = total;
            let mut dropped_log_lines = 0;
            for log in ["metrics.jsonl", "samples.jsonl"] {
                dropped_log_lines += crate::metrics::drop_after(&out_dir.join(log), s.step)?;
            }
            on_event(Event::Resumed {
                from,
                changes: &changes,
                total_steps: (before, total),
                dropped_log_lines,
            });
            s
        }
        None => {
            let total_steps = planned_total(&mut epoch_cache)?;
            TrainerState {
                step: 0,
                total_steps,
                epoch: 0,
                micro_batch: 0,
                samples_seen: 0,
                tokens_seen: 0,
                target_tokens_seen: 0,
                seed: cfg.run.seed,
                rng: RNG_NOTE.into(),
                data_fingerprint,
                best_val_loss: None,
                best_step: None,
                last_metrics: None,
                elapsed_s: 0.0,
                sft_version: env!("CARGO_PKG_VERSION").into(),
                save_dtype: None,
                train_s: 0.0,
                evals_without_improvement: 0,
            }
        }
    };
    // Resolved once: the base directory may be gone by the time the run exports.
    let save_dtype = match (&cfg.model.save_dtype, &state.save_dtype) {
        (None, Some(saved)) => parse_dtype(saved).map_err(Error::Config)?,
        _ => setup::save_dtype(cfg, &model)?,
    };
    state.save_dtype = Some(crate::config::dtype_name(save_dtype));

    let mut opt = AdamW::new(model.params(), &cfg.optim)?;
    if let Some(dir) = resume_dir {
        opt.load(&dir.join(checkpoint::OPTIMIZER_FILE))?;
        if opt.steps_taken() != state.step {
            return Err(Error::Checkpoint(format!(
                "{}: optimizer state is at step {} but trainer state at step {}",
                dir.display(),
                opt.steps_taken(),
                state.step
            )));
        }
    }
    std::fs::write(out_dir.join(checkpoint::CONFIG_FILE), cfg.to_toml_string())
        .map_err(|e| Error::io(&out_dir, e))?;
    let count = |ps: &[(String, candle_core::Var)]| -> usize {
        ps.iter().map(|(_, v)| v.as_tensor().elem_count()).sum()
    };
    on_event(Event::Started {
        total_steps: state.total_steps,
        start_step: state.step,
        n_params: count(model.params()),
        n_frozen: count(model.frozen()),
        out_dir: &out_dir,
        device: setup::device_name(&device),
    });

    // 5. The loop.
    let mut metrics = MetricsLog::open(&out_dir.join("metrics.jsonl"))?;
    let elapsed_before = state.elapsed_s;
    let mut last_log = (Instant::now(), 0usize);
    let mut last_train_loss = None;
    let mut last_eval: Option<EvalMetrics> = None;
    let mut last_saved: Option<(u64, PathBuf)> = None;
    let mut interrupted = false;
    let mut grads = GradAccumulator::new(model.params().len());
    let mut plan_cache: Option<(u64, Vec<Vec<Vec<usize>>>)> = None;
    // The loop's clock (`train.max_time` counts it, over resumptions too).
    let (loop_start, loop_before_s, loop_start_step) = (Instant::now(), state.train_s, state.step);
    let budget = cfg.train.max_time_s().map(|budget_s| Budget {
        budget_s,
        cap: cfg.train.max_steps.unwrap_or(u64::MAX),
    });
    if let Some(feed) = stream.as_mut() {
        // A resumed run replays its epoch up to where the checkpoint stood.
        feed.seek(state.epoch, state.micro_batch)?;
    }
    while state.step < state.total_steps {
        let pad_id = setup::pad_id(&tok);
        // The step's micro-batches, its sample count, where the epoch stands after it, and the
        // epoch's length in micro-batches (unknown when streaming).
        let (batches, step_samples, end, epoch_len) = match stream.as_mut() {
            Some(feed) => {
                let mut batches = Vec::with_capacity(accum);
                let mut samples = 0;
                while batches.len() < accum {
                    let Some((rows, n)) = feed.next_micro_batch()? else {
                        break;
                    };
                    let rows: Vec<Vec<&Rendered>> =
                        rows.iter().map(|r| r.iter().collect()).collect();
                    batches.push(collate(&rows, pad_id, None));
                    samples += n;
                }
                if batches.is_empty() {
                    if feed.position == 0 {
                        return Err(Error::Config(
                            "data.streaming: no training sample survived rendering".into(),
                        ));
                    }
                    feed.next_epoch();
                    state.epoch += 1;
                    state.micro_batch = 0;
                    continue;
                }
                (batches, samples, feed.position, None)
            }
            None => {
                let epoch_data =
                    epoch_cache.get(state.epoch, stochastic, mixture.as_ref(), cfg.run.seed)?;
                // Planned once an epoch (packing 240k samples takes about 60 ms).
                if plan_cache.as_ref().is_none_or(|(e, _)| *e != state.epoch) {
                    let plan = plan_epoch(&epoch_data.lengths(), &plan_opts, state.epoch)?;
                    plan_cache = Some((state.epoch, plan));
                }
                let plan = &plan_cache.as_ref().expect("planned above").1;
                if state.micro_batch >= plan.len() {
                    state.epoch += 1;
                    state.micro_batch = 0;
                    continue;
                }
                let end = (state.micro_batch + accum).min(plan.len());
                let batches: Vec<_> = plan[state.micro_batch..end]
                    .iter()
                    .map(|rows| {
                        let rows: Vec<Vec<&Rendered>> = rows
                            .iter()
                            .map(|row| row.iter().map(|&i| epoch_data.sample(i)).collect())
                            .collect();
                        collate(&rows, pad_id, None)
                    })
                    .collect();
                let samples: usize = plan[state.micro_batch..end]
                    .iter()
                    .flatten()
                    .map(|row| row.len())
                    .sum();
                (batches, samples, end, Some(plan.len()))
            }
        };
        let step_targets: usize = batches.iter().map(|b| b.n_targets).sum();
        let step_tokens: usize = batches.iter().map(|b| b.n_tokens).sum();
        let step_positions: usize = batches.iter().map(|b| b.batch_size * b.seq_len).sum();
        let mut stats = LossStats::default();
        if step_targets > 0 {
            let scale = 1.0 / step_targets as f64;
            for (k, batch) in batches.iter().enumerate() {
                let seed = dropout_seed(cfg.run.seed, state.step, k as u64);
                stats.add(accumulate_micro_batch(
                    &model,
                    batch,
                    scale,
                    Some(seed),
                    &mut grads,
                )?);
            }
            let loss = stats.mean();
            if !loss.is_finite() {
                return Err(Error::NonFinite {
                    what: format!("loss at step {}", state.step + 1),
                    value: loss,
                });
            }
            let lr = cfg.schedule.lr(cfg.optim.lr, state.step, state.total_steps);
            let step_stats = opt.step(&grads.take(), lr)?;
            last_train_loss = Some(loss);
            state.step += 1;
            state.micro_batch = end;
            state.samples_seen += step_samples as u64;
            state.tokens_seen += step_tokens as u64;
            state.target_tokens_seen += step_targets as u64;
            last_log.1 += step_tokens;
            let segment_s = loop_start.elapsed().as_secs_f64();
            state.train_s = loop_before_s + segment_s;
            if let Some(b) = &budget {
                let eval_due = cfg.run.eval_every.is_some_and(|n| state.step % n == 0);
                let per_step_s = segment_s / (state.step - loop_start_step) as f64;
                let at = (state.step - loop_start_step, state.step, state.total_steps);
                if let Some((total, replan)) = b.replan(at, state.train_s, per_step_s, eval_due) {
                    on_event(Event::Replanned {
                        total_steps: (state.total_steps, total),
                        why: &replan,
                    });
                    state.total_steps = total;
                }
            }
            let m = StepMetrics {
                step: state.step,
                epoch: state.epoch as f64 + epoch_len.map_or(0.0, |n| end as f64 / n as f64),
                loss,
                lr,
                grad_norm: step_stats.grad_norm,
                tokens_per_s: last_log.1 as f64 / last_log.0.elapsed().as_secs_f64().max(1e-9),
                target_tokens: step_targets,
                tokens: step_tokens,
                positions: step_positions,
                elapsed_s: elapsed_before + t0.elapsed().as_secs_f64(),
            };
            on_event(Event::Step(&m));
            if state.step % cfg.run.log_every == 0 || state.step == state.total_steps {
                metrics.write("train", &m)?;
                state.last_metrics = Some(serde_json::to_value(&m).expect("serialisable"));
                last_log = (Instant::now(), 0);
            }
        } else {
            // Every sample keeps at least one target, so this needs a step made only of
            // one-token samples; nothing is learned from it and nothing is updated.
            state.micro_batch = end;
        }
        if epoch_len.is_some_and(|n| state.micro_batch >= n) {
            state.epoch += 1;
            state.micro_batch = 0;
        }
        let at_end = state.step >= state.total_steps;
        let eval_due = cfg
            .run
            .eval_every
            .is_some_and(|n| state.step % n == 0 && step_targets > 0);
        if let Some(val) = &val {
            if eval_due || at_end {
                let e = eval::evaluate(
                    &model,
                    val,
                    cfg.eval.batch_size.unwrap_or(cfg.train.batch_size),
                    setup::pad_id(&tok),
                    (state.step, state.epoch),
                    &|| elapsed_before + t0.elapsed().as_secs_f64(),
                )?;
                metrics.write("eval", &e)?;
                on_event(Event::Eval(&e));
                if let Some(es) = &cfg.train.early_stopping {
                    let improved = state
                        .best_val_loss
                        .is_none_or(|b| e.val_loss < b - es.min_delta);
                    state.evals_without_improvement = if improved {
                        0
                    } else {
                        state.evals_without_improvement + 1
                    };
                    if state.evals_without_improvement >= es.patience
                        && state.step < state.total_steps
                    {
                        on_event(Event::Replanned {
                            total_steps: (state.total_steps, state.step),
                            why: &Replan::EarlyStopping {
                                evaluations: state.evals_without_improvement,
                                best_val_loss: state.best_val_loss.unwrap_or(f64::NAN),
                                best_step: state.best_step.unwrap_or(0),
                            },
                        });
                        state.total_steps = state.step;
                    }
                }
                if state.best_val_loss.is_none_or(|b| e.val_loss < b) {
                    state.best_val_loss = Some(e.val_loss);
                    state.best_step = Some(state.step);
                    let best = out_dir.join("best");
                    checkpoint::write_atomically(&best, |d| {
                        export(&model, save_dtype, &tok, cfg, &state, d)
                    })?;
                    on_event(Event::Checkpoint {
                        step: state.step,
                        path: &best,
                    });
                }
                last_eval = Some(e);
            }
        }
        if (eval_due || at_end) && !cfg.eval.samples.is_empty() {
            for (prompt, text) in
                eval::sample_generations(&model, &tok, &template, &cfg.eval, cfg.run.seed)?
            {
                on_event(Event::Sample {
                    step: state.step,
                    prompt: &prompt,
                    text: &text,
                });
                append_sample(&out_dir, state.step, &prompt, &text)?;
            }
        }
        // Early stopping may have ended the run at this step.
        let at_end = state.step >= state.total_steps;
        let save_due = cfg
            .run
            .save_every
            .is_some_and(|n| state.step % n == 0 && step_targets > 0);
        let stop = !at_end && opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        let saved_now = last_saved.as_ref().is_some_and(|(s, _)| *s == state.step);
        if save_due || at_end || (stop && !saved_now) {
            state.elapsed_s = elapsed_before + t0.elapsed().as_secs_f64();
            let path = save_checkpoint(&out_dir, &model, &tok, &opt, &state, cfg)?;
            on_event(Event::Checkpoint {
                step: state.step,
                path: &path,
            });
            last_saved = Some((state.step, path));
        }
        if stop {
            interrupted = true;
            break;
        }
    }

    // The deliverable: the final weights in the export dtype (not for an interrupted run), a
    // loss plot.
    let final_model = out_dir.join("final");
    state.elapsed_s = elapsed_before + t0.elapsed().as_secs_f64();
    if !interrupted {
        checkpoint::write_atomically(&final_model, |d| {
            export(&model, save_dtype, &tok, cfg, &state, d)
        })?;
    }
    let metrics_path = out_dir.join("metrics.jsonl");
    let (train_series, val_series) = crate::metrics::read_loss_series(&metrics_path)?;
    let plot_path = out_dir.join("loss.svg");
    let title = format!("{} ({} steps)", out_dir.display(), state.step);
    std::fs::write(
        &plot_path,
        plot::loss_svg(&title, &train_series, &val_series),
    )
    .map_err(|e| Error::io(&plot_path, e))?;
    let last_checkpoint = match (last_saved, &resume) {
        (Some((_, p)), _) => p,
        (None, Some(from)) => from.checkpoint.clone(),
        (None, None) => final_model.clone(),
    };
    Ok(Summary {
        out_dir,
        steps: state.step,
        final_train_loss: last_train_loss,
        final_val_loss: last_eval.as_ref().map(|e| e.val_loss),
        final_val_accuracy: last_eval.as_ref().map(|e| e.val_token_accuracy),
        best_val_loss: state.best_val_loss,
        best_step: state.best_step,
        last_checkpoint,
        final_model,
        metrics: metrics_path,
        plot: plot_path,
        elapsed_s: state.elapsed_s,
        interrupted,
    })
}

/// The resumable checkpoint of the current step (training dtype, optimizer state), written
/// atomically; then the oldest beyond `run.keep_last` are rotated away.
fn save_checkpoint(
    out_dir: &Path,
    model: &Model,
    tok: &Tokenizer,
    opt: &AdamW,
    state: &TrainerState,
    cfg: &TrainConfig,
) -> Result<PathBuf> {
    let path = out_dir.join(checkpoint::checkpoint_name(state.step));
    checkpoint::write_atomically(&path, |d| {
        save_weights(model, d, model.dtype(), cfg)?;
        tok.save(d)?;
        opt.save(&d.join(checkpoint::OPTIMIZER_FILE))?;
        state.write(d)?;
        std::fs::write(d.join(checkpoint::CONFIG_FILE), cfg.to_toml_string())
            .map_err(|e| Error::io(d, e))
    })?;
    checkpoint::rotate(out_dir, cfg.run.keep_last.max(1))?;
    Ok(path)
}

/// The model's weights in `dtype`, or with LoRA its adapter (in the training dtype, as PEFT
/// keeps adapters in full precision).
fn save_weights(
    model: &Model,
    dir: &Path,
    dtype: candle_core::DType,
    cfg: &TrainConfig,
) -> Result<()> {
    match model.lora() {
        Some(_) => model.save_adapter(dir, &setup::base_name(cfg))?,
        None => model.save(dir, dtype)?,
    }
    Ok(())
}

/// What a resumed run changes in the checkpoint's config; an error lists the keys that may not
/// change (they would break bit-identical resumption).
fn resume_changes(cfg: &TrainConfig, dir: &Path) -> Result<Vec<ConfigChange>> {
    let saved = TrainConfig::load(&dir.join(checkpoint::CONFIG_FILE), &[])?;
    cfg.resume_changes(&saved).map_err(|refused| {
        Error::Config(format!(
            "{}: resuming with a different {}; only {} may change on resume (start a new run to change the rest)",
            dir.display(),
            refused
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            RESUME_MUTABLE.join(", ")
        ))
    })
}

/// Files a run writes into its `out_dir` (besides `checkpoint-*`).
const RUN_FILES: &[&str] = &[
    "metrics.jsonl",
    "samples.jsonl",
    "preflight.json",
    "loss.svg",
    checkpoint::CONFIG_FILE,
    "best",
    "final",
];

/// A fresh run's `out_dir` must not hold another run: its log would mix into this one's and its
/// checkpoints sit beside this one's. With `overwrite`, the files of that run that are to be
/// removed (only those: anything else in the directory stays); without, an error.
fn previous_run_files(out_dir: &Path, overwrite: bool) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = RUN_FILES
        .iter()
        .map(|f| out_dir.join(f))
        .filter(|p| p.exists())
        .collect();
    let checkpoints = checkpoint::list_checkpoints(out_dir)?;
    found.extend(checkpoints.iter().map(|(_, p)| p.clone()));
    let used = !checkpoints.is_empty()
        || ["metrics.jsonl", "best", "final"]
            .iter()
            .any(|f| out_dir.join(f).exists());
    if !used {
        return Ok(vec![]);
    }
    if !overwrite {
        let what = if checkpoints.is_empty() {
            "another run's files".to_string()
        } else {
            format!(
                "another run's files and {} checkpoint(s)",
                checkpoints.len()
            )
        };
        return Err(Error::Config(format!(
            "{}: holds {what}; continue it with `--resume {}`, replace it with `--overwrite` (run.overwrite = true), or choose another run.out_dir",
            out_dir.display(),
            out_dir.display()
        )));
    }
    Ok(found)
}

/// Removes a previous run's files (directories through a hidden name, as rotation does).
fn remove_run_files(found: &[PathBuf]) -> Result<()> {
    for path in found {
        if path.is_dir() {
            checkpoint::remove_dir(path)?;
        } else {
            std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
        }
    }
    Ok(())
}

/// Why the schedule's total changed mid-run.
#[derive(Debug, Clone, PartialEq)]
pub enum Replan {
    /// `train.max_time`: the steps that fit the time left at the time per step measured so far.
    Budget {
        budget_s: f64,
        used_s: f64,
        per_step_s: f64,
    },
    /// `train.early_stopping`: `evaluations` in a row without improvement.
    EarlyStopping {
        evaluations: u64,
        best_val_loss: f64,
        best_step: u64,
    },
}

/// `train.max_time` in the loop: the schedule's total that fits the budget.
struct Budget {
    budget_s: f64,
    /// `train.max_steps`, if any.
    cap: u64,
}

impl Budget {
    /// Steps this run times before its first estimate (the first step also warms the allocator).
    const FIRST_ESTIMATE: u64 = 4;

    /// After `done` steps of this run, at step `step` of `total`, with `used_s` of the budget
    /// used at `per_step_s` a step: the new total, if it changes. Past the budget the run ends
    /// now; when one more step would cross it, that step is the last; otherwise the total is
    /// re-estimated after the first steps, at each evaluation, every tenth of the run, and when
    /// the run reaches its total with time to spare.
    fn replan(
        &self,
        (done, step, total): (u64, u64, u64),
        used_s: f64,
        per_step_s: f64,
        eval_due: bool,
    ) -> Option<(u64, Replan)> {
        let why = Replan::Budget {
            budget_s: self.budget_s,
            used_s,
            per_step_s,
        };
        let new_total = if used_s >= self.budget_s {
            step
        } else if used_s + per_step_s >= self.budget_s {
            step + 1
        } else if done == Self::FIRST_ESTIMATE
            || (done > Self::FIRST_ESTIMATE
                && (eval_due || step % (total / 10).max(1) == 0 || step >= total))
        {
            step + ((self.budget_s - used_s) / per_step_s).floor() as u64
        } else {
            return None;
        };
        let new_total = new_total.min(self.cap).max(step);
        (new_total != total).then_some((new_total, why))
    }
}

/// Weights in the export dtype, tokenizer, config and state: a directory `transformers` loads.
fn export(
    model: &Model,
    save_dtype: candle_core::DType,
    tok: &Tokenizer,
    cfg: &TrainConfig,
    state: &TrainerState,
    dir: &Path,
) -> Result<()> {
    save_weights(model, dir, save_dtype, cfg)?;
    tok.save(dir)?;
    state.write(dir)?;
    std::fs::write(dir.join(checkpoint::CONFIG_FILE), cfg.to_toml_string())
        .map_err(|e| Error::io(dir, e))
}

/// Reads every source of `data.train` (or `data.validation`) in order. Returns the records and,
/// per source, the files it read (a record's file tells which source it came from).
fn read_all(
    key: &str,
    sources: &[DataSource],
    cfg: &TrainConfig,
) -> Result<(ReadOutcome, Vec<Vec<PathBuf>>, Vec<usize>)> {
    let policy = invalid_policy(cfg);
    let mut all: Option<ReadOutcome> = None;
    let mut files_per_source = Vec::with_capacity(sources.len());
    let mut source_of = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        let files =
            setup::data_files(source).map_err(|e| Error::Config(format!("{key}[{i}]: {e}")))?;
        let selection = setup::source_selection(cfg, source)?;
        for f in &files {
            let mut r = read_records(f, cfg.data.format, policy)?;
            selection.apply_all(&mut r)?;
            source_of.resize(source_of.len() + r.records.len(), i);
            match all.as_mut() {
                None => all = Some(r),
                Some(a) => a.extend(r),
            }
        }
        files_per_source.push(files);
    }
    let all = all.ok_or_else(|| {
        Error::Config("data.train: at least one training file is required".into())
    })?;
    Ok((all, files_per_source, source_of))
}

fn invalid_policy(cfg: &TrainConfig) -> InvalidPolicy {
    if cfg.data.skip_invalid {
        InvalidPolicy::Skip
    } else {
        InvalidPolicy::Error
    }
}

/// A streamed run's first look at its data: the first `data.shuffle_buffer` records (what the
/// preflight report describes), and the files of every source.
fn stream_preview(
    cfg: &TrainConfig,
    selection: &Selection,
) -> Result<(ReadOutcome, Vec<Vec<PathBuf>>)> {
    let files: Vec<Vec<PathBuf>> = cfg
        .data
        .train
        .iter()
        .map(setup::data_files)
        .collect::<Result<_>>()?;
    let mut stream = RecordStream::new(
        files.iter().flatten().cloned().collect(),
        cfg.data.format,
        invalid_policy(cfg),
    );
    let mut out = ReadOutcome::default();
    for record in stream.by_ref() {
        let mut record = record?;
        if !selection.apply(&mut record)? {
            out.filtered_out += 1;
            continue;
        }
        *out.per_format.entry(record.format).or_default() += 1;
        out.records.push(record);
        if out.records.len() == cfg.data.shuffle_buffer {
            break;
        }
    }
    out.skipped = std::mem::take(&mut stream.skipped);
    out.blank_lines = stream.blank_lines;
    Ok((out, files))
}

/// For a char tokenizer built from streamed data: one pass over every record, keeping only
/// those that bring a character not seen before (a char vocabulary is the set of characters, so
/// these give the same one as the whole corpus) and the first of each kind of sample.
fn char_covering_records(
    cfg: &TrainConfig,
    files: &[Vec<PathBuf>],
    selection: &Selection,
) -> Result<Vec<Record>> {
    let mut seen = std::collections::HashSet::new();
    let mut kinds = std::collections::HashSet::new();
    let mut keep = Vec::new();
    let stream = RecordStream::new(
        files.iter().flatten().cloned().collect(),
        cfg.data.format,
        invalid_policy(cfg),
    );
    for record in stream {
        let mut record = record?;
        if !selection.apply(&mut record)? {
            continue;
        }
        let mut new = kinds.insert(std::mem::discriminant(&record.sample));
        for text in setup::record_texts(&record) {
            for c in text.chars() {
                new |= seen.insert(c);
            }
        }
        if new {
            keep.push(record);
        }
    }
    Ok(keep)
}

/// `data.train`'s mixture: each record's source and each source's share. `None` when every
/// source is taken whole (plain concatenation, the epoch is the data itself).
struct Mixture {
    shares: Vec<Share>,
    names: Vec<String>,
    /// The source of each training record (by index into the records).
    source_of: Vec<usize>,
}

impl Mixture {
    /// `source_of`: each training record's source (an index into `data.train`).
    fn new(cfg: &TrainConfig, source_of: Vec<usize>) -> Option<Mixture> {
        let shares: Vec<Share> = cfg.data.train.iter().map(DataSource::share).collect();
        if shares.iter().all(|s| *s == Share::All) {
            return None;
        }
        Some(Mixture {
            shares,
            names: cfg.data.train.iter().map(DataSource::name).collect(),
            source_of,
        })
    }

    /// The epoch's samples, as indices into `data.samples`.
    fn epoch(&self, data: &Prepared, seed: u64, epoch: u64) -> Result<Vec<usize>> {
        let mut per_source: Vec<(Vec<usize>, Share)> =
            self.shares.iter().map(|s| (vec![], *s)).collect();
        for (k, (record, _)) in data.samples.iter().enumerate() {
            per_source[self.source_of[*record]].0.push(k);
        }
        Ok(mixture_epoch(&per_source, seed, epoch)?)
    }

    /// Per source: records read, samples kept after rendering, and what epoch 0 draws of it.
    fn report(&self, records: &ReadOutcome, data: &Prepared, view: &[usize]) -> Vec<SourceReport> {
        let mut out: Vec<SourceReport> = self
            .names
            .iter()
            .zip(&self.shares)
            .map(|(name, share)| SourceReport {
                name: name.clone(),
                share: format!("{share:?}").to_lowercase(),
                records: 0,
                kept: 0,
                drawn: 0,
                tokens: 0,
                targets: 0,
                target_share: 0.0,
            })
            .collect();
        for (i, _) in records.records.iter().enumerate() {
            out[self.source_of[i]].records += 1;
        }
        for (record, _) in &data.samples {
            out[self.source_of[*record]].kept += 1;
        }
        for &k in view {
            let (record, r) = &data.samples[k];
            let s = &mut out[self.source_of[*record]];
            s.drawn += 1;
            s.tokens += r.len();
            s.targets += r.n_targets();
        }
        let total: usize = out.iter().map(|s| s.targets).sum();
        for s in &mut out {
            s.target_share = s.targets as f64 / total.max(1) as f64;
        }
        out
    }
}

/// One source of a mixture in the preflight report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceReport {
    pub name: String,
    /// `all`, `samples(N)` or `weight(w)`.
    pub share: String,
    pub records: usize,
    /// Samples that survived rendering.
    pub kept: usize,
    /// Samples epoch 0 trains on (with repeats).
    pub drawn: usize,
    pub tokens: usize,
    pub targets: usize,
    /// This source's share of epoch 0's target tokens.
    pub target_share: f64,
}

/// Training and validation records: validation from its own files, or `val_ratio` of the
/// training records held out by seed. The training outcome keeps the read counts (skipped and
/// blank lines) for the report; `source_of` (each training record's source) follows the split.
/// A line read by two sources (one file listed twice) is held out whole: every training copy of
/// a held-out line goes too, so no validation record is also trained on.
fn split_records(
    cfg: &TrainConfig,
    mut train_read: ReadOutcome,
    source_of: Vec<usize>,
) -> Result<(ReadOutcome, Vec<usize>, Option<ReadOutcome>)> {
    if !cfg.data.validation.is_empty() {
        let (val, _, _) = read_all("data.validation", &cfg.data.validation, cfg)?;
        return Ok((train_read, source_of, Some(val)));
    }
    if cfg.data.val_ratio > 0.0 {
        let records = std::mem::take(&mut train_read.records);
        let (tr, va) = split_train_val(records.len(), cfg.data.val_ratio, cfg.run.seed);
        let line = |r: &Record| (r.source.file.clone(), r.source.line);
        let mut held_out = std::collections::HashSet::new();
        let va: Vec<usize> = va
            .into_iter()
            .filter(|&i| held_out.insert(line(&records[i])))
            .collect();
        let tr: Vec<usize> = tr
            .into_iter()
            .filter(|&i| !held_out.contains(&line(&records[i])))
            .collect();
        let train_sources = tr.iter().map(|&i| source_of[i]).collect();
        let mut slots: Vec<Option<Record>> = records.into_iter().map(Some).collect();
        let mut take = |idx: &[usize]| -> Vec<Record> {
            idx.iter()
                .map(|&i| slots[i].take().expect("the split is disjoint"))
                .collect()
        };
        let val_records = take(&va);
        train_read.records = take(&tr);
        train_read.per_format = count_formats(&train_read.records);
        let val = ReadOutcome {
            per_format: count_formats(&val_records),
            records: val_records,
            ..ReadOutcome::default()
        };
        return Ok((train_read, train_sources, Some(val)));
    }
    Ok((train_read, source_of, None))
}

fn count_formats(records: &[Record]) -> std::collections::BTreeMap<sft_data::Format, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for r in records {
        *counts.entry(r.format).or_insert(0) += 1;
    }
    counts
}

/// Rendered training data per epoch: computed once when rendering is deterministic, per epoch
/// when poems draw their metadata anew; under a mixture, the samples each epoch draws.
struct EpochCache<'a> {
    records: &'a ReadOutcome,
    template: &'a Template,
    tok: &'a Tokenizer,
    opts: &'a RenderOptions,
    disk: Option<&'a PrepCache>,
    /// Renderings read from `disk` instead of made.
    hits: usize,
    epoch: Option<u64>,
    data: Option<Prepared>,
    view: Option<(u64, Vec<usize>)>,
}

/// `prepare`, read from the disk cache when it holds the data, else rendered and stored there.
fn prepare_cached(
    disk: Option<&PrepCache>,
    tag: &str,
    records: &ReadOutcome,
    template: &Template,
    tok: &Tokenizer,
    opts: &RenderOptions,
    epoch: u64,
) -> Result<Prepared> {
    if let Some(data) = disk.and_then(|c| c.load(tag)) {
        return Ok(data);
    }
    let data = prepare(records, template, tok, opts, epoch)?;
    if let Some(c) = disk {
        c.store(tag, &data)?;
    }
    Ok(data)
}

/// The disk cache's key: a hash of everything rendering reads (see `prepcache`).
fn prep_cache_key(
    cfg: &TrainConfig,
    tok: &Tokenizer,
    max_len: usize,
    train_files: &[Vec<PathBuf>],
    val_files: &[Vec<PathBuf>],
) -> Result<String> {
    let mut data = cfg.data.clone();
    // Where the cache is, and whether it is used, do not change what is in it.
    data.cache = true;
    data.cache_dir = None;
    let mut parts: Vec<Vec<u8>> = vec![
        concat!("sft-prep-1 ", env!("CARGO_PKG_VERSION")).into(),
        toml::to_string(&data)
            .expect("the config serialises")
            .into_bytes(),
        format!("max_len {max_len} seed {}", cfg.run.seed).into_bytes(),
        tok.canonical_json()?.into_bytes(),
    ];
    if let Some(p) = &cfg.data.chat_template {
        parts.push(std::fs::read(p).map_err(|e| Error::io(p, e))?);
    }
    for map in cfg.data.field_map.values() {
        if let crate::config::FieldMap::File(p) = map {
            parts.push(std::fs::read(p).map_err(|e| Error::io(p, e))?);
        }
    }
    for (tag, files) in [("train", train_files), ("validation", val_files)] {
        for f in files.iter().flatten() {
            parts.push(format!("{tag} {}", f.display()).into_bytes());
            parts.push(std::fs::read(f).map_err(|e| Error::io(f, e))?);
        }
    }
    Ok(checkpoint::fingerprint(parts))
}

/// One epoch's training samples.
struct Epoch<'a> {
    data: &'a Prepared,
    /// Which of `data`'s samples the epoch trains on, in order (a mixture); all of them when
    /// `None`.
    order: Option<&'a [usize]>,
}

impl Epoch<'_> {
    fn lengths(&self) -> Vec<usize> {
        match self.order {
            Some(order) => order
                .iter()
                .map(|&k| self.data.samples[k].1.len())
                .collect(),
            None => self.data.samples.iter().map(|(_, r)| r.len()).collect(),
        }
    }

    /// The `i`-th sample of the epoch (what `plan_epoch` over [`Epoch::lengths`] indexes).
    fn sample(&self, i: usize) -> &Rendered {
        match self.order {
            Some(order) => &self.data.samples[order[i]].1,
            None => &self.data.samples[i].1,
        }
    }
}

impl<'a> EpochCache<'a> {
    fn new(
        records: &'a ReadOutcome,
        template: &'a Template,
        tok: &'a Tokenizer,
        opts: &'a RenderOptions,
        disk: Option<&'a PrepCache>,
    ) -> EpochCache<'a> {
        EpochCache {
            records,
            template,
            tok,
            opts,
            disk,
            hits: 0,
            epoch: None,
            data: None,
            view: None,
        }
    }

    fn get(
        &mut self,
        epoch: u64,
        per_epoch: bool,
        mixture: Option<&Mixture>,
        seed: u64,
    ) -> Result<Epoch<'_>> {
        let key = if per_epoch { epoch } else { 0 };
        if self.epoch != Some(key) {
            let tag = format!("train-{key}");
            let cached = self.disk.and_then(|c| c.load(&tag));
            self.hits += usize::from(cached.is_some());
            self.data = Some(match cached {
                Some(data) => data,
                None => prepare_cached(
                    self.disk,
                    &tag,
                    self.records,
                    self.template,
                    self.tok,
                    self.opts,
                    key,
                )?,
            });
            self.epoch = Some(key);
            self.view = None;
        }
        let data = self.data.as_ref().expect("filled above");
        if let Some(m) = mixture {
            if self.view.as_ref().is_none_or(|(e, _)| *e != epoch) {
                self.view = Some((epoch, m.epoch(data, seed, epoch)?));
            }
        }
        Ok(Epoch {
            data,
            order: self.view.as_ref().map(|(_, v)| v.as_slice()),
        })
    }
}

fn ids_bytes(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|i| i.to_le_bytes()).collect()
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("serialisable");
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

fn append_sample(out_dir: &Path, step: u64, prompt: &str, text: &str) -> Result<()> {
    use std::io::Write;
    let path = out_dir.join("samples.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    let line = serde_json::json!({ "step": step, "prompt": prompt, "text": text });
    writeln!(f, "{line}").map_err(|e| Error::io(&path, e))
}
