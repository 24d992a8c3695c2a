//! `sft train --config FILE [--set section.key=value ...] [--resume DIR] [--json]`.
//!
//! Without `--config` it runs the bundled demo (see `demo`), into `--out` (default `runs/demo`).
//!
//! Progress goes to stderr: a bar with loss and ETA on a terminal, one line per logged step
//! otherwise. The summary (where the checkpoints, metrics and plot are) goes to stdout; with
//! `--json` it is one JSON object.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use sft::{Event, RunOptions, TrainConfig};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The run's TOML config (see configs/); without one, the bundled nanopoet demo runs.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output directory of the demo (with --config, set `run.out_dir` instead).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a config key, e.g. `--set optim.lr=1e-4`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue from a checkpoint directory of this run.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let Some(config) = &args.config else {
        if args.resume.is_some() {
            anyhow::bail!("--resume needs the run's --config");
        }
        let out = args.out.clone().unwrap_or_else(crate::demo::default_out);
        return crate::demo::run(&out, &args.sets, args.json);
    };
    if args.out.is_some() {
        anyhow::bail!("--out is for the demo; with --config use --set run.out_dir=DIR");
    }
    let cfg = TrainConfig::load(config, &args.sets)?;
    run_config(&cfg, args.resume, args.json)
}

pub(crate) fn run_config(
    cfg: &TrainConfig,
    resume: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let mut progress = Progress::new(std::io::stderr().is_terminal(), cfg.run.log_every);
    let summary = crate::on_pool(cfg.train.threads, || {
        sft::train(cfg, &RunOptions { resume }, &mut |e| progress.event(e))
    })
    .with_context(|| format!("training run {}", cfg.run.out_dir.display()))?;
    progress.finish();
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "trained {} steps in {:.0} s",
            summary.steps, summary.elapsed_s
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
        println!("  model       {}", summary.final_model.display());
        println!("  checkpoint  {}", summary.last_checkpoint.display());
        println!("  metrics     {}", summary.metrics.display());
        println!("  loss plot   {}", summary.plot.display());
    }
    Ok(())
}

/// Turns training events into a progress bar or plain lines on stderr.
struct Progress {
    bar: Option<ProgressBar>,
    log_every: u64,
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
        Progress { bar, log_every }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn event(&mut self, e: Event<'_>) {
        match e {
            Event::Preflight { split, report } => {
                self.line(&format!("== {split} data ==\n{report}"))
            }
            Event::Started {
                total_steps,
                start_step,
                n_params,
                out_dir,
                device,
            } => {
                self.line(&format!(
                    "training {:.2}M parameters on {device} for {total_steps} steps into {}{}",
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
            Event::Step(m) => {
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

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
