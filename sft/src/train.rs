//! The training run: `train(config) -> Summary`, readable top to bottom.
//!
//! 1. tokenizer (loaded, or built from the training text), 2. records and template,
//! 3. model (checkpoint, preset or init; or the checkpoint being resumed), 4. preflight report
//!    and the state to start from, 5. the step loop: the feed's micro-batches -> accumulated
//!    gradients -> clip + AdamW -> log; then evaluate, save, stop on a signal.
//!
//! Every random draw derives from `run.seed` and the position in the run (`seeds`), which is
//! what makes resuming bit-identical without replaying data.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::Serialize;
use sft_data::{Prepared, Report, Template};
use sft_model::Model;
use sft_tokenizer::Tokenizer;

use crate::checkpoint::{self, Cleaned, ResumeFrom, TrainerState};
use crate::config::{dtype_name, parse_dtype, ConfigChange, TrainConfig, RESUME_MUTABLE};
use crate::dist::{self, Collective, Single};
use crate::error::{Error, Result};
use crate::eval;
use crate::feed::{Feed, Share, SourceReport, Step, StreamCounts, TrainData};
use crate::metrics::{self, EvalMetrics, MetricsLog, StepMetrics};
use crate::optim::AdamW;
use crate::plot;
use crate::seeds::dropout_seed;
use crate::setup;
use crate::step::{accumulate_micro_batch, GradAccumulator, LossStats};

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
        /// A quantized base: its tensors per ggml type (`q4_k: 168 tensors, q5_0: 72 tensors`).
        base_quant: Option<String>,
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
    /// The process's peak resident memory when the run ended (a process that runs several
    /// stages, as the demo does, counts them all); 0 where `/proc` is not there.
    pub peak_rss_mib: f64,
    /// A streamed run (`data.streaming`): what it read and left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streamed: Option<StreamCounts>,
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
    train_with(cfg, opts, &Single, on_event)
}

