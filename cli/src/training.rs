//! Running one training config, with its progress, summary and signal handling as `train`'s doc
//! describes: what `sft train --config` and the demo's two stages share.
//!
//! Built with the `mpi` feature, `sft train --config` is one rank of a data-parallel job when
//! `mpirun` or `srun` started it (`ranks`): rank 0 reports and writes, the others are silent
//! unless they fail, and a rank's error ends the whole job.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use sft::checkpoint::ResumeFrom;
use sft::config::ConfigChange;
use sft::dist::{Collective, Single};
use sft::feed::SourceReport;
use sft::{Event, Replan, RunOptions, TrainConfig};

/// Runs one training config in this process alone (the demo's stages) and returns its summary.
/// An interrupted run (SIGINT/SIGTERM) does not return: it has saved its checkpoint, and the
/// process exits with 128 + the signal's number.
pub(crate) fn run_config(
    cfg: &TrainConfig,
    resume: Option<PathBuf>,
    json: bool,
    config_file: Option<&Path>,
) -> anyhow::Result<sft::Summary> {
    run_on(cfg, resume, json, config_file, false)
}

/// [`run_config`] as one rank of the job that launched this process, if any (`mpirun -np N`,
/// `srun`, with the `mpi` feature; one process otherwise).
pub(crate) fn run_config_ranked(
    cfg: &TrainConfig,
    resume: Option<PathBuf>,
    json: bool,
    config_file: Option<&Path>,
) -> anyhow::Result<()> {
    run_on(cfg, resume, json, config_file, true).map(|_| ())
}

fn run_on(
    cfg: &TrainConfig,
    resume: Option<PathBuf>,
    json: bool,
    config_file: Option<&Path>,
    ranked: bool,
) -> anyhow::Result<sft::Summary> {
    let stop = Arc::new(AtomicBool::new(false));
    let signal = Arc::new(AtomicUsize::new(0));
    listen_for_signals(&stop, &signal, ranked)?;
    let mut progress = Progress::new(std::io::stderr().is_terminal(), cfg.run.log_every);
    progress.streamed = cfg.data.streaming.then_some(cfg.data.shuffle_buffer);
    let opts = RunOptions {
        resume,
        stop: Some(stop),
    };
    let trained = crate::on_pool(cfg.train.threads, || {
        let mut train = |coll: &dyn Collective| {
            let lead = coll.rank() == 0;
            if lead && coll.ranks() > 1 {
                progress.line(&format!(
                    "data-parallel: {}; a step takes {} x {} rows x {} micro-batch(es)",
                    coll.describe(),
                    coll.ranks(),
                    cfg.train.batch_size,
                    cfg.train.grad_accum
                ));
            }
            let summary = sft::train_with(cfg, &opts, coll, &mut |e| {
                if lead {
                    progress.event(e)
                }
            })
            .with_context(|| format!("training run {}", cfg.run.out_dir.display()))?;
            Ok((summary, lead, coll.ranks()))
        };
        match ranked {
            true => crate::ranks::run(train),
            false => train(&Single),
        }
    });
    let (summary, lead, ranks) = trained?;
    progress.finish();
    if !lead {
        // The other ranks report nothing: rank 0 has said it all.
        if summary.interrupted {
            std::process::exit(128 + signal_number(&signal));
        }
        return Ok(summary);
    }
    if summary.interrupted {
        let sig = signal_number(&signal) as usize;
        let name = match sig as i32 {
            signal_hook::consts::SIGTERM => "SIGTERM",
            signal_hook::consts::SIGUSR1 => "SIGUSR1",
            _ => "SIGINT",
        };
        if json {
            println!("{}", serde_json::to_string(&summary)?);
        }
        eprintln!(
            "interrupted by {name} after step {}: saved {}",
            summary.steps,
            summary.last_checkpoint.display()
        );
        eprintln!(
            "resume with: {}sft train{} --resume {}",
            // The same rank count: a checkpoint resumes with no other.
            if ranks > 1 {
                format!("mpirun -np {ranks} ")
            } else {
                String::new()
            },
            config_file
                .map(|c| format!(" --config {}", c.display()))
                .unwrap_or_default(),
            summary.out_dir.display()
        );
        std::process::exit(128 + sig as i32);
    }
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "trained {} steps in {:.0} s (peak memory {:.0} MiB)",
            summary.steps, summary.elapsed_s, summary.peak_rss_mib
        );
        if let Some(l) = summary.final_train_loss {
            println!("  final train loss      {l:.4}");
        }
        if let (Some(l), Some(a)) = (summary.final_val_loss, summary.final_val_accuracy) {
            println!(
                "  final validation loss {l:.4} (token accuracy {:.1}%)",
                100.0 * a
            );
        }
        if let (Some(l), Some(s)) = (summary.best_val_loss, summary.best_step) {
            println!(
                "  best validation loss  {l:.4} at step {s} -> {}",
                summary.out_dir.join("best").display()
            );
        }
        if let Some(c) = summary.streamed {
            println!(
                "  streamed    {} records read: {} filtered out, {} invalid lines skipped, {} samples dropped while rendering (too long or no target)",
                c.records, c.filtered_out, c.invalid_skipped, c.dropped
            );
        }
        println!("  model       {}", summary.final_model.display());
        println!("  checkpoint  {}", summary.last_checkpoint.display());
        println!("  metrics     {}", summary.metrics.display());
        println!("  loss plot   {}", summary.plot.display());
    }
    Ok(summary)
}

