//! `cargo xtask download` against a fake hub cache (no network), and `init-model` presets that
//! load as checkpoints.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sft-xtask-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn xtask(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

/// `models--Qwen--Tiny` with a two-shard snapshot at `main`.
fn fake_cache(root: &Path, with_second_shard: bool) -> PathBuf {
    let repo = root.join("models--Qwen--Tiny");
    let snap = repo.join("snapshots").join(SHA);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), SHA).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::write(snap.join(f), "{}").unwrap();
    }
    std::fs::write(
        snap.join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    std::fs::write(snap.join("model-00001-of-00002.safetensors"), "").unwrap();
    if with_second_shard {
        std::fs::write(snap.join("model-00002-of-00002.safetensors"), "").unwrap();
    }
    snap
}

#[test]
fn download_answers_from_a_complete_cache_without_network() {
    let cache = scratch("cache-ok");
    let snap = fake_cache(&cache, true);
    for args in [
        vec!["download", "Qwen/Tiny"],
        vec!["download", "Qwen/Tiny", "--revision", SHA],
    ] {
        let out = xtask(&args, &cache);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            snap.display().to_string()
        );
    }
}

#[test]
fn download_names_what_the_cache_lacks() {
    let cache = scratch("cache-miss");
    fake_cache(&cache, false);
    let out = xtask(&["download", "Qwen/Tiny"], &cache);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("model-00002-of-00002.safetensors"),
        "{stderr}"
    );
    assert!(stderr.contains("HF_HUB_OFFLINE"), "{stderr}");

    let out = xtask(&["download", "Qwen/Other"], &cache);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("models--Qwen--Other"), "{stderr}");

    let out = xtask(&["download", "Qwen/Tiny", "--revision", "v2"], &cache);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Qwen/Tiny@v2: revision not cached"),
        "{stderr}"
    );

    // An explicitly requested file must be there too.
    fake_cache(&cache, true);
    let out = xtask(
        &[
            "download",
            "Qwen/Tiny",
            "--include",
            "*.json",
            "--include",
            "vocab.txt",
        ],
        &cache,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("vocab.txt"),
        "{stderr}"
    );
}

#[test]
fn init_model_presets_are_loadable_checkpoints() {
    use candle_core::{DType, Device, Tensor};
    let root = env!("CARGO_MANIFEST_DIR").to_owned() + "/..";
    let dir = scratch("init");
    let qwen = dir.join("tiny-qwen2");
    let out = xtask(
        &[
            "init-model",
            "--preset",
            "tiny-qwen2",
            "--tokenizer",
            &format!("{root}/tests/data/qwen3-tokenizer"),
            "--out",
            qwen.to_str().unwrap(),
            "--seed",
            "3",
        ],
        &dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let model = sft_model::Model::load(&qwen, DType::F32, &Device::Cpu).unwrap();
    let tok = sft_tokenizer::Tokenizer::from_path(&qwen).unwrap();
    assert_eq!(model.config().vocab_size(), tok.vocab_size());
    assert!(
        tok.config().chat_template.is_some(),
        "the template travels with the tokenizer"
    );
    let ids = tok.encode("<|im_start|>user\nHi<|im_end|>").unwrap();
    let t = ids.len();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let pos = Tensor::arange(0u32, t as u32, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model
        .forward(&input, &pos, &sft_model::AttentionMask::Causal, None)
        .unwrap();
    assert_eq!(logits.dims(), [1, t, tok.vocab_size()]);

    // A GPT preset with an explicit vocabulary and a field override, saved in bf16.
    let gpt = dir.join("gpt");
    let out = xtask(
        &[
            "init-model",
            "--preset",
            "nanopoet-gpt",
            "--vocab-size",
            "300",
            "--set",
            "n_layer=2",
            "--dtype",
            "bf16",
            "--out",
            gpt.to_str().unwrap(),
        ],
        &dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let model = sft_model::Model::load(&gpt, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.config().num_layers(), 2);
    assert_eq!(model.config().vocab_size(), 300);

    let out = xtask(
        &[
            "init-model",
            "--preset",
            "gpt-9000",
            "--vocab-size",
            "9",
            "--out",
            "x",
        ],
        &dir,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("known: tiny-gpt"),
        "{stderr}"
    );
}
