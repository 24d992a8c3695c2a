//! Reduced versions of the three quality tasks of docs/results.md, through the command line: the
//! same configs, data generator and evaluation commands, on runs of seconds. The full runs
//! measure how well; these check that each path works and that what a run must learn to pass
//! (answers, stopping at the end-of-turn token, poem markers) is learnable at all.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn sft() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sft"));
    c.current_dir(root());
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
    let d = std::env::temp_dir().join(format!("sft-tasks-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// A few generated instruction chats, written as train = test: the run must memorise them.
fn instruction_data(dir: &Path, n: usize) -> PathBuf {
    let rows = sft_tests::tasks::conversations(5, n, &Default::default(), false);
    let path = dir.join("chats.jsonl");
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// Task 2 reduced: `configs/chatml-gpt.toml` with a tiny model on 6 generated chats. Exact match
/// and stopping at <|im_end|> can only reach 100% if the assistant turns and their end-of-turn
/// token are the trained targets.
#[test]
fn instructions_task_reduced() {
    let dir = scratch("instructions");
    let data = instruction_data(&dir, 6);
    let d = data.display();
    let out = dir.join("out");
    ok(sft()
        .args(["train", "--config", "configs/chatml-gpt.toml"])
        .args([
            "--set",
            "model.init={n_layer = 2, n_embd = 64, n_head = 4, dropout = 0.0, block_size = 256}",
        ])
        .args(["--set", &format!("data.train=[\"{d}\"]")])
        .args(["--set", &format!("data.validation=[\"{d}\"]")])
        .args(["--set", "data.max_len=256", "--set", "train.batch_size=6"])
        .args(["--set", "train.max_steps=150", "--set", "optim.lr=5e-3"])
        .args([
            "--set",
            "schedule.warmup_steps=10",
            "--set",
            "run.eval_every=1000",
        ])
        .args(["--set", &format!("run.out_dir={}", out.display())])
        .output()
        .unwrap());
    // The built char vocabulary covers the template's own text (role names, newlines) too.
    let preflight: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("preflight.json")).unwrap())
            .unwrap();
    assert_eq!(preflight["unknown_tokens"], 0, "{preflight}");
    let r = json(&ok(sft()
        .args(["eval-answers", "--json", "--threads", "1", "--model"])
        .arg(out.join("final"))
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap()));
    assert_eq!(r["n"], 6);
    assert_eq!(r["exact_match"], 1.0, "{r}");
    assert_eq!(r["stopped"], 1.0, "{r}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Task 3 reduced: a fresh Qwen2-architecture model with the real Qwen tokenizer and chat
/// template; the exported checkpoint reloads in `sft eval` and greedy answers end at <|im_end|>.
#[test]
fn qwen_layout_task_reduced() {
    let dir = scratch("qwen");
    let data = instruction_data(&dir, 4);
    let d = data.display();
    let out = dir.join("out");
    let config = dir.join("qwen.toml");
    let base = std::fs::read_to_string(root().join("configs/qwen-layout.toml")).unwrap();
    // The task's config with a fresh tiny model instead of the init-model checkpoint.
    let body = base.replace(
        "path = \"runs/models/tiny-qwen2\"",
        "preset = \"tiny-qwen2\"\ninit = { hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2 }",
    );
    let body = body.replace(
        "[data]",
        "[tokenizer]\npath = \"tests/data/qwen3-tokenizer\"\n\n[data]",
    );
    assert_ne!(body, base);
    std::fs::write(&config, body).unwrap();
    ok(sft()
        .args(["train", "--config"])
        .arg(&config)
        .args(["--set", &format!("data.train=[\"{d}\"]")])
        .args(["--set", &format!("data.validation=[\"{d}\"]")])
        .args(["--set", "train.batch_size=4", "--set", "train.max_steps=80"])
        .args(["--set", "optim.lr=1e-2", "--set", "schedule.warmup_steps=5"])
        .args([
            "--set",
            "data.packing=false",
            "--set",
            "run.eval_every=1000",
        ])
        .args(["--set", &format!("run.out_dir={}", out.display())])
        .output()
        .unwrap());
    let model = out.join("final");
    let eval = json(&ok(sft()
        .args(["eval", "--json", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap()));
    assert!(eval["loss"].as_f64().unwrap() < 1.0, "{eval}");
    let r = json(&ok(sft()
        .args(["eval-answers", "--json", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap()));
    assert_eq!(r["stopped"], 1.0, "greedy answers end at <|im_end|>: {r}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Task 1 reduced: the nanopoet configs on a few poems, then `sft eval-poems` on base and tuned.
#[test]
fn poems_task_reduced() {
    let dir = scratch("poems");
    let poems = std::fs::read_to_string(root().join("tests/data/poems/poems-small.jsonl")).unwrap();
    let data = dir.join("poems.jsonl");
    // 50 shi and every 浣溪沙 (a ci tune), so both kinds of check have their patterns.
    let lines: Vec<&str> = poems
        .lines()
        .take(50)
        .chain(poems.lines().skip(50).filter(|l| l.contains("\"浣溪沙\"")))
        .collect();
    assert!(lines.len() > 55);
    std::fs::write(&data, lines.join("\n")).unwrap();
    let d = data.display();
    let small = "model.init={n_layer = 1, n_embd = 32, n_head = 2}";
    let pre = dir.join("pre");
    ok(sft()
        .args([
            "train",
            "--config",
            "configs/nanopoet-pretrain.toml",
            "--set",
            small,
        ])
        .args([
            "--set",
            &format!("data.train=[\"{d}\"]"),
            "--set",
            "train.max_steps=4",
        ])
        .args(["--set", &format!("run.out_dir={}", pre.display())])
        .output()
        .unwrap());
    let tuned = dir.join("sft");
    ok(sft()
        .args(["train", "--config", "configs/nanopoet-sft.toml"])
        .args([
            "--set",
            &format!("model.path={}", pre.join("final").display()),
        ])
        .args([
            "--set",
            &format!("data.train=[\"{d}\"]"),
            "--set",
            "train.max_steps=4",
        ])
        .args(["--set", &format!("run.out_dir={}", tuned.display())])
        .output()
        .unwrap());
    for model in [pre.join("final"), tuned.join("final")] {
        let r = json(&ok(sft()
            .args([
                "eval-poems",
                "--json",
                "--per-style",
                "2",
                "--author-poems",
                "5",
            ])
            .args([
                "--styles",
                "五言绝句,浣溪沙",
                "--max-new-tokens",
                "30",
                "--model",
            ])
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .output()
            .unwrap()));
        let styles = r["styles"].as_array().unwrap();
        assert_eq!(styles.len(), 2, "{r}");
        assert_eq!(styles[0]["kind"], "shi");
        assert_eq!(styles[1]["kind"], "ci");
        for s in styles {
            assert_eq!(s["generated"], 2);
            assert!((0.0..=1.0).contains(&s["rate"].as_f64().unwrap()));
        }
        assert_eq!(r["author"]["poems"], 5, "{r}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
