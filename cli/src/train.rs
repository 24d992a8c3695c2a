//! `sft train --config FILE [--set section.key=value ...] [--resume DIR] [--overwrite] [--json]`.
//!
//! Without `--config` it runs the bundled demo (see `demo`), into `--out` (default `runs/demo`);
//! `--resume DIR` without `--config` continues with the config saved in the checkpoint.
//! `--resume` takes a checkpoint directory or a run directory (`run.out_dir`, whose newest
//! complete checkpoint is taken). A fresh run into a directory that holds another run is refused
//! unless `--overwrite` is given.
//!
//! Progress goes to stderr: a bar with loss and ETA on a terminal, one line per logged step
//! otherwise. The summary (where the checkpoints, metrics and plot are) goes to stdout; with
//! `--json` it is one JSON object (`interrupted: true` when a signal stopped the run); the demo
//! prints one per stage, then its counts (see `demo`).
//!
//! SIGINT (Ctrl-C) or SIGTERM finishes the current optimizer step, saves a checkpoint, prints how
//! to resume, and exits with status 130 or 143; a second signal exits at once with that status.
//!
//! Built with the `mpi` feature and started by `mpirun -np N` (or `srun`), it is one of N
//! data-parallel ranks (README, "Training on several machines"); SIGUSR1, which Open MPI's
//! `mpirun` forwards to every rank, then stops the run as SIGINT does (exit status 138).

use std::path::PathBuf;

use sft::TrainConfig;

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
    /// Continue from a checkpoint directory, or from the newest complete checkpoint of a run
    /// directory (`run.out_dir`); without --config, with the config saved in the checkpoint.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Replace another run's files in `run.out_dir` (a fresh run into a used directory is refused
    /// without it); the same as `--set run.overwrite=true`.
    #[arg(long)]
    overwrite: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    if args.overwrite && args.resume.is_some() {
        anyhow::bail!("--overwrite starts the run over; it cannot be combined with --resume");
    }
    let mut sets = args.sets.clone();
    if args.overwrite {
        sets.push("run.overwrite=true".into());
    }
    let cfg = match (&args.config, &args.resume) {
        (Some(config), _) => TrainConfig::load(config, &sets)?,
        (None, Some(resume)) => {
            // The config the checkpoint was trained with, so `--resume RUN_DIR` is enough.
            let from = sft::checkpoint::resolve_resume(resume)?;
            TrainConfig::load(&from.checkpoint.join(sft::checkpoint::CONFIG_FILE), &sets)?
        }
        (None, None) => {
            let out = args.out.clone().unwrap_or_else(crate::demo::default_out);
            return crate::demo::run(&out, &sets, args.json);
        }
    };
    if args.out.is_some() {
        anyhow::bail!("--out is for the demo; with --config use --set run.out_dir=DIR");
    }
    crate::training::run_config_ranked(&cfg, args.resume, args.json, args.config.as_deref())
}