/// [`train`] as one rank of a data-parallel run over `coll` (see `dist`): every rank calls it
/// with the same config; rank 0 alone writes into `run.out_dir` (metrics, samples, checkpoints,
/// the export) and takes the decisions that depend on its clock or on evaluation.
pub fn train_with(
    cfg: &TrainConfig,
    opts: &RunOptions,
    coll: &dyn Collective,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Summary> {
    let t0 = Instant::now();
    let dir = RunDir::open(cfg, opts, coll.rank() == 0, on_event)?;
    // A collective over device memory (NCCL) has chosen this rank's GPU.
    let device = match coll.device() {
        Some(device) => device,
        None => setup::device()?,
    };
    let dtype = parse_dtype(&cfg.model.dtype).map_err(Error::Config)?;

    // 1-2. Records and tokenizer. A resumed run takes the tokenizer saved in its checkpoint.
    // Streaming reads only a first look (the preflight's records) here; the rest as it trains.
    let data = TrainData::read(cfg)?;
    let tok = match dir.resume_dir() {
        Some(dir) => Tokenizer::from_path(dir)?,
        None => setup::tokenizer(cfg, &data.tokenizer_corpus(cfg)?)?,
    };
    let template = setup::template(cfg, &tok)?;
    let data = data.split(cfg)?;

    // 3. Model.
    let mut model = match dir.resume_dir() {
        Some(dir) => setup::resumed_model(cfg, &tok, dir, dtype, &device)?,
        None => setup::model(cfg, &tok, dtype, &device)?,
    };
    model.set_checkpointing(cfg.train.gradient_checkpointing);
    setup::check_vocab(&model, &tok)?;
    let max_len = setup::max_len(cfg, &model)?;

    // 4. Preflight: the data exactly as epoch 0 will see it; the state to start from.
    let share = Share {
        rank: coll.rank(),
        ranks: coll.ranks(),
    };
    let feed = Feed::new(cfg, data, (&template, &tok), max_len, share)?;
    let mut run = Run::start(
        cfg,
        (opts, coll),
        (dir, t0),
        (&tok, &template),
        model,
        feed,
        on_event,
    )?;

    // 5. The loop.
    while run.state.step < run.state.total_steps && !run.interrupted {
        let step = run.feed.next_step()?;
        run.step(step)?;
        run.after_step()?;
    }
    run.finish()
}

/// Where a run writes and what it continues from: `run.out_dir` cleaned of a crashed run's
/// leftovers, and the checkpoint `--resume` names with what the config changes since, or the
/// files of a previous run that `run.overwrite` replaces.
struct RunDir {
    out_dir: PathBuf,
    resume: Option<ResumeFrom>,
    changes: Vec<ConfigChange>,
    /// Removed only once this run has set up without error, just before it writes its first
    /// file.
    previous_run: Vec<PathBuf>,
    /// This process writes into `out_dir`: one process, or rank 0 of a data-parallel run.
    writes: bool,
}

impl RunDir {
    /// `writes`: this process owns `out_dir` (the other ranks of a data-parallel run only read
    /// the checkpoint they resume from).
    fn open(
        cfg: &TrainConfig,
        opts: &RunOptions,
        writes: bool,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<RunDir> {
        let out_dir = cfg.run.out_dir.clone();
        if writes {
            std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
            let cleaned = checkpoint::clean_leftovers(&out_dir)?;
            if cleaned != Cleaned::default() {
                on_event(Event::Cleaned(&cleaned));
            }
        }
        let resume = opts
            .resume
            .as_deref()
            .map(checkpoint::resolve_resume)
            .transpose()?;
        // A previous run in out_dir is refused now.
        let (changes, previous_run) = match &resume {
            Some(from) => (resume_changes(cfg, &from.checkpoint)?, vec![]),
            None if writes => (vec![], previous_run_files(&out_dir, cfg.run.overwrite)?),
            None => (vec![], vec![]),
        };
        Ok(RunDir {
            out_dir,
            resume,
            changes,
            previous_run,
            writes,
        })
    }

    fn resume_dir(&self) -> Option<&Path> {
        self.resume.as_ref().map(|r| r.checkpoint.as_path())
    }
}

/// A run's clocks: the whole run's (`elapsed_s`, over resumptions) and the step loop's
/// (`train.max_time` counts it, over resumptions too).
struct Clock {
    t0: Instant,
    elapsed_before: f64,
    loop_start: Instant,
    loop_before_s: f64,
    loop_start_step: u64,
    /// When the last logged step was, and the tokens since (`tokens_per_s`).
    last_log: (Instant, usize),
}

impl Clock {
    fn elapsed_s(&self) -> f64 {
        self.elapsed_before + self.t0.elapsed().as_secs_f64()
    }
}

/// A run in progress: what it trains, where it stands, and what it has logged and saved.
struct Run<'a> {
    cfg: &'a TrainConfig,
    stop: Option<&'a AtomicBool>,
    /// The other ranks of a data-parallel run ([`Single`] in one process).
    coll: &'a dyn Collective,
    on_event: &'a mut dyn FnMut(Event<'_>),
    out_dir: PathBuf,
    /// The checkpoint this run resumed from.
    resumed_from: Option<PathBuf>,
    tok: &'a Tokenizer,
    template: &'a Template,
    model: Model,
    feed: Feed<'a>,
    val: Option<Prepared>,
    opt: AdamW,
    grads: GradAccumulator,
    state: TrainerState,
    /// The export dtype, resolved once: the base directory may be gone by the time the run
    /// exports.
    save_dtype: DType,
    /// Written by rank 0 alone, as everything in `out_dir`.
    metrics: Option<MetricsLog>,
    clock: Clock,
    budget: Option<Budget>,
    /// Target tokens of the last step: a step without any learned nothing, and is neither
    /// evaluated nor saved on schedule.
    step_targets: usize,
    last_train_loss: Option<f64>,
    last_eval: Option<EvalMetrics>,
    last_saved: Option<(u64, PathBuf)>,
    /// Stopped through [`RunOptions::stop`] before the last step.
    interrupted: bool,
}

