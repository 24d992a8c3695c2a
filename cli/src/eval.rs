//! `sft eval --model DIR --data FILE [--format F] [--train-on MODE] [--batch-size N] [--limit N]
//! [--json]`.
//!
//! Contract relied on by scripts: the masked mean cross-entropy over all target tokens of the
//! file (sum over targets / number of targets), printed with `--json` as one object
//! `{"loss":x,"targets":n,"token_accuracy":a}`. Records are rendered exactly as for training;
//! samples longer than `--max-len` (default: the model's context) are dropped and counted on
//! stderr, never silently.

use std::path::PathBuf;

use sft_data::{prepare, Format, InvalidPolicy, LengthPolicy, RenderOptions, TrainOn};

use crate::common::{ModelArgs, TemplateArgs};

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// The JSONL file to evaluate on.
    #[arg(long)]
    data: PathBuf,
    /// Record format; detected per line when absent.
    #[arg(long)]
    format: Option<Format>,
    /// assistant, last, completion or all; each sample's default when absent.
    #[arg(long)]
    train_on: Option<TrainOn>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Longest sample in tokens (default: the model's context); longer ones are dropped.
    #[arg(long)]
    max_len: Option<usize>,
    /// Probability of keeping each poem metadata field (1 keeps all: a deterministic score).
    #[arg(long, default_value_t = 1.0)]
    metadata_keep_prob: f64,
    /// Evaluate on the first N records only (a quick check on a large corpus; the count of
    /// records left out is printed on stderr).
    #[arg(long)]
    limit: Option<usize>,
    #[command(flatten)]
    template: TemplateArgs,
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let ck = args.model.open(&args.template)?;
    let mut read = sft::feed::read_data(&args.data, args.format, InvalidPolicy::Error)?;
    if let Some(n) = args.limit {
        if read.records.len() > n {
            eprintln!(
                "evaluating on the first {n} of {} records (--limit)",
                read.records.len()
            );
            read.records.truncate(n);
        }
    }
    let opts = RenderOptions {
        train_on: args.train_on,
        max_len: Some(args.max_len.unwrap_or(ck.model.config().max_positions())),
        length_policy: LengthPolicy::Drop,
        metadata_keep_prob: args.metadata_keep_prob,
        seed: 0,
        check_invariants: true,
    };
    let prepared = prepare(&read, &ck.template, &ck.tok, &opts, 0)?;
    let dropped = read.records.len() - prepared.samples.len();
    if dropped > 0 {
        eprintln!(
            "{dropped} of {} records dropped (too long or no targets); see `sft render --report`",
            read.records.len()
        );
    }
    if prepared.samples.is_empty() {
        anyhow::bail!("{}: no sample to evaluate", args.data.display());
    }
    let stats = sft::eval::evaluate_prepared(
        &ck.model,
        &prepared,
        args.batch_size.max(1),
        sft::setup::pad_id(&ck.tok),
    )?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "loss": stats.mean(),
                "targets": stats.n_targets,
                "token_accuracy": stats.accuracy(),
            })
        );
    } else {
        println!(
            "loss {:.4}  perplexity {:.2}  token accuracy {:.2}%  over {} target tokens",
            stats.mean(),
            stats.mean().exp(),
            100.0 * stats.accuracy(),
            stats.n_targets
        );
    }
    Ok(())
}
