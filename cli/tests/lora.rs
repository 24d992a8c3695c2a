//! LoRA through the command line: `sft train` with `[lora]` writes PEFT's files (and only the
//! adapter), resumes to the same bytes, continues from an adapter (`model.adapter`); `sft eval`
//! takes the adapter alone or with `--adapter`; `sft merge` writes the merged weights (which
//! give PEFT's `merge_and_unload` logits); a missing base is an error naming the paths it tried.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};
use sft_model::Model;

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

/// stdout and stderr of a run that succeeded (progress lines go to stderr).
fn ok_all(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out) + &err
}

fn fails(out: Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    String::from_utf8(out.stderr).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sft-lora-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The fixture's training config (tests/data/models/lora/) on `base`, into `dir/out`.
fn config(dir: &Path, base: &str, extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(data_dir().join("models/lora/train-sft-adapter.toml"))
        .unwrap()
        .replace(
            "path = \"tests/data/models/qwen2-tied\"",
            &format!("path = {:?}", data_dir().join("models").join(base)),
        )
        .replace(
            "train = [\"tests/data/jsonl/mixed.jsonl\"]",
            &format!("train = [{:?}]", data_dir().join("jsonl/mixed.jsonl")),
        )
        .replace(
            "out_dir = \"runs/lora-fixture\"",
            &format!("out_dir = {:?}", dir.join("out")),
        )
        .replace("save_every = 100", "save_every = 3")
        + extra;
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn train_resume_eval_merge_an_adapter() {
    let dir = scratch("train");
    let cfg = config(&dir, "qwen2-untied", "");
    let out = ok_all(
        sft()
            .args(["train", "--config"])
            .arg(&cfg)
            .output()
            .unwrap(),
    );
    assert!(out.contains("LoRA:"), "{out}");
    let last = dir.join("out/final");
    // The adapter and the tokenizer, not a copy of the base.
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "char_tokenizer.json",
    ] {
        assert!(last.join(f).is_file(), "{f}");
    }
    assert!(!last.join("model.safetensors").exists() && !last.join("config.json").exists());
    let adapter = std::fs::read(last.join("adapter_model.safetensors")).unwrap();

    // Resumed from step 3 of 6: the same adapter, byte for byte.
    std::fs::remove_dir_all(dir.join("out/checkpoint-000006")).unwrap();
    ok(sft()
        .args(["train", "--resume"])
        .arg(dir.join("out/checkpoint-000003"))
        .output()
        .unwrap());
    assert!(std::fs::read(last.join("adapter_model.safetensors")).unwrap() == adapter);

    // eval: the adapter directory alone (base from base_model_name_or_path) and with --adapter.
    let data = data_dir().join("jsonl/mixed.jsonl");
    let eval = |args: &[&Path]| {
        let mut c = sft();
        c.args(["eval", "--json", "--data"])
            .arg(&data)
            .arg("--model");
        c.arg(args[0]);
        if let Some(a) = args.get(1) {
            c.arg("--adapter").arg(a);
        }
        let v: serde_json::Value = serde_json::from_str(ok(c.output().unwrap()).trim()).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let base = data_dir().join("models/qwen2-untied");
    let alone = eval(&[&last]);
    assert_eq!(alone, eval(&[&base, &last]));

    // generate --compare BASE with --adapter: the base lines are the base's own generations,
    // the tuned lines the adapter's. Copies whose tokenizer covers the model's whole vocabulary,
    // so that any id the random base draws decodes.
    let with_tokenizer = |from: &Path, name: &str| {
        let to = dir.join(name);
        std::fs::create_dir_all(&to).unwrap();
        // Without the manifest, whose sizes name the tokenizer it came with.
        for f in std::fs::read_dir(from).unwrap() {
            let f = f.unwrap().path();
            if f.file_name().unwrap() != "sft_manifest.json" {
                std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
            }
        }
        let mut tok: serde_json::Value =
            serde_json::from_slice(&std::fs::read(last.join("char_tokenizer.json")).unwrap())
                .unwrap();
        let vocab = 256; // the fixture's config.json
        let specials = tok["special_tokens"].as_array().unwrap().len();
        let chars = tok["chars"].as_array_mut().unwrap();
        let mut c = 0x4e00u32;
        while specials + chars.len() < vocab {
            let ch = char::from_u32(c).unwrap().to_string();
            if !chars.iter().any(|x| x == &ch) {
                chars.push(ch.into());
            }
            c += 1;
        }
        std::fs::write(to.join("char_tokenizer.json"), tok.to_string()).unwrap();
        to
    };
    let base_tok = with_tokenizer(&base, "base-with-tokenizer");
    let adapter_tok = with_tokenizer(&last, "adapter-with-tokenizer");
    let generate = |args: &[&Path]| -> Vec<(String, String)> {
        let mut c = sft();
        c.args([
            "generate",
            "--json",
            "--prompt",
            "ab",
            "--max-new-tokens",
            "24",
        ]);
        for (flag, path) in ["--model", "--adapter", "--compare"].iter().zip(args) {
            c.arg(flag).arg(path);
        }
        ok(c.output().unwrap())
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["model"].as_str().unwrap_or("").to_owned(),
                    v["ids"].to_string(),
                )
            })
            .collect()
    };
    let plain = &generate(&[&base_tok])[0].1;
    let tuned = &generate(&[&base_tok, &adapter_tok])[0].1;
    assert_ne!(plain, tuned, "the adapter changes the greedy ids");
    let expected = [
        ("base".to_owned(), plain.clone()),
        ("tuned".to_owned(), tuned.clone()),
    ];
    assert_eq!(generate(&[&base_tok, &adapter_tok, &base_tok]), expected);
    // A base without a tokenizer of its own reads the adapter's.
    assert_eq!(generate(&[&base, &adapter_tok, &base]), expected);
    // A base whose own tokenizer is broken is an error naming it, not the adapter's instead.
    let broken = dir.join("base-with-broken-tokenizer");
    std::fs::create_dir_all(&broken).unwrap();
    for f in std::fs::read_dir(&base).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, broken.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(broken.join("char_tokenizer.json"), "{").unwrap();
    let err = fails(
        sft()
            .args(["generate", "--json", "--prompt", "ab", "--model"])
            .arg(&base)
            .arg("--adapter")
            .arg(&adapter_tok)
            .arg("--compare")
            .arg(&broken)
            .output()
            .unwrap(),
    );
    assert!(err.contains("base-with-broken-tokenizer"), "{err}");

    // merge: a plain checkpoint with the same loss.
    let merged = dir.join("merged");
    ok(sft()
        .args(["merge", "--adapter"])
        .arg(&last)
        .arg("--out")
        .arg(&merged)
        .output()
        .unwrap());
    assert!(merged.join("model.safetensors").is_file() && merged.join("config.json").is_file());
    let m = eval(&[&merged]);
    assert!((m - alone).abs() < 1e-4, "merged {m} vs adapter {alone}");
    // Into a directory that is not empty: refused.
    let again = fails(
        sft()
            .args(["merge", "--adapter"])
            .arg(&last)
            .arg("--out")
            .arg(&merged)
            .output()
            .unwrap(),
    );
    assert!(again.contains("not empty"), "{again}");

    // Continue training the adapter: model.adapter, a new run.
    let more = scratch("continue");
    let cfg = config(&more, "qwen2-untied", "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replace(
        "[lora]\nr = 4\nalpha = 8\ndropout = 0.1\ntarget_modules = \"all-linear\"\n",
        "",
    );
    let text = text.replacen("[model]\n", &format!("[model]\nadapter = {:?}\n", last), 1);
    std::fs::write(&cfg, text).unwrap();
    let out = ok_all(
        sft()
            .args(["train", "--config"])
            .arg(&cfg)
            .output()
            .unwrap(),
    );
    assert!(out.contains("LoRA:"), "{out}");
    let continued = more.join("out/final/adapter_model.safetensors");
    assert!(std::fs::read(continued).unwrap() != adapter);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&more);
}

