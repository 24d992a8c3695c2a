//! `sft tokenize` end to end: the command-line contract scripts rely on.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

fn sft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sft"))
}

#[test]
fn ids_from_arguments_match_transformers() {
    let out = sft()
        .args(["tokenize", "--tokenizer"])
        .arg(data_dir().join("qwen3-tokenizer"))
        .args([
            "Hello, world!",
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0], r#"{"ids":[9707,11,1879,0]}"#);
    let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(v["ids"][0], 151644);
}

#[test]
fn stdin_lines_and_tokens_flag() {
    let mut child = sft()
        .args(["tokenize", "--tokens", "--tokenizer"])
        .arg(data_dir().join("qwen3-tokenizer/tokenizer.json"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all("Hello, world!\n床前明月光\n".as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0]["tokens"],
        serde_json::json!(["Hello", ",", "Ġworld", "!"])
    );
    assert_eq!(
        rows[1]["ids"].as_array().unwrap().len(),
        rows[1]["tokens"].as_array().unwrap().len()
    );
}

#[test]
fn a_missing_tokenizer_is_a_clear_error() {
    let out = sft()
        .args(["tokenize", "--tokenizer", "/no/such/dir", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/no/such/dir"), "{stderr}");
}
