//! `sft`: supervised fine-tuning of small causal language models on the CPU.
//!
//! Thin by design: parse arguments, call the libraries, report. Each subcommand lives in its own
//! module with an `Args` struct and a `run` function.

// Printing results is this binary's job; the lint keeps it out of the libraries.
#![allow(clippy::print_stdout)]

mod render;
mod tokenize;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sft",
    version,
    about = "Supervised fine-tuning of causal language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Text -> token ids, one JSON object per text.
    Tokenize(tokenize::Args),
    /// JSONL records -> token ids and loss masks, with the preflight report.
    Render(render::Args),
    /// Train (fine-tune or from scratch) as a TOML config says.
    Train(train::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Tokenize(args) => tokenize::run(args),
        Command::Render(args) => render::run(args),
        Command::Train(args) => train::run(args),
    }
}

/// Sets the compute thread count before any thread pool starts. candle's matmul reads
/// `RAYON_NUM_THREADS` on every call; rayon's global pool reads it once, at first use.
fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
