//! `sft`: supervised fine-tuning of small causal language models on the CPU.
//!
//! Thin by design: parse arguments, call the libraries, report. Each subcommand lives in its own
//! module with an `Args` struct and a `run` function.

// Printing results is this binary's job; the lint keeps it out of the libraries.
#![allow(clippy::print_stdout)]

mod alloc;
mod bench;
mod chat;
mod common;
mod demo;
mod eval;
mod export;
mod generate;
mod merge;
mod quality;
mod ranks;
mod render;
mod tokenize;
mod train;
mod training;

#[global_allocator]
static ALLOC: alloc::SplitAlloc = alloc::SplitAlloc;

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
    /// Masked mean cross-entropy and token accuracy of a checkpoint on a JSONL file.
    Eval(eval::Args),
    /// Generate from a checkpoint: raw text, chat messages, or a record's prompt part.
    Generate(generate::Args),
    /// Multi-turn chat with a checkpoint in the terminal (or scripted through stdin).
    Chat(chat::Args),
    /// Fold a LoRA adapter into its base: a plain checkpoint `transformers` loads.
    Merge(merge::Args),
    /// Write a model as a GGUF file llama.cpp and Ollama load.
    Export(export::Args),
    /// Style compliance of generated poems, and author conditioning.
    EvalPoems(quality::PoemArgs),
    /// Exact-match accuracy and stop rate of greedy answers to chat records.
    EvalAnswers(quality::AnswerArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::Command),
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    let backtrace = std::env::var_os("SFT_BACKTRACE").is_some_and(|v| !v.is_empty() && v != "0");
    // anyhow captures a backtrace for every error when RUST_BACKTRACE is set, and this binary
    // would print it; `RUST_LIB_BACKTRACE` takes precedence for library backtraces (not for
    // panics). Set before any other thread exists.
    std::env::set_var("RUST_LIB_BACKTRACE", if backtrace { "1" } else { "0" });
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            report(&e, "", backtrace);
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error as one clean chain: `Error: ...`, then one `Caused by: ...` per cause; the backtrace
/// only behind `SFT_BACKTRACE=1` (see the README). `who` goes before the first line: a rank of a
/// data-parallel job names itself (`rank 1 of 2: Error: ...`).
fn report(e: &anyhow::Error, who: &str, backtrace: bool) {
    let mut text = format!("{who}Error: {e}\n");
    for cause in e.chain().skip(1) {
        text.push_str(&format!("Caused by: {cause}\n"));
    }
    if backtrace {
        text.push_str(&format!("\nBacktrace:\n{}\n", e.backtrace()));
    }
    eprint!("{text}");
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Tokenize(args) => tokenize::run(args),
        Command::Render(args) => render::run(args),
        // These two know their thread count only from their arguments or config.
        Command::Train(args) => train::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Eval(args) => on_pool(args.model.threads.threads, || eval::run(args)),
        Command::Generate(args) => on_pool(args.model.threads.threads, || generate::run(args)),
        Command::Chat(args) => on_pool(args.model.threads.threads, || chat::run(args)),
        Command::Merge(args) => merge::run(args),
        Command::Export(args) => on_pool(args.model.threads.threads, || export::run(args)),
        Command::EvalPoems(args) => on_pool(args.model.threads.threads, || quality::poems(args)),
        Command::EvalAnswers(args) => {
            on_pool(args.model.threads.threads, || quality::answers(args))
        }
    }
}

/// Runs `f` on a worker thread of rayon's global pool, of `threads` threads (default: candle's,
/// the physical cores or the process's CPU mask; rayon's own default would be the logical CPUs,
/// and candle's matmul and our kernels would then split work differently). The kernels and
/// candle's ops split their work with rayon; called from a thread outside the pool, each such op
/// queues its job for a worker and sleeps on a futex until it is done, a handoff per op (about 19 per generated token of a 4-layer model). Called from a
/// worker, an op runs in place and splits only when another worker is idle to steal.
fn on_pool<R: Send>(threads: Option<usize>, f: impl FnOnce() -> R + Send) -> R {
    // candle's matmul reads `RAYON_NUM_THREADS` on every call, the pool once when it is built;
    // candle's default honours a `RAYON_NUM_THREADS` the user set.
    let n = threads.unwrap_or_else(candle_core::utils::get_num_threads);
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    // The main thread's stack size, not rayon's 2 MiB default: templates and JSON recurse.
    // An error means the pool exists already (only in tests: one command per process).
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .stack_size(8 << 20)
        .build_global();
    rayon::scope(|_| f())
}

/// Training allocates and frees tensors of megabytes in every op. By default glibc serves blocks
/// above 128 KiB with `mmap` and returns them on free, so each op would page-fault and have the
/// kernel zero its output afresh (a quarter of a training step). So blocks up to glibc's largest
/// mmap threshold (32 MiB) come from the heap, which is never trimmed, and `M_MMAP_MAX = 0`
/// sends the larger ones (a nanoGPT's attention probabilities, the output layer's logit chunks)
/// there too, for about 2% more peak memory; jemalloc and mimalloc do no better. Blocks over
/// 256 MiB are mapped by `alloc.rs`.
///
/// One arena: commands run on rayon's workers (`on_pool`), and glibc gives each new thread an
/// arena of its own, made of 64 MiB mappings that it unmaps whenever one empties, whatever the
/// trim threshold, so each op's output would fault in fresh zeroed pages again. The main arena
/// grows by `brk` and is never trimmed.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called first thing in main, before any other thread exists or anything was
    // allocated through the settings being changed.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn commands_run_on_a_pool_worker() {
        assert_eq!(rayon::current_thread_index(), None);
        let (index, threads) = super::on_pool(Some(3), || {
            (rayon::current_thread_index(), rayon::current_num_threads())
        });
        assert!(index.is_some());
        assert_eq!(
            threads, 3,
            "the pool has the threads asked for, not the CPU count"
        );
    }
}
