//! `sft`: supervised fine-tuning of small causal language models on the CPU.
//!
//! Thin by design: parse arguments, call the libraries, report. Each subcommand lives in its own
//! module with an `Args` struct and a `run` function.

mod tokenize;

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Tokenize(args) => tokenize::run(args),
    }
}