/// `sft merge` of the committed sft-made adapter writes exactly `Model::merged`'s weights, which
/// give PEFT's `merge_and_unload` logits (`model/tests/lora.rs`, against
/// tests/data/models/lora.golden.json); `transformers` reads what `sft merge` writes as it reads
/// every `sft` export (the model goldens).
#[test]
fn merge_writes_the_merged_weights() {
    let dir = scratch("merge");
    let out = dir.join("merged");
    let adapter = data_dir().join("models/qwen2-untied-lora-sft");
    ok(sft()
        .args(["merge", "--adapter"])
        .arg(&adapter)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap());
    let written = Model::load(&out, DType::F32, &Device::Cpu).unwrap();
    let merged = Model::load(
        &data_dir().join("models/qwen2-untied"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
    .load_adapter(&adapter)
    .unwrap()
    .merged()
    .unwrap();
    assert_eq!(written.params().len(), merged.params().len());
    for ((n, a), (m, b)) in written.params().iter().zip(merged.params()) {
        assert_eq!(n, m);
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(a == b, "{n} differs");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_base_or_a_bad_lora_setting_is_named() {
    let dir = scratch("missing");
    let adapter = dir.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "char_tokenizer.json",
    ] {
        std::fs::copy(
            data_dir().join("models/qwen2-tied-lora-sft").join(f),
            adapter.join(f),
        )
        .unwrap();
    }
    let err = fails(
        sft()
            .args(["eval", "--data"])
            .arg(data_dir().join("jsonl/mixed.jsonl"))
            .arg("--model")
            .arg(&adapter)
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("base model \"../qwen2-tied\" not found")
            && err.contains("adapter_config.json"),
        "{err}"
    );

    let cfg = config(&dir, "qwen2-tied", "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "target_modules = \"all-linear\"",
        "target_modules = [\"c_attn\"]",
    );
    std::fs::write(&cfg, text).unwrap();
    let err = fails(
        sft()
            .args(["train", "--config"])
            .arg(&cfg)
            .output()
            .unwrap(),
    );
    assert!(err.contains("no module named c_attn"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sft bench train --lora`: its JSON says LoRA ran, and counts the trainable scalars apart.
#[test]
fn bench_train_with_lora_reports_its_trainable_params() {
    let out = ok(sft()
        .args(["bench", "train", "--json", "--lora", "--lora-r", "2"])
        .args([
            "--batch-size",
            "1",
            "--seq-len",
            "8",
            "--steps",
            "1",
            "--warmup",
            "0",
        ])
        .args(["--threads", "1", "--model"])
        .arg(data_dir().join("models/qwen2-tied"))
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["lora"], true);
    assert_eq!(v["dropout"], 0.05);
    // r 2 on 7 modules x 2 layers: (in + out) x r each.
    let per_layer = (32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32);
    assert_eq!(v["trainable_params"], 2 * 2 * per_layer);
    assert!(v["params"].as_u64().unwrap() > v["trainable_params"].as_u64().unwrap());
}
