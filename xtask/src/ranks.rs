//! `cargo xtask bench --ranks`: data-parallel training on this machine (`sft` built with its
//! `mpi` feature, launched by Open MPI's `mpirun`), and what to expect on several.
//!
//! 1. The nanopoet pretraining config, the same global batch two ways: one process with two
//!    threads and `grad_accum = 2` (1x2), and two ranks of one thread each (2x1); time per step,
//!    tokens/s and the all-reduce's share of a step, from the runs' `metrics.jsonl`.
//! 2. The all-reduce of the Qwen2.5-0.5B shape's gradients (494M f32) between two ranks
//!    (`sft bench allreduce`), and one optimizer step of that model on one thread
//!    (`sft bench train`): from the two, the share of a step the sum would take over a network
//!    of a given bandwidth, where a ring all-reduce sends and receives `2 (N - 1) / N` times the
//!    gradients' bytes per rank.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use serde_json::Value;

/// Optimizer steps of each training run; the first is left out of the timing (it warms the
/// allocator and pages in the model).
const STEPS: u64 = 12;

pub(crate) fn bench() -> anyhow::Result<()> {
    let sft = crate::build_sft_with(&["mpi"])?;
    let dir = crate::project_root().join("target/bench/ranks");
    std::fs::create_dir_all(&dir)?;
    let mut md = String::from(
        "### Data-parallel training on one machine (`cargo xtask bench --ranks`)\n\n\
         `configs/nanopoet-pretrain.toml` (nanopoet GPT, 4 packed rows of 256 per micro-batch), \
         the same 8 rows a step both ways:\n\n\
         | ranks x threads | s/step | tokens/s | all-reduce s/step | all-reduce share |\n|---|---|---|---|---|\n",
    );
    let mut results = vec![];
    for (ranks, threads) in [(1usize, 2usize), (2, 1)] {
        let r = train(&sft, &dir, ranks, threads)?;
        let _ = writeln!(
            md,
            "| {ranks}x{threads} | {:.3} | {:.0} | {:.4} | {:.1}% |",
            r["step_s"].as_f64().unwrap_or(f64::NAN),
            r["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            r["allreduce_s"].as_f64().unwrap_or(0.0),
            100.0 * r["allreduce_share"].as_f64().unwrap_or(0.0)
        );
        results.push(r);
    }
    expected_scaling(&sft, &mut md, &mut results)?;
    let lines: String = results.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.join("results.jsonl"), lines)?;
    std::fs::write(dir.join("report.md"), &md)?;
    println!("{md}");
    eprintln!("written {}", dir.join("report.md").display());
    Ok(())
}

/// `mpirun -np N` (or nothing for one rank) before `sft`; root allowed, as in CI.
fn launch(sft: &Path, ranks: usize) -> Command {
    if ranks == 1 {
        return Command::new(sft);
    }
    let mut c = Command::new("mpirun");
    c.args(["-np", &ranks.to_string()])
        .arg(sft)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

/// One training run of `STEPS` steps: the median time per step after the first, tokens/s, and
/// the all-reduce's median time and share of a step.
fn train(sft: &Path, dir: &Path, ranks: usize, threads: usize) -> anyhow::Result<Value> {
    let out = dir.join(format!("{ranks}x{threads}"));
    let config = crate::project_root().join("configs/nanopoet-pretrain.toml");
    let sets = [
        format!("train.max_steps={STEPS}"),
        format!("train.threads={threads}"),
        format!("train.grad_accum={}", 2 / ranks),
        format!("run.out_dir={:?}", out.display().to_string()),
        "run.log_every=1".into(),
        "eval.samples=[]".into(),
    ];
    let mut cmd = launch(sft, ranks);
    cmd.current_dir(crate::project_root())
        .args(["train", "--overwrite", "--config"])
        .arg(&config);
    for s in &sets {
        cmd.args(["--set", s]);
    }
    eprintln!("$ {cmd:?}");
    let status = cmd.status().context("running sft train")?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    let log = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let steps: Vec<Value> = log
        .lines()
        .map(serde_json::from_str::<Value>)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|v| v["kind"] == "train")
        .collect();
    let field = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let mut step_s: Vec<f64> = steps
        .windows(2)
        .map(|w| field(&w[1], "elapsed_s") - field(&w[0], "elapsed_s"))
        .collect();
    let mut allreduce: Vec<f64> = steps[1..].iter().map(|v| field(v, "allreduce_s")).collect();
    let tokens: f64 = steps[1..].iter().map(|v| field(v, "tokens")).sum();
    let total: f64 = step_s.iter().sum();
    let (step, reduce) = (
        sft::bench::median(&mut step_s),
        sft::bench::median(&mut allreduce),
    );
    Ok(serde_json::json!({
        "bench": "ranks", "ranks": ranks, "threads": threads, "steps": STEPS,
        "step_s": step, "tokens_per_s": tokens / total,
        "allreduce_s": reduce, "allreduce_share": reduce / step,
    }))
}

/// The 0.5B model's all-reduce between two ranks here, its step on one thread, and the share
/// of a step the sum would take over networks of 10 and 100 Gb/s for 2 to 16 machines.
fn expected_scaling(sft: &Path, md: &mut String, results: &mut Vec<Value>) -> anyhow::Result<()> {
    let preset = ["--preset", "qwen2.5-0.5b", "--vocab-size", "151936"];
    let reduce = crate::json_output(
        launch(sft, 2)
            .args(["bench", "allreduce", "--json", "--threads", "1"])
            .args(preset),
    )?;
    let step = crate::json_output(
        Command::new(sft)
            .args(["bench", "train", "--json"])
            .args(preset)
            .args([
                "--batch-size",
                "1",
                "--seq-len",
                "256",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--threads",
                "1",
            ]),
    )?;
    let bytes = reduce["bytes"].as_f64().unwrap_or(f64::NAN);
    let local_s = reduce["seconds_median"].as_f64().unwrap_or(f64::NAN);
    let step_s = step["step_s_median"].as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        md,
        "\nQwen2.5-0.5B shape: summing its gradients ({:.2} GB of f32) between two ranks on this machine took {local_s:.2} s ({}); one optimizer step of 1x256 tokens on one thread {step_s:.1} s. \
         Over a network a ring all-reduce sends and receives 2 (N - 1) / N x {:.2} GB per machine, so a step of N machines spends about that over the bandwidth in the sum \
         (without overlap with backward; the share of the step, and the speed-up over one machine with the same global batch):\n\n\
         | machines | 10 Gb/s | 100 Gb/s |\n|---|---|---|",
        bytes / 1e9,
        reduce["transport"].as_str().unwrap_or("?"),
        bytes / 1e9
    );
    for n in [2u32, 4, 8, 16] {
        let cell = |gbit: f64| {
            let sum_s = 2.0 * f64::from(n - 1) / f64::from(n) * bytes * 8.0 / (gbit * 1e9);
            let share = sum_s / (step_s + sum_s);
            format!(
                "{sum_s:.1} s, {:.0}% of the step, {:.1}x",
                100.0 * share,
                f64::from(n) * step_s / (step_s + sum_s)
            )
        };
        let _ = writeln!(md, "| {n} | {} | {} |", cell(10.0), cell(100.0));
    }
    results.push(serde_json::json!({"bench": "allreduce-0.5b", "allreduce": reduce, "step": step}));
    Ok(())
}
