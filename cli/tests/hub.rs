//! Hub ids (`Owner/Name[@revision]`) as `--model` and `model.path`, resolved offline from a fake
//! Hugging Face cache laid out on disk.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sft(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sft"));
    c.env_remove("RUST_BACKTRACE").env("HF_HUB_CACHE", cache);
    c
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sft-cli-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(dir: &Path, data: &Path, model: &str, out: &str) -> PathBuf {
    let path = dir.join(format!("{out}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
            [model]
            {model}
            [data]
            train = ["{}"]
            max_len = 96
            [train]
            batch_size = 4
            max_steps = 2
            [run]
            out_dir = "{}"
            "#,
            data.display(),
            dir.join(out).display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn hub_ids_resolve_from_the_local_cache() {
    let dir = scratch("ids");
    let cache = dir.join("cache");
    let poems = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/poems/poems-small.jsonl"),
    )
    .unwrap();
    let data = dir.join("poems.jsonl");
    std::fs::write(&data, poems.lines().take(20).collect::<Vec<_>>().join("\n")).unwrap();
    let fresh = config(
        &dir,
        &data,
        "preset = \"tiny-gpt\"\n[tokenizer]\nbuild = \"char\"",
        "base",
    );
    ok(&sft(&cache)
        .args(["train", "--config"])
        .arg(&fresh)
        .output()
        .unwrap());

    // The base model as `cargo xtask download` leaves it: refs/main -> snapshots/<commit>.
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let repo = cache.join("models--Owner--TinyPoet");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for f in std::fs::read_dir(dir.join("base/final")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, snapshot.join(f.file_name().unwrap())).unwrap();
    }

    // `--model Owner/Name` for eval, and `model.path = "Owner/Name"` to fine-tune.
    let eval = ok(&sft(&cache)
        .args(["eval", "--json", "--model", "Owner/TinyPoet", "--data"])
        .arg(&data)
        .output()
        .unwrap());
    assert!(eval.contains("\"loss\""), "{eval}");
    let tune = config(&dir, &data, "path = \"Owner/TinyPoet\"", "tuned");
    ok(&sft(&cache)
        .args(["train", "--config"])
        .arg(&tune)
        .output()
        .unwrap());
    assert!(dir.join("tuned/final/model.safetensors").is_file());
    // The saved config keeps the id as written, so resuming compares like with like.
    let saved = std::fs::read_to_string(dir.join("tuned/train_config.toml")).unwrap();
    assert!(saved.contains("path = \"Owner/TinyPoet\""), "{saved}");

    // A miss says which command fetches it.
    let out = sft(&cache)
        .args(["eval", "--model", "Owner/Missing@v2", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cargo xtask download Owner/Missing --revision v2"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_hub_dataset_split_trains_from_the_local_cache() {
    use sft_tests::parquet::{write_twins, Col};
    let dir = scratch("dataset");
    let cache = dir.join("cache");
    // HuggingFaceTB/smoltalk's layout: data/<subset>/<split>-NNNNN-of-NNNNN.parquet.
    let commit = "0f0e0d0c0b0a09080706050403020100ffeeddcc";
    let repo = cache.join("datasets--HuggingFaceTB--smoltalk");
    let data = repo.join("snapshots").join(commit).join("data/all");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let chat = |q: &'static str, a: &'static str| {
        Some(vec![(Some("user"), Some(q)), (Some("assistant"), Some(a))])
    };
    let rows = [
        chat("What is 2 + 2?", "4"),
        chat("Name a colour.", "Blue."),
        chat("Say hi", "Hi!"),
        chat("Capital of France?", "Paris."),
        chat("Opposite of up?", "Down."),
        chat("3 x 3?", "9"),
    ];
    for (split, n) in [("train", 6), ("test", 2)] {
        let cols = vec![Col::Messages("messages", rows[..n].to_vec())];
        write_twins(
            &data.join(format!("{split}-00000-of-00001.parquet")),
            &cols,
            4,
            sft_tests::parquet::Compression::SNAPPY,
        );
        std::fs::remove_file(data.join(format!("{split}-00000-of-00001.jsonl"))).unwrap();
    }
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [model]
            preset = "tiny-gpt"
            [tokenizer]
            build = "char"
            specials = "chatml"
            [data]
            train = ["HuggingFaceTB/smoltalk:all/train"]
            validation = [{{ path = "HuggingFaceTB/smoltalk", subset = "all", split = "test" }}]
            [train]
            batch_size = 2
            max_steps = 2
            [run]
            out_dir = "{}"
            "#,
            dir.join("out").display()
        ),
    )
    .unwrap();
    let out = sft(&cache)
        .args(["train", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("records read     6 (messages 6)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("records read     2 (messages 2)"),
        "{stderr}"
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["steps"], 2);
    // The process's peak memory, from /proc (this machine has it).
    assert!(
        summary["peak_rss_mib"].as_f64().is_some_and(|m| m > 1.0),
        "{summary}"
    );
    assert!(
        summary.get("streamed").is_none(),
        "a planned run has no stream counts"
    );
    // The eval command takes the same spelling.
    let eval = ok(&sft(&cache)
        .args(["eval", "--json", "--model"])
        .arg(dir.join("out/final"))
        .args(["--data", "HuggingFaceTB/smoltalk:all/test"])
        .output()
        .unwrap());
    assert!(eval.contains("\"loss\""), "{eval}");
    std::fs::remove_dir_all(&dir).unwrap();
}
