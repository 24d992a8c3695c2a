//! Data-parallel training under `mpirun` (the `mpi` feature; Open MPI's `mpirun` on the PATH):
//! two ranks take the step of one process with the global batch, for full fine-tuning and LoRA;
//! a checkpoint resumes with its rank count only; a rank's error ends the job; SIGUSR1 to
//! `mpirun` stops every rank after the step with a checkpoint; a rank killed with SIGKILL ends
//! the job within seconds, leaves only complete checkpoints, and `--resume` continues. Run by `.ci/run` as
//! `cargo test -p sft-cli --features mpi --test distributed`; what it measured goes to
//! `target/fault-suite/` beside the fault-injection suite's counts.
#![cfg(feature = "mpi")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use sft::checkpoint::{check_resumable, list_checkpoints, TrainerState};

/// Step losses, gradient norms and final weights agree to this (absolute, or relative to
/// values above 1): the sums over the ranks add the same terms in another order, and a batch of
/// 4 rows runs its matrix products in other blocks than two of 2.
const TOLERANCE: f64 = 1e-6;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sft-mpi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `sft ARGS` in one process.
fn sft(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sft"));
    c.args(args).env_remove("RUST_BACKTRACE");
    c
}

/// `mpirun -np N sft ARGS`: more ranks than cores allowed, no core binding (each rank runs one
/// compute thread), and root allowed (CI runs as root).
fn mpirun(ranks: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "-np",
        &ranks.to_string(),
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .arg(env!("CARGO_BIN_EXE_sft"))
    .args(args)
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .env_remove("RUST_BACKTRACE");
    c
}

fn ok(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "stderr:\n{err}");
    err
}

/// Where the suite's numbers go for CI to print.
fn report(name: &str, text: &str) {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("fault-suite");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.txt")), format!("{text}\n")).unwrap();
    eprintln!("{text}");
}

