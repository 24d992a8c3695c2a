//! `sft bench train --model DIR [--batch-size B] [--seq-len S] [--steps N] [--warmup W] [--json]`.
//!
//! Contract relied on by scripts: with `--json`, one object
//! `{"tokens_per_s":x,"step_s_median":y,"peak_rss_mib":z,"forward_s":..,"backward_s":..,"optimizer_s":..}`
//! (plus `params`, `batch_size`, `seq_len`, `threads`, `flops_per_step`, `gflops_per_s`).
//! Full training steps on random ids: forward with the masked loss, backward, clipping, AdamW.

use std::path::PathBuf;

use candle_core::DType;
use sft::bench::{bench_train, BenchOptions};
use sft_model::Model;

#[derive(clap::Subcommand)]
pub(crate) enum Command {
    /// Time full training steps of a checkpoint on random token ids.
    Train(TrainArgs),
}

#[derive(clap::Args)]
pub(crate) struct TrainArgs {
    /// A checkpoint directory (`cargo xtask init-model` makes one of any shape).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Share of positions that are targets.
    #[arg(long, default_value_t = 1.0)]
    target_fraction: f64,
    /// Compute threads (default: physical cores).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(cmd: Command) -> anyhow::Result<()> {
    let Command::Train(args) = cmd;
    crate::set_threads(args.threads);
    if args.steps == 0 || args.batch_size == 0 || args.seq_len < 2 {
        anyhow::bail!("--steps and --batch-size must be positive and --seq-len at least 2");
    }
    let model = Model::load(&args.model, DType::F32, &sft::setup::device()?)?;
    if args.seq_len > model.config().max_positions() {
        anyhow::bail!(
            "--seq-len {} exceeds the model's context {}",
            args.seq_len,
            model.config().max_positions()
        );
    }
    let r = bench_train(
        &model,
        &BenchOptions {
            batch_size: args.batch_size,
            seq_len: args.seq_len,
            steps: args.steps,
            warmup: args.warmup,
            target_fraction: args.target_fraction,
            seed: 0,
        },
    )?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{:.1} tokens/s  step {:.3} s (forward+loss {:.3}, backward {:.3}, optimizer {:.3})  {:.1} GFLOP/s  peak RSS {:.0} MiB  ({} params, {}x{}, {} threads)",
            r.tokens_per_s, r.step_s_median, r.forward_s, r.backward_s, r.optimizer_s, r.gflops_per_s,
            r.peak_rss_mib, r.params, r.batch_size, r.seq_len, r.threads
        );
    }
    Ok(())
}
