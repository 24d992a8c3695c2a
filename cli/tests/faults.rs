//! Fault injection on the `sft` binary: SIGKILL at seeded random moments with every-step saves
//! and rotation, SIGINT/SIGTERM, a write that fails, and the error output. What each test
//! survived is written to `target/fault-suite/` (`.ci/run` prints it).

use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use sft::checkpoint::{check_resumable, list_checkpoints, resolve_resume, TrainerState};
use sft_model::Model;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

fn sft() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sft"));
    c.env_remove("RUST_BACKTRACE").env_remove("SFT_BACKTRACE");
    c
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sft-cli-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Where the suite's counts go for CI to print.
fn report(name: &str, text: &str) {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("fault-suite");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.txt")), format!("{text}\n")).unwrap();
    eprintln!("{text}");
}

/// A tiny from-scratch run, saving every step.
fn write_config(dir: &Path, max_steps: u64, extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(data_dir().join("poems/poems-small.jsonl")).unwrap();
    let data = dir.join("poems.jsonl");
    std::fs::write(&data, text.lines().take(40).collect::<Vec<_>>().join("\n")).unwrap();
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [model]
            preset = "tiny-gpt"
            init = {{ n_embd = 32, dropout = 0.1 }}
            [tokenizer]
            build = "char"
            [data]
            train = ["{}"]
            max_len = 96
            [optim]
            lr = 3e-3
            [train]
            batch_size = 4
            max_steps = {max_steps}
            threads = 1
            [run]
            out_dir = "{}"
            log_every = 1
            save_every = 1
            keep_last = 3
            {extra}
            "#,
            data.display(),
            dir.join("out").display()
        ),
    )
    .unwrap();
    config
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "status {:?}, stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn final_weights(out_dir: &Path) -> Vec<u8> {
    std::fs::read(out_dir.join("final/model.safetensors")).unwrap()
}

