//! The command line end to end on tiny runs: `sft train` -> `sft eval` / `sft generate` /
//! `sft chat` on what it wrote. Each run takes a couple of seconds.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

fn sft() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sft"));
    c.env_remove("RUST_BACKTRACE");
    c
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sft-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Trains a tiny model with `sft train` and returns its `final/` directory.
fn train(dir: &Path, body: &str) -> PathBuf {
    let config = dir.join("run.toml");
    std::fs::write(&config, body).unwrap();
    let stdout = ok(sft()
        .args(["train", "--config"])
        .arg(&config)
        .output()
        .unwrap());
    assert!(stdout.contains("loss plot"), "{stdout}");
    dir.join("out/final")
}

#[test]
fn poems_train_eval_generate() {
    let dir = scratch("poems");
    let poems = std::fs::read_to_string(data_dir().join("poems/poems-small.jsonl")).unwrap();
    let data = dir.join("poems.jsonl");
    std::fs::write(&data, poems.lines().take(80).collect::<Vec<_>>().join("\n")).unwrap();
    let model = train(
        &dir,
        &format!(
            r#"
            [model]
            preset = "tiny-gpt"
            [tokenizer]
            build = "char"
            [data]
            train = ["{}"]
            val_ratio = 0.1
            [optim]
            lr = 3e-3
            [train]
            batch_size = 4
            max_steps = 6
            [run]
            out_dir = "{}"
            log_every = 2
            "#,
            data.display(),
            dir.join("out").display()
        ),
    );
    // `sft eval --json`: exactly the documented keys, and the same numbers on 1 and 2 threads.
    let eval = |threads: &str| {
        ok(sft()
            .args(["eval", "--json", "--threads", threads, "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .output()
            .unwrap())
    };
    let stdout = eval("1");
    assert_eq!(stdout, eval("2"));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(v["loss"].as_f64().unwrap() > 0.0);
    assert!(v["targets"].as_u64().unwrap() > 100);
    assert!((0.0..=1.0).contains(&v["token_accuracy"].as_f64().unwrap()));
    // `sft generate --record ... --json --num-samples 3`: one line per sample, markers removed.
    let stdout = ok(sft()
        .args([
            "generate",
            "--record",
            r#"{"style":"七言绝句","author":"李白"}"#,
            "--json",
        ])
        .args([
            "--num-samples",
            "3",
            "--temperature",
            "1.0",
            "--max-new-tokens",
            "20",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap());
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    for r in &rows {
        let text = r["text"].as_str().unwrap();
        assert!(!text.contains("<|"), "markers must be removed: {text}");
        assert!(!r["ids"].as_array().unwrap().is_empty());
    }
    assert_ne!(
        rows[0]["ids"], rows[1]["ids"],
        "samples are seeded per index"
    );
    // The same seed gives the same samples.
    let again = ok(sft()
        .args([
            "generate",
            "--record",
            r#"{"style":"七言绝句","author":"李白"}"#,
            "--json",
        ])
        .args([
            "--num-samples",
            "3",
            "--temperature",
            "1.0",
            "--max-new-tokens",
            "20",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap());
    assert_eq!(stdout, again);
    // --compare runs both models.
    let stdout = ok(sft()
        .args([
            "generate",
            "--record",
            "{}",
            "--json",
            "--max-new-tokens",
            "5",
            "--model",
        ])
        .arg(&model)
        .arg("--compare")
        .arg(dir.join("out/checkpoint-000006"))
        .output()
        .unwrap());
    let models: Vec<String> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["model"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(models, ["base", "tuned"]);
    // A bad record is a clear error.
    let out = sft()
        .args(["generate", "--record", r#"{"style": 7}"#, "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("style"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn chat_model_scripted_through_stdin() {
    let dir = scratch("chat");
    let data = dir.join("chat.jsonl");
    let mut lines = String::new();
    for i in 0..40 {
        lines.push_str(&format!(
            "{{\"messages\": [{{\"role\": \"user\", \"content\": \"say {i}\"}}, {{\"role\": \"assistant\", \"content\": \"{i}\"}}]}}\n"
        ));
    }
    std::fs::write(&data, lines).unwrap();
    let model = train(
        &dir,
        &format!(
            r#"
            [model]
            preset = "tiny-gpt"
            [tokenizer]
            build = "char"
            specials = "chatml"
            [data]
            train = ["{}"]
            [optim]
            lr = 3e-3
            [train]
            batch_size = 8
            max_steps = 4
            [run]
            out_dir = "{}"
            "#,
            data.display(),
            dir.join("out").display()
        ),
    );
    let mut child = sft()
        .args([
            "chat",
            "--json",
            "--max-new-tokens",
            "8",
            "--threads",
            "1",
            "--model",
        ])
        .arg(&model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"say 1\nsay 2\n/reset\n/system be brief\nsay 3\n")
        .unwrap();
    let stdout = ok(child.wait_with_output().unwrap());
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3, "{stdout}");
    assert_eq!(rows[0]["user"], "say 1");
    assert_eq!(rows[2]["user"], "say 3");
    assert!(rows
        .iter()
        .all(|r| r["assistant"].is_string() && r["stopped"].is_boolean()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_configs_are_clear_errors() {
    let dir = scratch("badcfg");
    let config = dir.join("bad.toml");
    std::fs::write(&config, "[model]\npreset = \"tiny-gpt\"\n[data]\ntrain = [\"x.jsonl\"]\n[run]\nout_dir = \"o\"\n[optim]\nlearning_rate = 1\n").unwrap();
    let out = sft()
        .args(["train", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("learning_rate") && stderr.contains("bad.toml"),
        "{stderr}"
    );
    let out = sft()
        .args(["train", "--config"])
        .arg(&config)
        .args(["--set", "optim.learning_rate"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("section.key=value"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The README's first command, reduced: both demo stages with a tiny model and a few steps, then
/// the before/after counts for two poems per style.
#[test]
fn bundled_demo_runs_end_to_end() {
    let dir = scratch("demo");
    let out = dir.join("demo");
    let stdout = ok(sft()
        .args(["train", "--out"])
        .arg(&out)
        .args(["--set", "train.max_steps=2", "--set", "run.eval_every=2"])
        .args([
            "--set",
            "pretrain.model.init={n_layer = 1, n_embd = 32, n_head = 2, dropout = 0.0}",
            "--set",
            "sft.check.poems_per_style=2",
        ])
        .output()
        .unwrap());
    for line in [
        "of 2 poems per style",
        "五言绝句: 0/2 -> ",
        "七言绝句: 0/2 -> ",
        "{\"author\":\"李白\",\"style\":\"七言绝句\"}",
        "count again: sft eval-poems",
    ] {
        assert!(stdout.contains(line), "{line} in {stdout}");
    }
    for f in [
        "data/jueju.jsonl",
        "data/LICENSE-chinese-poetry",
        "pretrain/final/char_tokenizer.json",
        "pretrain/loss.svg",
        "sft/final/model.safetensors",
        "sft/metrics.jsonl",
        "sft/loss.svg",
        "sft/checkpoint-000002/optimizer.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // Stage 2 fine-tuned stage 1's model: same architecture, same tokenizer.
    let a = std::fs::read_to_string(out.join("pretrain/final/config.json")).unwrap();
    let b = std::fs::read_to_string(out.join("sft/final/config.json")).unwrap();
    assert_eq!(a, b);

    // `--json`: the two stages' summaries, then the counts, one object a line.
    let stdout = ok(sft()
        .args(["train", "--json", "--out"])
        .arg(&out)
        .args([
            "--set",
            "train.max_steps=1",
            "--set",
            "sft.check.poems_per_style=1",
        ])
        .args([
            "--set",
            "pretrain.model.init={n_layer = 1, n_embd = 32, n_head = 2, dropout = 0.0}",
        ])
        .output()
        .unwrap());
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[..2].iter().all(|s| s["final_model"].is_string()));
    let demo = &lines[2]["demo"];
    for model in ["pretrained", "fine_tuned"] {
        assert_eq!(demo[model][1]["style"], "七言绝句", "{demo}");
        assert_eq!(demo[model][1]["generated"], 1, "{demo}");
    }
    assert_eq!(demo["samples"].as_array().map(Vec::len), Some(6));
    // The "count again" command gives the demo's counts and examples.
    let again = ok(sft()
        .args(["eval-poems", "--json", "--model"])
        .arg(out.join("sft/final"))
        .arg("--data")
        .arg(out.join("data/jueju.jsonl"))
        .args([
            "--styles",
            "五言绝句,七言绝句",
            "--per-style",
            "1",
            "--author-poems",
            "0",
        ])
        .output()
        .unwrap());
    let again: serde_json::Value = serde_json::from_str(again.trim()).unwrap();
    for (i, style) in demo["fine_tuned"].as_array().unwrap().iter().enumerate() {
        for key in ["style", "generated", "compliant", "examples"] {
            assert_eq!(
                again["styles"][i][key], style[key],
                "{key}: {again} vs {demo}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `sft bench train --json` and `sft bench gemm --json`: the keys scripts read, in
/// f32 and in bf16 (the composed ops a GPU runs), and a clear error for a dtype it lacks.
#[test]
fn bench_prints_its_json_contract() {
    let model = data_dir().join("models/qwen2-tied");
    for dtype in ["f32", "bf16"] {
        let out = ok(sft()
            .args([
                "bench",
                "train",
                "--json",
                "--batch-size",
                "2",
                "--seq-len",
                "16",
            ])
            .args([
                "--steps",
                "2",
                "--warmup",
                "0",
                "--threads",
                "1",
                "--dtype",
                dtype,
            ])
            .arg("--model")
            .arg(&model)
            .output()
            .unwrap());
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        for key in [
            "tokens_per_s",
            "step_s_median",
            "peak_rss_mib",
            "forward_s",
            "backward_s",
            "optimizer_s",
            "gflops_per_s",
        ] {
            assert!(
                v[key].as_f64().is_some_and(|x| x > 0.0),
                "{dtype}: {key} in {v}"
            );
        }
        assert_eq!(v["dtype"], dtype);
        assert_eq!(v["device"], "cpu");
        // Without `--dropout` the steps run without it (and a Qwen2 model has none anyway).
        assert_eq!(v["dropout"].as_f64(), Some(0.0), "{v}");
        assert_eq!(
            (v["batch_size"].as_u64(), v["seq_len"].as_u64()),
            (Some(2), Some(16))
        );
    }
    let out = ok(sft()
        .args([
            "bench",
            "gemm",
            "--json",
            "--n",
            "64",
            "--dtype",
            "bf16",
            "--threads",
            "1",
        ])
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["gflops"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    assert_eq!(
        (v["dtype"].as_str(), v["n"].as_u64()),
        (Some("bf16"), Some(64))
    );
    let bad = sft()
        .args(["bench", "gemm", "--dtype", "f8"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("f8") && err.contains("bf16"), "{err}");
}
