//! A GGUF file where a checkpoint goes, through the command line: LoRA and full training on a
//! `.gguf` base (the adapter names the file as its base; full checkpoints are Hugging Face
//! directories), eval, generate, merge, and `sft export` (from a checkpoint, an adapter or a
//! `.gguf`, with `--ollama`), the exported file read back; a char-level tokenizer and an
//! unknown `--quant` are refused by name (the architectures llama.cpp cannot run are
//! `model/tests/gguf.rs`'s).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

fn sft() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sft"));
    c.env_remove("RUST_BACKTRACE").env("RAYON_NUM_THREADS", "1");
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

fn fails(out: Output) -> String {
    assert_eq!(out.status.code(), Some(1), "expected exit status 1");
    String::from_utf8(out.stderr).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sft-gguf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Chats for the fixture's ChatML template.
fn chats(dir: &Path) -> PathBuf {
    let path = dir.join("chats.jsonl");
    let mut text = String::new();
    for i in 0..12 {
        text.push_str(&format!(
            r#"{{"messages": [{{"role": "user", "content": "What is {i} + 1?"}}, {{"role": "assistant", "content": "It is {}."}}]}}"#,
            i + 1
        ));
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn train_config(dir: &Path, base: &Path, data: &Path, lora: bool) -> PathBuf {
    let lora = match lora {
        true => "[lora]\nr = 4\nalpha = 8\ndropout = 0.0\n",
        false => "",
    };
    let text = format!(
        "[model]\npath = {:?}\n[data]\ntrain = [{:?}]\nmax_len = 64\n{lora}\
         [optim]\nlr = 0.01\n[train]\nbatch_size = 4\nmax_steps = 3\nthreads = 1\n\
         [run]\nout_dir = {:?}\nlog_every = 1\n",
        base,
        data,
        dir.join("out")
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `sft eval --json`'s loss.
fn eval_loss(model: &Path, data: &Path) -> f64 {
    let out = ok(sft()
        .args(["eval", "--json", "--threads", "1", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    v["loss"].as_f64().unwrap()
}

#[test]
fn lora_on_a_gguf_base_trains_merges_and_exports() {
    let dir = scratch("lora");
    let base = data_dir().join("gguf/qwen2.gguf");
    let data = chats(&dir);
    ok(sft()
        .args(["train", "--config"])
        .arg(train_config(&dir, &base, &data, true))
        .output()
        .unwrap());
    let adapter = dir.join("out/final");
    let ac: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ac["base_model_name_or_path"], base.display().to_string());
    assert!(adapter.join("tokenizer.json").is_file());

    // The adapter alone stands for the model (its base is the .gguf), with `--adapter` too.
    let alone = eval_loss(&adapter, &data);
    let with = ok(sft()
        .args(["eval", "--json", "--threads", "1", "--model"])
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap());
    assert!(with.contains(&format!("{alone}")), "{with} vs {alone}");
    assert_ne!(
        alone,
        eval_loss(&base, &data),
        "the adapter changed nothing"
    );

    // Merged: a Hugging Face directory with the base's tokenizer.
    let merged = dir.join("merged");
    ok(sft()
        .args(["merge", "--adapter"])
        .arg(&adapter)
        .arg("--out")
        .arg(&merged)
        .output()
        .unwrap());
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(merged.join(f).is_file(), "{f}");
    }
    let merged_loss = eval_loss(&merged, &data);
    assert!(
        (merged_loss - alone).abs() < 1e-4,
        "{merged_loss} vs {alone}"
    );

    // Exported from the adapter (merged on the way), with a Modelfile, into a directory that
    // does not exist yet; read back.
    let gguf = dir.join("export/model.gguf");
    assert!(!gguf.parent().unwrap().exists());
    let out = ok(sft()
        .args(["export", "--quant", "f32", "--ollama", "--model"])
        .arg(&adapter)
        .arg("--out")
        .arg(&gguf)
        .output()
        .unwrap());
    assert!(
        out.starts_with(&format!("wrote {} (f32, ", gguf.display())),
        "{out}"
    );
    let modelfile = std::fs::read_to_string(dir.join("export/Modelfile")).unwrap();
    assert_eq!(
        modelfile,
        "FROM ./model.gguf\nPARAMETER stop \"<|im_end|>\"\n"
    );
    let exported = eval_loss(&gguf, &data);
    assert!((exported - alone).abs() < 1e-4, "{exported} vs {alone}");
    // The directory holding it names it too.
    assert_eq!(eval_loss(gguf.parent().unwrap(), &data), exported);
    // A second export to the same file is refused.
    let err = fails(
        sft()
            .args(["export", "--quant", "q8_0", "--model"])
            .arg(&adapter)
            .arg("--out")
            .arg(&gguf)
            .output()
            .unwrap(),
    );
    assert!(err.contains("already exists"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn full_training_on_a_gguf_base_saves_a_hugging_face_checkpoint() {
    let dir = scratch("full");
    let base = data_dir().join("gguf/llama.gguf");
    let data = chats(&dir);
    ok(sft()
        .args(["train", "--config"])
        .arg(train_config(&dir, &base, &data, false))
        .output()
        .unwrap());
    let fin = dir.join("out/final");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(fin.join(f).is_file(), "{f}");
    }
    let cfg = std::fs::read_to_string(fin.join("config.json")).unwrap();
    assert!(cfg.contains("\"model_type\": \"llama\""), "{cfg}");
    // The chat template came along.
    let tc = std::fs::read_to_string(fin.join("tokenizer_config.json")).unwrap();
    assert!(tc.contains("<|im_start|>"), "{tc}");
    let out = ok(sft()
        .args([
            "generate",
            "--threads",
            "1",
            "--max-new-tokens",
            "4",
            "--json",
            "--model",
        ])
        .arg(&base)
        .args(["--prompt", "The harbour"])
        .output()
        .unwrap());
    assert!(out.contains("\"ids\""), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn what_llama_cpp_cannot_hold_is_refused_by_name() {
    let dir = scratch("refused");
    let export = |model: &Path| {
        fails(
            sft()
                .args(["export", "--quant", "f16", "--model"])
                .arg(model)
                .arg("--out")
                .arg(dir.join("x.gguf"))
                .output()
                .unwrap(),
        )
    };
    // A char-level tokenizer (this adapter carries one).
    let err = export(&data_dir().join("models/qwen2-tied-lora-sft"));
    assert!(err.contains("char-level"), "{err}");
    let err = fails(
        sft()
            .args(["export", "--quant", "q3_k", "--model"])
            .arg(data_dir().join("gguf/qwen2"))
            .arg("--out")
            .arg(dir.join("y.gguf"))
            .output()
            .unwrap(),
    );
    assert!(err.contains("--quant \"q3_k\""), "{err}");
    // With --ollama, a chat template that does not build stops the export before the file.
    let broken = dir.join("broken-template");
    std::fs::create_dir_all(&broken).unwrap();
    for f in std::fs::read_dir(data_dir().join("gguf/qwen2")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, broken.join(f.file_name().unwrap())).unwrap();
    }
    let tc = broken.join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&tc).unwrap()).unwrap();
    config["chat_template"] = "{% for message in messages %}".into();
    std::fs::write(&tc, config.to_string()).unwrap();
    let err = fails(
        sft()
            .args(["export", "--quant", "f16", "--ollama", "--model"])
            .arg(&broken)
            .arg("--out")
            .arg(dir.join("z.gguf"))
            .output()
            .unwrap(),
    );
    assert!(err.contains("tokenizer_config.json"), "{err}");
    std::fs::remove_dir_all(&broken).unwrap();
    assert!(!dir.join("x.gguf").exists() && !dir.join("y.gguf").exists());
    assert!(!dir.join("z.gguf").exists() && !dir.join("Modelfile").exists());
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "no temporary file is left"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