/// Every `checkpoint-*` directory is complete and loads: model, tokenizer, trainer state.
fn all_checkpoints_load(out_dir: &Path) -> usize {
    let all = list_checkpoints(out_dir).unwrap();
    for (_, dir) in &all {
        check_resumable(dir).unwrap_or_else(|e| panic!("{e}"));
        Model::load(dir, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
        sft_tokenizer::Tokenizer::from_path(dir).unwrap_or_else(|e| panic!("{e}"));
        TrainerState::read(dir).unwrap_or_else(|e| panic!("{e}"));
    }
    all.len()
}

/// splitmix64: the kill schedule is a pure function of the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A running `sft train`: the steps it reports arrive on `steps` as it goes; `stderr` gives its
/// whole stderr once it has exited.
struct Running {
    child: Child,
    steps: mpsc::Receiver<u64>,
    stderr: std::thread::JoinHandle<String>,
}

fn spawn_train(args: &[&str]) -> Running {
    let mut child = sft()
        .arg("train")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, steps) = mpsc::channel();
    let stderr = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // "step      3  epoch 0.30  loss ..." after each step.
            if let Some(rest) = line.strip_prefix("step ") {
                if rest.contains("epoch") {
                    if let Some(step) = rest.split_whitespace().next().and_then(|s| s.parse().ok())
                    {
                        let _ = tx.send(step);
                    }
                }
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    Running {
        child,
        steps,
        stderr,
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing_and_resumes_bit_identically() {
    let dir = scratch("kill9");
    const STEPS: u64 = 100;
    // Kills before the run is let finish: enough for every moment of a step to come up.
    const KILLS: usize = 32;
    let config = write_config(&dir, STEPS, "");
    let config_arg = config.to_str().unwrap();
    let out = dir.join("out");

    // The uninterrupted run, for the final weights to compare against.
    let reference_dir = dir.join("reference");
    let reference = sft()
        .args(["train", "--config", config_arg, "--set"])
        .arg(format!("run.out_dir={}", reference_dir.display()))
        .output()
        .unwrap();
    ok(&reference);

    let mut rng = Rng(0x5eed_f00d);
    let (mut kills, mut startup_kills, mut reached) = (0, 0, 0);
    let started = Instant::now();
    loop {
        let resumable = resolve_resume(&out).is_ok();
        let args: Vec<&str> = if resumable {
            vec!["--config", config_arg, "--resume", out.to_str().unwrap()]
        } else {
            vec!["--config", config_arg, "--overwrite"]
        };
        let Running {
            mut child,
            steps,
            stderr,
        } = spawn_train(&args);
        // One kill in four lands before the first step (data, tokenizer, model, cleanup); the
        // rest 1 to 3 steps on, at a random moment in the step or save that follows.
        let before_first_step = rng.below(4) == 0;
        let target = reached + 1 + rng.below(3);
        // After KILLS kills the run is let go to the end.
        let mut finished = kills >= KILLS;
        if !finished && before_first_step {
            std::thread::sleep(Duration::from_micros(rng.below(60_000)));
        } else if !finished {
            loop {
                match steps.recv_timeout(Duration::from_secs(60)) {
                    Ok(step) if step >= target => break,
                    Ok(_) => {}
                    Err(_) => {
                        finished = true;
                        break;
                    }
                }
            }
            std::thread::sleep(Duration::from_micros(rng.below(12_000)));
        }
        if !finished && child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
        }
        let status = child.wait().unwrap();
        let stderr = stderr.join().unwrap();
        if status.signal().is_none() {
            // It ran to the end (or exited just before the kill): it must have succeeded.
            assert!(status.success(), "{status:?}\n{stderr}");
            break;
        }
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        kills += 1;
        startup_kills += usize::from(before_first_step);
        all_checkpoints_load(&out);
        reached = list_checkpoints(&out)
            .unwrap()
            .last()
            .map_or(0, |(step, _)| *step);
        assert!(started.elapsed() < Duration::from_secs(240), "too slow");
    }
    // The last run ended by itself: it must have reached the end, with the uninterrupted run's
    // weights byte for byte.
    assert!(kills >= 20, "only {kills} kills before the run finished");
    all_checkpoints_load(&out);
    let state = TrainerState::read(&out.join(format!("checkpoint-{STEPS:06}"))).unwrap();
    assert_eq!(state.step, STEPS);
    assert_eq!(final_weights(&out), final_weights(&reference_dir));
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let logged: Vec<u64> = log
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
    report(
        "kills",
        &format!(
            "kill -9: {kills} kills survived ({startup_kills} before the first step), every checkpoint loaded after each, final weights identical to the uninterrupted run's ({:.1} s)",
            started.elapsed().as_secs_f64()
        ),
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sends `signals` once the run has taken `after` steps; returns its output.
fn signal_after(args: &[&str], after: u64, signals: &[i32]) -> Output {
    let mut run = spawn_train(args);
    for _ in 0..after {
        run.steps.recv_timeout(Duration::from_secs(60)).unwrap();
    }
    for &sig in signals {
        // SAFETY: signals a child of this process, which has not been waited for yet.
        assert_eq!(unsafe { libc::kill(run.child.id() as i32, sig) }, 0);
    }
    let status = run.child.wait().unwrap();
    let mut stdout = String::new();
    std::io::Read::read_to_string(run.child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    Output {
        status,
        stdout: stdout.into_bytes(),
        stderr: run.stderr.join().unwrap().into_bytes(),
    }
}

#[test]
fn sigint_and_sigterm_save_the_step_and_resume_to_the_same_weights() {
    let dir = scratch("sigint");
    // No periodic saves: what is saved is the interrupt's doing.
    let config = write_config(&dir, 400, "");
    let config_arg = config.to_str().unwrap();
    let no_saves = "run.save_every=100000";
    let reference_dir = dir.join("reference");
    ok(&sft()
        .args(["train", "--config", config_arg, "--set", no_saves, "--set"])
        .arg(format!("run.out_dir={}", reference_dir.display()))
        .output()
        .unwrap());
    let out = dir.join("out");

    let first = signal_after(
        &["--config", config_arg, "--set", no_saves],
        3,
        &[libc::SIGINT],
    );
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert_eq!(first.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted by SIGINT after step"),
        "{stderr}"
    );
    let resume_line = stderr
        .lines()
        .find(|l| l.starts_with("resume with: sft train"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        resume_line.ends_with(&format!("--config {config_arg} --resume {}", out.display())),
        "{resume_line}"
    );
    let saved = list_checkpoints(&out).unwrap();
    assert_eq!(saved.len(), 1, "{stderr}");
    check_resumable(&saved[0].1).unwrap();
    assert!(!out.join("final").exists());

    // SIGTERM on the resumed run: 143, another checkpoint.
    let second = signal_after(
        &[
            "--config",
            config_arg,
            "--set",
            no_saves,
            "--resume",
            out.to_str().unwrap(),
        ],
        2,
        &[libc::SIGTERM],
    );
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("interrupted by SIGTERM"), "{stderr}");
    assert!(list_checkpoints(&out).unwrap().len() >= 2);

    // The printed command, as given (plus the same --set), finishes the run with the
    // uninterrupted run's weights.
    ok(&sft()
        .args([
            "train", "--config", config_arg, "--set", no_saves, "--resume",
        ])
        .arg(&out)
        .output()
        .unwrap());
    assert_eq!(final_weights(&out), final_weights(&reference_dir));

    // Two Ctrl-C in a row: the second exits at once, still with 130.
    let twice = signal_after(
        &["--config", config_arg, "--set", no_saves, "--overwrite"],
        1,
        &[libc::SIGINT, libc::SIGINT],
    );
    assert_eq!(twice.status.code(), Some(130));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_failed_write_stops_the_run_naming_the_path_and_keeps_the_last_checkpoint() {
    let dir = scratch("write");
    let config = write_config(&dir, 3, "");
    let config_arg = config.to_str().unwrap();
    let out = dir.join("out");
    ok(&sft()
        .args(["train", "--config", config_arg])
        .output()
        .unwrap());
    let last = out.join("checkpoint-000003");
    let before: Vec<(String, Vec<u8>)> = std::fs::read_dir(&last)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    let model_size = std::fs::metadata(last.join("model.safetensors"))
        .unwrap()
        .len();

    // A real write error, root or not: files may not grow past half the model's size, so the
    // next checkpoint's weights cannot be written (the log and config lines still can).
    let limit = model_size / 2;
    let mut cmd = sft();
    cmd.args([
        "train",
        "--config",
        config_arg,
        "--set",
        "train.max_steps=6",
        "--resume",
    ])
    .arg(&out);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let rlim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &rlim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Without this, SIGXFSZ would kill the process instead of the write failing.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let failed = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("Error: training run "))
            && stderr.contains(".checkpoint-000004.tmp-")
            && stderr.contains("File too large"),
        "{stderr}"
    );
    // The previous checkpoint is intact, nothing half-written is left, and it resumes.
    for (name, bytes) in &before {
        assert_eq!(&std::fs::read(last.join(name)).unwrap(), bytes, "{name}");
    }
    assert_eq!(
        list_checkpoints(&out)
            .unwrap()
            .into_iter()
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let hidden: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.starts_with('.').then_some(n)
        })
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
    ok(&sft()
        .args([
            "train",
            "--config",
            config_arg,
            "--set",
            "train.max_steps=6",
            "--resume",
        ])
        .arg(&out)
        .output()
        .unwrap());
    report(
        "write_failure",
        &format!("write failure: RLIMIT_FSIZE {limit} B stopped the save of checkpoint 4 with the path named; checkpoint 3 intact and resumed"),
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn errors_print_as_one_chain_without_a_backtrace_unless_asked() {
    let dir = scratch("errors");
    let missing = dir.join("no-such-model");
    let run = |env: &[(&str, &str)]| {
        let mut cmd = sft();
        cmd.args(["eval", "--data", "x.jsonl", "--model"])
            .arg(&missing);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let plain = run(&[("RUST_BACKTRACE", "1")]);
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert_eq!(plain.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("Error: "), "{stderr}");
    assert!(stderr.contains("no-such-model"), "{stderr}");
    assert!(
        !stderr.contains("acktrace") && !stderr.contains(" at ") && !stderr.contains("\n\n"),
        "{stderr}"
    );
    for line in stderr.lines() {
        assert!(
            line.starts_with("Error: ") || line.starts_with("Caused by: "),
            "{stderr}"
        );
    }
    let asked = run(&[("SFT_BACKTRACE", "1")]);
    let stderr = String::from_utf8_lossy(&asked.stderr);
    assert_eq!(asked.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Backtrace:"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