/// The signal that stopped the run: SIGINT when none came to this process (a data-parallel
/// run's rank 0 stopped every rank).
fn signal_number(signal: &AtomicUsize) -> i32 {
    match signal.load(Ordering::SeqCst) {
        0 => signal_hook::consts::SIGINT,
        sig => sig as i32,
    }
}

/// SIGINT and SIGTERM set `stop` (the run saves after the current step) and record which signal
/// came in `signal`; a second one, with `stop` already set, exits at once with 128 + its number.
/// A `ranked` run listens for `crate::ranks::STOP_SIGNALS` too.
fn listen_for_signals(
    stop: &Arc<AtomicBool>,
    signal: &Arc<AtomicUsize>,
    ranked: bool,
) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    let extra = if ranked {
        crate::ranks::STOP_SIGNALS
    } else {
        &[]
    };
    for &sig in [SIGINT, SIGTERM].iter().chain(extra) {
        // The order matters: the exit checks the flag the first signal sets.
        flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(stop))?;
        flag::register_usize(sig, Arc::clone(signal), sig as usize)?;
        flag::register(sig, Arc::clone(stop))?;
    }
    Ok(())
}

/// Turns training events into a progress bar or plain lines on stderr.
struct Progress {
    bar: Option<ProgressBar>,
    log_every: u64,
    /// `data.shuffle_buffer` of a streamed run: its preflight covers only that many records.
    streamed: Option<usize>,
}

