//! `sft render` end to end: the `--json` line format and `--report` that scripts rely on.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sft_tokenizer::{CharRoles, CharTokenizer, Tokenizer, POEM_SPECIALS};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

fn sft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sft"))
        .arg("render")
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn ok_stdout(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A scratch directory unique to this test process and name.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sft-render-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn json_lines_match_transformers_goldens() {
    // Conversations from the golden file, written as a `messages` JSONL file.
    let golden = std::fs::read_to_string(data_dir().join("golden/chat_templates.jsonl")).unwrap();
    let rows: Vec<Value> = golden
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["template"] == "qwen3" && r["variables"] == serde_json::json!({}))
        .collect();
    let dir = scratch("golden");
    let data = dir.join("chats.jsonl");
    let lines: Vec<String> = rows
        .iter()
        .map(|r| serde_json::json!({"messages": r["messages"], "tools": r["tools"]}).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let tok_dir = data_dir().join("qwen3-tokenizer");
    let stdout = ok_stdout(sft(&[
        "--model",
        path(&tok_dir),
        "--data",
        path(&data),
        "--json",
    ]));
    let out: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out.len(), rows.len());
    for (got, want) in out.iter().zip(&rows) {
        assert_eq!(
            got.as_object().unwrap().len(),
            3,
            "exactly input_ids, loss_mask, text"
        );
        assert_eq!(got["text"], want["text"], "{}", want["case"]);
        assert_eq!(got["input_ids"], want["ids"], "{}", want["case"]);
        assert_eq!(got["loss_mask"], want["assistant_mask"], "{}", want["case"]);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn json_lines_for_mixed_formats_and_train_on_all() {
    let tok_dir = data_dir().join("qwen3-tokenizer");
    let data = data_dir().join("jsonl/mixed.jsonl");
    let args = [
        "--tokenizer",
        path(&tok_dir),
        "--data",
        path(&data),
        "--json",
    ];
    let stdout = ok_stdout(sft(&args));
    let out: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out.len(), 7);
    let tok = Tokenizer::from_path(&tok_dir).unwrap();
    for o in &out {
        let ids = o["input_ids"].as_array().unwrap();
        let mask = o["loss_mask"].as_array().unwrap();
        assert_eq!(ids.len(), mask.len());
        assert!(mask.iter().all(|m| m == 0 || m == 1));
        let ids: Vec<u32> = ids.iter().map(|i| i.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.decode(&ids).unwrap(), o["text"].as_str().unwrap());
    }
    // The prompt/completion line: only " Paris." and the end token are targets.
    assert_eq!(out[4]["text"], "The capital of France is Paris.<|im_end|>");
    let mask: Vec<u64> = out[4]["loss_mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_u64().unwrap())
        .collect();
    assert_eq!(mask.iter().sum::<u64>(), 3);
    let all = ok_stdout(sft(&[&args[..], &["--train-on", "all"]].concat()));
    for line in all.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(v["loss_mask"].as_array().unwrap().iter().all(|m| m == 1));
    }
}

#[test]
fn report_as_text_and_as_json() {
    let tok_dir = data_dir().join("qwen3-tokenizer");
    let data = data_dir().join("jsonl/bad.jsonl");
    let base = [
        "--tokenizer",
        path(&tok_dir),
        "--data",
        path(&data),
        "--format",
        "messages",
        "--skip-invalid",
        "--max-len",
        "20",
    ];
    let json = ok_stdout(sft(&[&base[..], &["--report", "--json"]].concat()));
    assert_eq!(json.lines().count(), 1, "one JSON object");
    let r: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(r["records_read"], 1);
    assert_eq!(r["blank_lines"], 1);
    assert_eq!(r["invalid_skipped"], 9);
    assert_eq!(r["invalid_examples"].as_array().unwrap().len(), 5);
    assert_eq!(r["per_format"]["messages"], 1);
    assert_eq!(
        r["kept"].as_u64().unwrap() + r["dropped"]["too_long"].as_u64().unwrap_or(0),
        1
    );
    let text = ok_stdout(sft(&[&base[..], &["--report"]].concat()));
    assert!(text.contains("invalid skipped  9"), "{text}");
    assert!(
        text.contains(&format!(
            "{}:3: field `messages[2].role`: unknown role \"bot\"",
            data.display()
        )),
        "{text}"
    );
    assert!(!text.contains("---"), "--report prints no samples");
}

#[test]
fn human_view_brackets_targets_when_not_a_terminal() {
    let tok_dir = data_dir().join("qwen3-tokenizer");
    let data = data_dir().join("jsonl/mixed.jsonl");
    let text = ok_stdout(sft(&["--tokenizer", path(&tok_dir), "--data", path(&data)]));
    assert!(text.contains("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[<think>\n\n</think>\n\nHello!<|im_end|>]]"), "{text}");
    assert!(
        text.contains(&format!("--- {}:1 (chat, ", data.display())),
        "{text}"
    );
    assert!(text.contains("== preflight report"), "{text}");
    assert!(!text.contains('\x1b'), "no colour codes in a pipe");
}

#[test]
fn poems_with_a_char_tokenizer() {
    let poems = data_dir().join("poems/poems-small.jsonl");
    let corpus = std::fs::read_to_string(&poems).unwrap();
    let roles = CharRoles {
        bos_token: Some(POEM_SPECIALS.begin.into()),
        eos_token: Some(POEM_SPECIALS.content.1.into()),
        pad_token: Some(POEM_SPECIALS.pad.into()),
        unk_token: POEM_SPECIALS.unk.into(),
    };
    let dir = scratch("poems");
    let tok_path = dir.join("char_tokenizer.json");
    CharTokenizer::from_corpus([corpus.as_str()], &POEM_SPECIALS.all(), roles)
        .unwrap()
        .save(&tok_path)
        .unwrap();
    let stdout = ok_stdout(sft(&[
        "--tokenizer",
        path(&tok_path),
        "--data",
        path(&poems),
        "--json",
        "--metadata-keep-prob",
        "1",
    ]));
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1524);
    let first = &lines[0];
    assert_eq!(
        first["text"],
        "<|begin|><|author|>王維<|/author|><|style|>五言律诗<|/style|><|title|>相和歌辭從軍行<|/title|><|content|>吹角動行人，喧喧行人起。笳鳴馬嘶亂，爭渡金河水。日暮沙漠垂，戰聲煙塵裏。盡繫名王頸，歸來報天子。<|/content|>"
    );
    let mask: Vec<u64> = first["loss_mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_u64().unwrap())
        .collect();
    let content_at = 1 + (1 + 2 + 1) + (1 + 4 + 1) + (1 + 7 + 1);
    assert!(mask[..content_at].iter().all(|&m| m == 0));
    assert!(mask[content_at..].iter().all(|&m| m == 1));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn errors_name_file_line_and_field() {
    let tok_dir = data_dir().join("qwen3-tokenizer");
    let data = data_dir().join("jsonl/bad.jsonl");
    let out = sft(&[
        "--tokenizer",
        path(&tok_dir),
        "--data",
        path(&data),
        "--json",
    ]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no partial output on stdout");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:3: field `messages[2].role`: unknown role \"bot\"",
            data.display()
        )),
        "{stderr}"
    );
    let out = sft(&[
        "--tokenizer",
        path(&tok_dir),
        "--data",
        path(&data),
        "--train-on",
        "bogus",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown train_on \"bogus\""));
    let out = sft(&["--data", path(&data)]);
    assert!(!out.status.success(), "a tokenizer or model is required");
}