/// The tiny Qwen3 fixture on the mixed chats (8 records), into `out`; `data` goes into `[data]`
/// (a `train =` of its own replaces the default; `MIXED` stands for the chats' path), `extra`
/// follows the `[run]` keys.
fn config(dir: &Path, name: &str, out: &Path, (data, extra): (&str, &str)) -> PathBuf {
    let mixed = data_dir().join("jsonl/mixed.jsonl");
    let train = match data.contains("train =") {
        true => String::new(),
        false => format!("train = [{mixed:?}]"),
    };
    let data = data.replace("MIXED", &format!("{mixed:?}"));
    let text = format!(
        r#"
        [model]
        path = {model:?}
        [tokenizer]
        build = "char"
        specials = "chatml"
        [data]
        {train}
        {data}
        train_on = "assistant"
        max_len = 64
        skip_invalid = true
        [optim]
        # Small: AdamW moves a weight by about lr a step whatever its gradient's size, so a
        # weight whose exact gradient is near zero follows the gradient's rounding, which
        # differs with the batch's shape (4 rows or 2 x 2); at lr 1e-2 the one-process run with
        # batch 4 ends 2.6e-5 away, at 1e-3 2.6e-6, at 1e-4 below 1e-6.
        lr = 0.0001
        [run]
        out_dir = {out:?}
        log_every = 1
        {extra}
        "#,
        model = data_dir().join("models/qwen3"),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// (loss, grad_norm) of each logged step.
fn steps(out: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| {
            (
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The trained tensors of `final/` (the model, or the adapter).
fn weights(out: &Path) -> HashMap<String, Tensor> {
    let dir = out.join("final");
    let file = ["adapter_model.safetensors", "model.safetensors"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
        .expect("final/ holds weights");
    candle_core::safetensors::load(file, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() as f64 / x.abs().max(1.0) as f64)
        .fold(0.0, f64::max)
}

/// The largest differences between two runs: (step loss, gradient norm, final weight).
fn compare(a: &Path, b: &Path) -> (f64, f64, f64) {
    let (sa, sb) = (steps(a), steps(b));
    assert_eq!(sa.len(), sb.len(), "steps logged");
    assert!(!sa.is_empty());
    let rel = |x: f64, y: f64| (x - y).abs() / x.abs().max(1.0);
    let loss = sa
        .iter()
        .zip(&sb)
        .map(|(x, y)| rel(x.0, y.0))
        .fold(0.0, f64::max);
    let norm = sa
        .iter()
        .zip(&sb)
        .map(|(x, y)| rel(x.1, y.1))
        .fold(0.0, f64::max);
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.len(), wb.len());
    let weight = wa
        .iter()
        .map(|(name, t)| max_diff(t, &wb[name]))
        .fold(0.0, f64::max);
    (loss, norm, weight)
}

/// Two ranks of batch 2 against one process of batch 4 and one of batch 2 with accumulation
/// 2, for `extra` (full fine-tuning, or a `[lora]` section); the largest differences.
fn equal_to_one_process(name: &str, (data, extra): (&str, &str), twice_the_batch: bool) -> String {
    let dir = scratch(name);
    let run = |label: &str, settings: &str| {
        let out = dir.join(label);
        let cfg = config(&dir, label, &out, (data, &format!("{settings}\n{extra}")));
        (out, cfg)
    };
    let train = "[train]\nmax_steps = 4\nthreads = 1\nbatch_size = 2";
    let (ranks2, cfg) = run("ranks2", train);
    let err = ok(mpirun(2, &["train", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap());
    assert!(err.contains("data-parallel: 2 ranks"), "{err}");
    // Rank 0 alone logs: each step once.
    assert_eq!(steps(&ranks2).len(), 4);
    let mut lines = vec![];
    let mut others = vec![(
        "grad_accum = 2",
        "[train]\nmax_steps = 4\nthreads = 1\nbatch_size = 2\ngrad_accum = 2",
    )];
    if twice_the_batch {
        others.push((
            "batch_size = 4",
            "[train]\nmax_steps = 4\nthreads = 1\nbatch_size = 4",
        ));
    }
    for (i, (label, settings)) in others.into_iter().enumerate() {
        let (out, cfg) = run(&format!("one{i}"), settings);
        ok(sft(&["train", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap());
        let (loss, norm, weight) = compare(&ranks2, &out);
        assert!(
            loss <= TOLERANCE && norm <= TOLERANCE && weight <= TOLERANCE,
            "{name}, 2 ranks vs one process with {label}: loss {loss:e}, grad norm {norm:e}, weights {weight:e}"
        );
        lines.push(format!(
            "{name}: 2 ranks x batch 2 vs 1 process with {label}: max difference of step losses {loss:.1e}, gradient norms {norm:.1e}, final weights {weight:.1e} (4 steps)"
        ));
    }
    std::fs::remove_dir_all(&dir).unwrap();
    lines.join("\n")
}

#[test]
fn two_ranks_take_the_step_of_one_process_with_the_global_batch() {
    let mut lines = vec![equal_to_one_process("full", ("", ""), true)];
    // LoRA without dropout: a batch of 4 rows draws other dropout masks than two of 2.
    let lora = "[lora]\nr = 4\nalpha = 8\ntarget_modules = \"all-linear\"";
    lines.push(equal_to_one_process(
        "lora",
        ("", &format!("{lora}\ndropout = 0.0")),
        true,
    ));
    // With dropout, each rank's micro-batch draws the masks one process draws for it.
    lines.push(equal_to_one_process(
        "lora-dropout",
        ("", &format!("{lora}\ndropout = 0.1")),
        false,
    ));
    // Streamed data and a mixture: each rank draws the one process's micro-batches.
    lines.push(equal_to_one_process(
        "streaming",
        ("streaming = true\nshuffle_buffer = 4", ""),
        false,
    ));
    let mixture = "train = [{ path = MIXED, weight = 0.5 }, { path = MIXED, samples = 3 }]";
    lines.push(equal_to_one_process("mixture", (mixture, ""), false));
    report("mpi-equality", &lines.join("\n"));
}

#[test]
fn a_checkpoint_resumes_only_with_its_rank_count_and_an_error_ends_the_job() {
    let dir = scratch("ranks");
    let out = dir.join("out");
    let cfg = config(
        &dir,
        "run",
        &out,
        ("", "[train]\nmax_steps = 2\nthreads = 1\nbatch_size = 2"),
    );
    ok(mpirun(2, &["train", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap());
    let state = TrainerState::read(&out.join("checkpoint-000002")).unwrap();
    assert_eq!(state.ranks, 2);
    // A fresh run into the used directory fails on rank 0 alone (the others read nothing
    // there): it names itself and ends the job instead of leaving rank 1 waiting.
    let started = Instant::now();
    let again = mpirun(2, &["train", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("rank 0 of 2: Error: ") && err.contains("holds another run's files"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "{err}");
    let more = ["--set", "train.max_steps=3"];
    let out_arg = out.to_str().unwrap();
    let refused = sft(&["train", "--resume", out_arg])
        .args(more)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("trained with 2 rank(s), this one has 1"),
        "{err}"
    );
    // The same count continues it.
    ok(mpirun(2, &["train", "--resume", out_arg])
        .args(more)
        .output()
        .unwrap());
    assert_eq!(steps(&out).len(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The process id of rank `rank` of the job whose command line names `marker`.
fn rank_pid(marker: &str, rank: usize) -> Option<i32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let has = |bytes: &[u8], s: &str| bytes.split(|&b| b == 0).any(|w| w == s.as_bytes());
        let is_sft = cmdline
            .split(|&b| b == 0)
            .next()
            .is_some_and(|exe| exe.ends_with(b"/sft"));
        if is_sft && has(&cmdline, marker) && has(&environ, &want) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes() {
    const STEPS: u64 = 300;
    let dir = scratch("kill");
    let out = dir.join("out");
    // `extra` begins inside [run].
    let extra =
        format!("save_every = 5\n[train]\nmax_steps = {STEPS}\nthreads = 1\nbatch_size = 2");
    let cfg = config(&dir, "run", &out, ("", &extra))
        .to_str()
        .unwrap()
        .to_string();
    let started = Instant::now();
    let mut job = mpirun(2, &["train", "--config", &cfg])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill rank 1 once the run has saved twice (its process found first, so that the kill
    // follows the second save at once).
    let mut pid = None;
    while pid.is_none() || !out.join("checkpoint-000010").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint-000010"
        );
        assert!(job.try_wait().unwrap().is_none(), "the job ended early");
        pid = pid.or_else(|| rank_pid(&cfg, 1));
        std::thread::sleep(Duration::from_millis(2));
    }
    let pid = pid.expect("rank 1's process");
    let killed = Instant::now();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let output = loop {
        if job.try_wait().unwrap().is_some() {
            break job.wait_with_output().unwrap();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "the job still runs 30 s after a rank was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let ended_s = killed.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{err}");
    assert!(
        err.contains("rank 1") && err.contains("signal 9"),
        "mpirun names the dead rank:\n{err}"
    );
    // Only complete checkpoints, and the last one before the end.
    let saved = list_checkpoints(&out).unwrap();
    assert!(!saved.is_empty());
    for (_, ck) in &saved {
        check_resumable(ck).unwrap_or_else(|e| panic!("{e}"));
    }
    let (last, _) = *saved.last().unwrap();
    assert!(last < STEPS, "the run ended by itself before the kill");
    ok(mpirun(2, &["train", "--resume", out.to_str().unwrap()])
        .output()
        .unwrap());
    let state = TrainerState::read(&out.join(format!("checkpoint-{STEPS:06}"))).unwrap();
    assert_eq!(state.step, STEPS);
    let logged: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        logged,
        (1..=STEPS).collect::<Vec<_>>(),
        "each step logged once"
    );
    let first_line = err
        .lines()
        .find(|l| l.contains("rank 1") && l.contains("signal 9"))
        .unwrap_or_default()
        .trim()
        .to_string();
    report(
        "mpi-kill",
        &format!(
            "mpirun -np 2: rank 1 killed with SIGKILL after checkpoint {last}; the job ended {ended_s:.1} s later (\"{first_line}\"), {} complete checkpoint(s), --resume ran to step {STEPS}",
            saved.len()
        ),
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sigusr1_to_mpirun_stops_every_rank_after_the_step_with_a_checkpoint() {
    let dir = scratch("usr1");
    let out = dir.join("out");
    let extra = "save_every = 100000\n[train]\nmax_steps = 100000\nthreads = 1\nbatch_size = 2";
    let cfg = config(&dir, "run", &out, ("", extra));
    let mut job = mpirun(2, &["train", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let logged = |out: &Path| {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    while logged(&out) < 3 {
        assert!(started.elapsed() < Duration::from_secs(120), "no steps");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(unsafe { libc::kill(job.id() as i32, libc::SIGUSR1) }, 0);
    let sent = Instant::now();
    while job.try_wait().unwrap().is_none() {
        assert!(sent.elapsed() < Duration::from_secs(60), "still running");
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = job.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("interrupted by SIGUSR1 after step"), "{err}");
    // One checkpoint, of the last step taken, which every rank took.
    let saved = list_checkpoints(&out).unwrap();
    assert_eq!(saved.len(), 1, "{err}");
    let (step, ck) = &saved[0];
    check_resumable(ck).unwrap();
    assert_eq!(*step as usize, logged(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Early stopping and the time budget are rank 0's decisions: every rank ends at the step rank 0
/// ends at, and the run finishes as one process's does.
#[test]
fn early_stopping_and_the_time_budget_end_every_rank_together() {
    let dir = scratch("decide");
    let runs = [
        (
            "early",
            "val_ratio = 0.25",
            "eval_every = 1\n[train]\nmax_steps = 50\nthreads = 1\nbatch_size = 2\nearly_stopping = { patience = 1, min_delta = 100.0 }",
        ),
        (
            "budget",
            "",
            "[train]\nmax_time = \"2s\"\nepochs = 1000\nthreads = 1\nbatch_size = 2",
        ),
    ];
    for (name, data, extra) in runs {
        let out = dir.join(name);
        let cfg = config(&dir, name, &out, (data, extra));
        let err = ok(mpirun(2, &["train", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap());
        let taken = steps(&out).len() as u64;
        let last = list_checkpoints(&out).unwrap().last().unwrap().0;
        assert_eq!(last, taken, "{name}: {err}");
        match name {
            // The first evaluation sets the best; the second cannot improve by 100.
            "early" => {
                assert_eq!(taken, 2, "{err}");
                assert!(err.contains("early stopping"), "{err}");
            }
            _ => assert!(taken > 1 && err.contains("time budget"), "{err}"),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `sft bench allreduce` sums gradients of every parameter's shape over the ranks, and says so
/// on rank 0 alone.
#[test]
fn bench_allreduce_sums_every_parameter_over_the_ranks() {
    let out = mpirun(
        2,
        &[
            "bench",
            "allreduce",
            "--preset",
            "tiny-qwen2",
            "--vocab-size",
            "64",
            "--rounds",
            "2",
            "--json",
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let r: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let mut json = sft_model::presets::preset("tiny-qwen2").unwrap();
    json["vocab_size"] = 64.into();
    let cfg = sft_model::ModelConfig::from_json_str(&json.to_string()).unwrap();
    assert_eq!(r["ranks"], 2);
    assert_eq!(r["elements"].as_u64().unwrap() as usize, cfg.num_params());
    assert_eq!(r["seconds"].as_array().unwrap().len(), 2);
}