impl Progress {
    fn new(terminal: bool, log_every: u64) -> Progress {
        let bar = terminal.then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{wide_bar}] {pos}/{len} steps  {msg}  ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar
        });
        Progress {
            bar,
            log_every,
            streamed: None,
        }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn event(&mut self, e: Event<'_>) {
        match e {
            Event::Cleaned(c) => {
                for p in &c.removed {
                    self.line(&format!(
                        "removed {} (left by an interrupted run)",
                        p.display()
                    ));
                }
                for p in &c.restored {
                    self.line(&format!(
                        "restored {} (an interrupted run had moved it aside)",
                        p.display()
                    ));
                }
            }
            Event::Overwrote { removed } => self.line(&format!(
                "overwrite: removed the previous run's {}",
                removed
                    .iter()
                    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Event::Resumed {
                from,
                changes,
                total_steps,
                dropped_log_lines,
            } => self.resumed(from, changes, total_steps, dropped_log_lines),
            Event::Preflight { split, report } => {
                let note = match (split, self.streamed) {
                    ("train", Some(n)) => format!(
                        " (streamed: the first {n} records; the rest is read as training goes)"
                    ),
                    _ => String::new(),
                };
                self.line(&format!("== {split} data{note} ==\n{report}"))
            }
            Event::Started {
                total_steps,
                start_step,
                n_params,
                n_frozen,
                base_quant,
                out_dir,
                device,
            } => {
                if let Some(q) = base_quant {
                    self.line(&format!("frozen base kept as ggml blocks: {q}"));
                }
                self.started(
                    (start_step, total_steps),
                    (n_params, n_frozen),
                    out_dir,
                    &device,
                )
            }
            Event::Step(m) => {
                if m.skipped {
                    self.line(&format!(
                        "step {}: the f16 gradients overflowed at loss scale {}; the step is skipped and the scale halved",
                        m.step,
                        m.loss_scale.unwrap_or(f64::NAN)
                    ));
                }
                let msg = format!(
                    "loss {:.4}  lr {:.2e}  grad {:.2}  {:.0} tok/s",
                    m.loss, m.lr, m.grad_norm, m.tokens_per_s
                );
                match &self.bar {
                    Some(bar) => {
                        bar.set_position(m.step);
                        bar.set_message(msg);
                    }
                    None if m.step % self.log_every == 0 => {
                        eprintln!("step {:>6}  epoch {:.2}  {msg}", m.step, m.epoch)
                    }
                    None => {}
                }
            }
            Event::DataCache { dir, hit } => self.line(&format!(
                "rendered data {} {}",
                if hit {
                    "read from the cache in"
                } else {
                    "cached in"
                },
                dir.display()
            )),
            Event::Mixture { sources } => self.line(&mixture_table(sources)),
            Event::Replanned { total_steps, why } => self.replanned(total_steps, why),
            Event::Eval(m) => self.line(&format!(
                "step {:>6}  validation loss {:.4}  token accuracy {:.1}%",
                m.step,
                m.val_loss,
                100.0 * m.val_token_accuracy
            )),
            Event::Sample { step, prompt, text } => {
                self.line(&format!("step {step:>6}  sample {prompt} -> {text}"))
            }
            Event::Checkpoint { step, path } => {
                self.line(&format!("step {step:>6}  saved {}", path.display()))
            }
        }
    }

    fn resumed(
        &self,
        from: &ResumeFrom,
        changes: &[ConfigChange],
        (before, after): (u64, u64),
        dropped_log_lines: usize,
    ) {
        for (dir, why) in &from.skipped {
            self.line(&format!("passed over {}: {why}", dir.display()));
        }
        self.line(&format!(
            "resuming from {}{}",
            from.checkpoint.display(),
            if from.from_run_dir {
                " (the run directory's newest complete checkpoint)"
            } else {
                ""
            }
        ));
        for c in changes {
            self.line(&format!("  changed on resume: {c}"));
        }
        if before != after {
            self.line(&format!("  schedule total {before} -> {after} steps"));
        }
        if dropped_log_lines > 0 {
            self.line(&format!(
                "  dropped {dropped_log_lines} log line(s) written after the checkpoint"
            ));
        }
    }

    fn started(
        &self,
        (start_step, total_steps): (u64, u64),
        (n_params, n_frozen): (usize, usize),
        out_dir: &Path,
        device: &str,
    ) {
        let frozen = match n_frozen {
            0 => String::new(),
            n => format!(
                " (LoRA: {:.2}% of {:.2}M; the base is frozen)",
                100.0 * n_params as f64 / (n_params + n) as f64,
                (n_params + n) as f64 / 1e6
            ),
        };
        self.line(&format!(
            "training {:.2}M parameters{frozen} on {device} for {total_steps} steps into {}{}",
            n_params as f64 / 1e6,
            out_dir.display(),
            if start_step > 0 {
                format!(" (resuming at step {start_step})")
            } else {
                String::new()
            }
        ));
        if let Some(bar) = &self.bar {
            bar.set_length(total_steps);
            bar.set_position(start_step);
            bar.reset_eta();
        }
    }

    fn replanned(&self, (before, after): (u64, u64), why: &Replan) {
        // The budget's estimate moves by a step now and then; say so when it matters.
        let small = before.abs_diff(after) <= (before / 100).max(1);
        if matches!(why, Replan::Budget { .. }) && small && after > before {
            return;
        }
        let why = match why {
            Replan::Budget {
                budget_s,
                used_s,
                per_step_s,
            } => format!(
                "time budget: {used_s:.0} of {budget_s:.0} s used at {per_step_s:.3} s/step"
            ),
            Replan::EarlyStopping {
                evaluations,
                best_val_loss,
                best_step,
            } => format!(
                "early stopping: {evaluations} evaluations without improvement (best validation loss {best_val_loss:.4} at step {best_step})"
            ),
        };
        self.line(&format!("{why}: schedule total {before} -> {after} steps"));
        if let Some(bar) = &self.bar {
            bar.set_length(after);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A mixture's sources as epoch 0 draws them, one line each.
fn mixture_table(sources: &[SourceReport]) -> String {
    let mut text = String::from(
        "== mixture (epoch 0) ==\nsource                                   share          records     kept    drawn     tokens  targets",
    );
    for s in sources {
        text.push_str(&format!(
            "\n{:<40} {:<12} {:>9} {:>8} {:>8} {:>10} {:>7.1}%",
            s.name,
            s.share,
            s.records,
            s.kept,
            s.drawn,
            s.tokens,
            100.0 * s.target_share
        ));
    }
    text
}