impl<'a> Run<'a> {
    /// The preflight, the state to start from (fresh, or the resumed checkpoint's), the
    /// optimizer, and the run's config written into `out_dir`.
    fn start(
        cfg: &'a TrainConfig,
        (opts, coll): (&'a RunOptions, &'a dyn Collective),
        (dir, t0): (RunDir, Instant),
        (tok, template): (&'a Tokenizer, &'a Template),
        model: Model,
        mut feed: Feed<'a>,
        on_event: &'a mut dyn FnMut(Event<'_>),
    ) -> Result<Run<'a>> {
        let (data_fingerprint, val) = preflight(&mut feed, &dir, on_event)?;
        let mut state = start_state(
            cfg,
            &mut feed,
            &dir,
            (data_fingerprint, coll.ranks()),
            on_event,
        )?;
        let save_dtype = match (&cfg.model.save_dtype, &state.save_dtype) {
            (None, Some(saved)) => parse_dtype(saved).map_err(Error::Config)?,
            _ => setup::save_dtype(cfg, &model)?,
        };
        state.save_dtype = Some(dtype_name(save_dtype));
        let mut opt = AdamW::new(model.params(), &cfg.optim)?;
        if let Some(dir) = dir.resume_dir() {
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
        let out_dir = dir.out_dir;
        if dir.writes {
            std::fs::write(out_dir.join(checkpoint::CONFIG_FILE), cfg.to_toml_string())
                .map_err(|e| Error::io(&out_dir, e))?;
        }
        let count = |ps: &[(String, candle_core::Var)]| -> usize {
            ps.iter().map(|(_, v)| v.as_tensor().elem_count()).sum()
        };
        on_event(Event::Started {
            total_steps: state.total_steps,
            start_step: state.step,
            n_params: count(model.params()),
            n_frozen: model.frozen_count(),
            base_quant: setup::quantized_summary(&model),
            out_dir: &out_dir,
            device: setup::device_name(model.device()),
        });
        let metrics = match dir.writes {
            true => Some(MetricsLog::open(&out_dir.join("metrics.jsonl"))?),
            false => None,
        };
        let clock = Clock {
            t0,
            elapsed_before: state.elapsed_s,
            last_log: (Instant::now(), 0),
            loop_start: Instant::now(),
            loop_before_s: state.train_s,
            loop_start_step: state.step,
        };
        let budget = cfg.train.max_time_s().map(|budget_s| Budget {
            budget_s,
            cap: cfg.train.max_steps.unwrap_or(u64::MAX),
        });
        // A resumed run continues its epoch where the checkpoint stood.
        feed.seek(state.epoch, state.micro_batch)?;
        Ok(Run {
            cfg,
            stop: opts.stop.as_deref(),
            coll,
            on_event,
            out_dir,
            resumed_from: dir.resume.map(|r| r.checkpoint),
            tok,
            template,
            grads: GradAccumulator::new(model.params().len()),
            model,
            feed,
            val,
            opt,
            state,
            save_dtype,
            metrics,
            clock,
            budget,
            step_targets: 0,
            last_train_loss: None,
            last_eval: None,
            last_saved: None,
            interrupted: false,
        })
    }

    /// One optimizer step: the micro-batches' gradients accumulated, clipped and applied; the
    /// step logged.
    fn step(&mut self, step: Step) -> Result<()> {
        let Step {
            batches,
            first,
            samples,
            epoch_progress,
            epoch,
            micro_batch,
        } = step;
        let cfg = self.cfg;
        // The whole step's counts: every rank's loss is divided by all of its target tokens.
        let [targets, tokens, positions] = dist::sum_counts(
            self.coll,
            [
                batches.iter().map(|b| b.n_targets).sum(),
                batches.iter().map(|b| b.n_tokens).sum(),
                batches.iter().map(|b| b.batch_size * b.seq_len).sum(),
            ],
        )?;
        self.step_targets = targets;
        if targets == 0 {
            // Every sample keeps at least one target, so this needs a step made only of
            // one-token samples; nothing is learned from it and nothing is updated.
            (self.state.epoch, self.state.micro_batch) = (epoch, micro_batch);
            return Ok(());
        }
        // Under f16's loss scaling the gradients carry the scale; the optimizer takes it out.
        let scale = self.opt.loss_scale() / targets as f64;
        let mut stats = LossStats::default();
        for (k, batch) in batches.iter().enumerate() {
            // The seed one process gives this micro-batch of the step.
            let seed = dropout_seed(cfg.run.seed, self.state.step, (first + k) as u64);
            stats.add(accumulate_micro_batch(
                &self.model,
                batch,
                scale,
                Some(seed),
                &mut self.grads,
            )?);
        }
        let mut grads = self.grads.take();
        let summed = dist::sum_step(self.coll, &mut grads, self.model.params(), stats.loss_sum)?;
        let loss = summed.loss_sum / targets as f64;
        if !loss.is_finite() {
            return Err(Error::NonFinite {
                what: format!("loss at step {}", self.state.step + 1),
                value: loss,
            });
        }
        let state = &mut self.state;
        let lr = cfg.schedule.lr(cfg.optim.lr, state.step, state.total_steps);
        let step_stats = self.opt.step(&grads, lr)?;
        drop(grads);
        self.last_train_loss = Some(loss);
        state.step += 1;
        // At the logged steps of the schedule every rank agrees on (the budget's estimate
        // below is rank 0's alone until `after_step`).
        let due = state.step.is_multiple_of(cfg.run.log_every) || state.step == state.total_steps;
        if self.coll.ranks() > 1 && due {
            dist::check_replicas(self.coll, self.opt.checksum()?, state.step)?;
        }
        (state.epoch, state.micro_batch) = (epoch, micro_batch);
        state.samples_seen += samples as u64;
        state.tokens_seen += tokens as u64;
        state.target_tokens_seen += targets as u64;
        let clock = &mut self.clock;
        clock.last_log.1 += tokens;
        let segment_s = clock.loop_start.elapsed().as_secs_f64();
        state.train_s = clock.loop_before_s + segment_s;
        if let Some(b) = &self.budget {
            let eval_due = cfg
                .run
                .eval_every
                .is_some_and(|n| state.step.is_multiple_of(n));
            let per_step_s = segment_s / (state.step - clock.loop_start_step) as f64;
            let at = (
                state.step - clock.loop_start_step,
                state.step,
                state.total_steps,
            );
            if let Some((total, replan)) = b.replan(at, state.train_s, per_step_s, eval_due) {
                (self.on_event)(Event::Replanned {
                    total_steps: (state.total_steps, total),
                    why: &replan,
                });
                state.total_steps = total;
            }
        }
        let m = StepMetrics {
            step: state.step,
            epoch: epoch_progress,
            loss,
            lr,
            grad_norm: step_stats.grad_norm,
            tokens_per_s: clock.last_log.1 as f64
                / clock.last_log.0.elapsed().as_secs_f64().max(1e-9),
            target_tokens: targets,
            tokens,
            positions,
            elapsed_s: clock.elapsed_s(),
            loss_scale: step_stats.loss_scale.map(|(scale, _, _)| scale),
            skipped: step_stats.loss_scale.is_some_and(|(_, _, skipped)| skipped),
            allreduce_s: (self.coll.ranks() > 1).then_some(summed.seconds),
        };
        (self.on_event)(Event::Step(&m));
        if state.step.is_multiple_of(cfg.run.log_every) || state.step == state.total_steps {
            if let Some(log) = &mut self.metrics {
                log.write("train", &m)?;
            }
            state.last_metrics = Some(serde_json::to_value(&m).expect("serialisable"));
            clock.last_log = (Instant::now(), 0);
        }
        Ok(())
    }

    /// What follows a step: evaluation (with early stopping and `best`) and sample
    /// generations when due or at the end, a checkpoint when due, at the end or on a stop
    /// signal.
    ///
    /// In a data-parallel run rank 0 alone evaluates, generates and saves (the others wait in
    /// the next collective); its schedule total and stop decision are then every rank's.
    fn after_step(&mut self) -> Result<()> {
        let (step, targets) = (self.state.step, self.step_targets);
        let writes = self.metrics.is_some();
        let due = |every: Option<u64>| every.is_some_and(|n| step % n == 0 && targets > 0);
        if writes && (due(self.cfg.run.eval_every) || step >= self.state.total_steps) {
            self.evaluate()?;
            self.generate_samples()?;
        }
        // Early stopping may have ended the run at this step.
        let at_end = step >= self.state.total_steps;
        let stop = !at_end && self.stop.is_some_and(|s| s.load(Ordering::SeqCst));
        let saved_now = self.last_saved.as_ref().is_some_and(|(s, _)| *s == step);
        if writes && (due(self.cfg.run.save_every) || at_end || (stop && !saved_now)) {
            self.state.elapsed_s = self.clock.elapsed_s();
            let cfg = self.cfg;
            let path = save_checkpoint(
                &self.out_dir,
                &self.model,
                self.tok,
                &self.opt,
                &self.state,
                cfg,
            )?;
            (self.on_event)(Event::Checkpoint { step, path: &path });
            self.last_saved = Some((step, path));
        }
        (self.state.total_steps, self.interrupted) =
            dist::agree(self.coll, self.state.total_steps, stop)?;
        Ok(())
    }

    /// The validation loss, logged; early stopping's count; `best` saved on a new best.
    fn evaluate(&mut self) -> Result<()> {
        let Some(val) = &self.val else {
            return Ok(());
        };
        let cfg = self.cfg;
        let state = &mut self.state;
        let e = eval::evaluate(
            &self.model,
            val,
            cfg.eval.batch_size.unwrap_or(cfg.train.batch_size),
            setup::pad_id(self.tok),
            (state.step, state.epoch),
            &|| self.clock.elapsed_s(),
        )?;
        if let Some(log) = &mut self.metrics {
            log.write("eval", &e)?;
        }
        (self.on_event)(Event::Eval(&e));
        if let Some(es) = &cfg.train.early_stopping {
            let improved = state
                .best_val_loss
                .is_none_or(|b| e.val_loss < b - es.min_delta);
            state.evals_without_improvement = if improved {
                0
            } else {
                state.evals_without_improvement + 1
            };
            if state.evals_without_improvement >= es.patience && state.step < state.total_steps {
                (self.on_event)(Event::Replanned {
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
            let best = self.out_dir.join("best");
            checkpoint::write_atomically(&best, |d| {
                export(
                    (&self.model, &self.opt),
                    self.save_dtype,
                    self.tok,
                    cfg,
                    state,
                    d,
                )
            })?;
            (self.on_event)(Event::Checkpoint {
                step: state.step,
                path: &best,
            });
        }
        self.last_eval = Some(e);
        Ok(())
    }

    /// Generations for `eval.samples`, reported and appended to `samples.jsonl`.
    fn generate_samples(&mut self) -> Result<()> {
        if self.cfg.eval.samples.is_empty() {
            return Ok(());
        }
        let samples = eval::sample_generations(
            &self.model,
            self.tok,
            self.template,
            &self.cfg.eval,
            self.cfg.run.seed,
        )?;
        for (prompt, text) in samples {
            (self.on_event)(Event::Sample {
                step: self.state.step,
                prompt: &prompt,
                text: &text,
            });
            append_sample(&self.out_dir, self.state.step, &prompt, &text)?;
        }
        Ok(())
    }

    /// The deliverable: the final weights in the export dtype (not for an interrupted run), a
    /// loss plot, and the summary.
    fn finish(mut self) -> Result<Summary> {
        let out_dir = self.out_dir;
        let final_model = out_dir.join("final");
        let state = &mut self.state;
        state.elapsed_s = self.clock.elapsed_s();
        let metrics_path = out_dir.join("metrics.jsonl");
        let plot_path = out_dir.join("loss.svg");
        let writes = self.metrics.is_some();
        if writes && !self.interrupted {
            checkpoint::write_atomically(&final_model, |d| {
                export(
                    (&self.model, &self.opt),
                    self.save_dtype,
                    self.tok,
                    self.cfg,
                    state,
                    d,
                )
            })?;
        }
        if writes {
            let (train_series, val_series) = metrics::read_loss_series(&metrics_path)?;
            let title = format!("{} ({} steps)", out_dir.display(), state.step);
            std::fs::write(
                &plot_path,
                plot::loss_svg(&title, &train_series, &val_series),
            )
            .map_err(|e| Error::io(&plot_path, e))?;
        }
        let last_checkpoint = match (self.last_saved, self.resumed_from) {
            (Some((_, p)), _) => p,
            (None, Some(from)) => from,
            (None, None) => final_model.clone(),
        };
        Ok(Summary {
            out_dir,
            steps: state.step,
            final_train_loss: self.last_train_loss,
            final_val_loss: self.last_eval.as_ref().map(|e| e.val_loss),
            final_val_accuracy: self.last_eval.as_ref().map(|e| e.val_token_accuracy),
            best_val_loss: state.best_val_loss,
            best_step: state.best_step,
            last_checkpoint,
            final_model,
            metrics: metrics_path,
            plot: plot_path,
            elapsed_s: state.elapsed_s,
            interrupted: self.interrupted,
            peak_rss_mib: crate::bench::peak_rss_mib(),
            streamed: self.feed.stream_counts(),
        })
    }
}

/// The preflight: epoch 0's report (and a mixture's sources) reported and written into
/// `out_dir`, a previous run's files removed (now that setting up succeeded), the validation
/// set rendered. Returns the fingerprint of the training data and the validation set.
fn preflight(
    feed: &mut Feed<'_>,
    dir: &RunDir,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<(String, Option<Prepared>)> {
    let first = feed.preflight()?;
    on_event(Event::Preflight {
        split: "train",
        report: first.report,
    });
    if !dir.previous_run.is_empty() {
        remove_run_files(&dir.previous_run)?;
        on_event(Event::Overwrote {
            removed: &dir.previous_run,
        });
    }
    if dir.writes {
        write_json(&dir.out_dir.join("preflight.json"), first.report)?;
    }
    if let Some(sources) = &first.mixture {
        on_event(Event::Mixture { sources });
        if dir.writes {
            write_json(&dir.out_dir.join("mixture.json"), sources)?;
        }
    }
    if first.samples == 0 {
        return Err(Error::Config(
            "no training sample survived rendering; see the preflight report".into(),
        ));
    }
    if let Some((dir, hit)) = first.cache {
        on_event(Event::DataCache { dir, hit });
    }
    let fingerprint = first.fingerprint;
    let val = feed.validation()?;
    if let Some(v) = &val {
        on_event(Event::Preflight {
            split: "validation",
            report: &v.report,
        });
    }
    Ok((fingerprint, val))
}

/// The state a run starts from: step 0, or the resumed checkpoint's. The schedule's length is
/// planned at the start and kept in the state, so a resumed run follows the same curve; a
/// resumed run with a new `max_steps` or `epochs` plans it anew, as the HF Trainer does.
fn start_state(
    cfg: &TrainConfig,
    feed: &mut Feed<'_>,
    dir: &RunDir,
    (data_fingerprint, ranks): (String, usize),
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<TrainerState> {
    let Some(from) = &dir.resume else {
        return Ok(TrainerState {
            step: 0,
            total_steps: feed.total_steps(cfg.train.max_steps, cfg.train.epochs)?,
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
            ranks,
        });
    };
    let ck = &from.checkpoint;
    let mut s = TrainerState::read(ck)?;
    if s.data_fingerprint != data_fingerprint {
        return Err(Error::Checkpoint(format!(
            "{}: the training data differs from the data this run started with (fingerprint {} vs {}); start a new run instead of resuming",
            ck.display(),
            s.data_fingerprint,
            data_fingerprint
        )));
    }
    if s.ranks != ranks {
        return Err(Error::Config(format!(
            "{}: the run trained with {} rank(s), this one has {ranks}; a step takes ranks x batch_size x grad_accum rows, so resume it with {} rank(s)",
            ck.display(),
            s.ranks,
            s.ranks
        )));
    }
    let before = s.total_steps;
    let total = match cfg.train.max_time_s() {
        // The budget's estimate stands (the loop re-estimates it); `max_steps` caps it.
        Some(_) => s.total_steps.min(cfg.train.max_steps.unwrap_or(u64::MAX)),
        None => feed.total_steps(cfg.train.max_steps, cfg.train.epochs)?,
    };
    if total < s.step {
        return Err(Error::Config(format!(
            "{}: the checkpoint is at step {}, past the new schedule's total of {total} steps (train.max_steps / train.epochs)",
            ck.display(),
            s.step
        )));
    }
    s.total_steps = total;
    let mut dropped_log_lines = 0;
    for log in ["metrics.jsonl", "samples.jsonl"]
        .into_iter()
        .filter(|_| dir.writes)
    {
        dropped_log_lines += metrics::drop_after(&dir.out_dir.join(log), s.step)?;
    }
    on_event(Event::Resumed {
        from,
        changes: &dir.changes,
        total_steps: (before, total),
        dropped_log_lines,
    });
    Ok(s)
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
        // The training dtype's own values: the master weights are in the optimizer's state.
        save_weights(model, d, model.dtype(), cfg, &HashMap::new())?;
        tok.save(d)?;
        opt.save(&d.join(checkpoint::OPTIMIZER_FILE))?;
        state.write(d)?;
        std::fs::write(d.join(checkpoint::CONFIG_FILE), cfg.to_toml_string())
            .map_err(|e| Error::io(d, e))
    })?;
    checkpoint::rotate(out_dir, cfg.run.keep_last.max(1))?;
    Ok(path)
}

/// The model's weights in `dtype` (from `masters`, the f32 master weights, where a parameter
/// has them), or with LoRA its adapter (in the training dtype, as PEFT keeps adapters in full
/// precision).
fn save_weights(
    model: &Model,
    dir: &Path,
    dtype: DType,
    cfg: &TrainConfig,
    masters: &HashMap<String, Tensor>,
) -> Result<()> {
    match model.lora() {
        Some(_) => model.save_adapter(dir, &setup::base_name(cfg))?,
        None => model.save_with(dir, dtype, masters)?,
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
    (model, opt): (&Model, &AdamW),
    save_dtype: DType,
    tok: &Tokenizer,
    cfg: &TrainConfig,
    state: &TrainerState,
    dir: &Path,
) -> Result<()> {
    save_weights(model, dir, save_dtype, cfg, &opt.masters())?;
    tok.save(dir)?;
    state.write(dir)?;
    std::fs::write(dir.join(checkpoint::CONFIG_FILE), cfg.to_toml_string())
        .map_err(|e| Error::io(dir, e))
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
