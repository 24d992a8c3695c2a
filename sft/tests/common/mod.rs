//! Helpers shared by the integration tests of `sft` (each test file is its own crate and uses
//! what it needs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

/// A fresh, empty directory for one test (per process: each test file is its own binary).
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sft-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The first `n` poems of the bundled subset, as `dir/poems.jsonl`.
pub fn poems(dir: &Path, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(data_dir().join("poems/poems-small.jsonl")).unwrap();
    let path = dir.join("poems.jsonl");
    let lines: Vec<&str> = text.lines().take(n).collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}
