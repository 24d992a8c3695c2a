//! `cargo xtask init-model (--preset NAME | --config CONFIG.json) --out DIR [--seed S]
//! [--tokenizer PATH] [--vocab-size N] [--set key=json ...] [--dtype f32|bf16]`.
//!
//! A randomly initialised checkpoint in Hugging Face layout, for tests, benchmarks and CI
//! without downloads. With `--tokenizer`, its files are copied in (so the directory is a
//! complete `--model` for every `sft` command) and the vocabulary and eos default to it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use serde_json::Value;
use sft_model::{presets, Model, ModelConfig};
use sft_tokenizer::Tokenizer;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// A named architecture (`sft_model::presets`).
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    preset: Option<String>,
    /// A `config.json` to initialise (its `vocab_size` wins over the tokenizer's).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A tokenizer file or directory to ship with the checkpoint.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Vocabulary rows (default: the config's, else the tokenizer's).
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Override a config field with a JSON value, e.g. `--set num_hidden_layers=2`.
    #[arg(long = "set", value_name = "KEY=JSON")]
    sets: Vec<String>,
    /// Weight dtype on disk.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    write(&args)?;
    println!("{}", args.out.display());
    Ok(())
}

/// A preset with `vocab_size` and field overrides, as `init-model --preset` writes it.
pub(crate) fn write_preset(
    preset: &str,
    vocab_size: usize,
    sets: &[&str],
    out: &Path,
) -> anyhow::Result<()> {
    write(&Args {
        preset: Some(preset.into()),
        config: None,
        out: out.to_owned(),
        seed: 0,
        tokenizer: None,
        vocab_size: Some(vocab_size),
        sets: sets.iter().map(|s| s.to_string()).collect(),
        dtype: "f32".into(),
    })
}

fn write(args: &Args) -> anyhow::Result<()> {
    let tok = args
        .tokenizer
        .as_deref()
        .map(Tokenizer::from_path)
        .transpose()?;
    let cfg = resolve_config(args, tok.as_ref())?;
    let dtype = match args.dtype.as_str() {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        d => bail!("--dtype {d:?}: use f32, bf16 or f16"),
    };
    if let Some(t) = &tok {
        if t.vocab_size() > cfg.vocab_size() {
            bail!(
                "the tokenizer has {} tokens but vocab_size is {}",
                t.vocab_size(),
                cfg.vocab_size()
            );
        }
    }
    // Drawn in f32 and cast on save, so a seed gives the same weights whatever `--dtype`.
    let model = Model::init(&cfg, args.seed, DType::F32, &Device::Cpu)?;
    model.save(&args.out, dtype)?;
    if let Some(t) = &tok {
        t.save(&args.out)?;
    }
    eprintln!(
        "initialised {:.2}M parameters ({} layers, hidden {}, vocab {}) with seed {}",
        cfg.num_params() as f64 / 1e6,
        cfg.num_layers(),
        cfg.hidden_size(),
        cfg.vocab_size(),
        args.seed
    );
    Ok(())
}

fn resolve_config(args: &Args, tok: Option<&Tokenizer>) -> anyhow::Result<ModelConfig> {
    let mut json = match (&args.preset, &args.config) {
        (Some(name), _) => presets::preset(name).with_context(|| {
            format!(
                "unknown preset {name:?} (known: {})",
                presets::NAMES.join(", ")
            )
        })?,
        (None, Some(path)) => read_json(path)?,
        (None, None) => bail!("give --preset or --config"),
    };
    let obj = json
        .as_object_mut()
        .context("a model config must be a JSON object")?;
    for s in &args.sets {
        let (k, v) = s
            .split_once('=')
            .with_context(|| format!("--set {s:?}: expected key=value"))?;
        // A bare word that is not JSON is a string (`--set hidden_act=gelu`).
        let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.into()));
        obj.insert(k.trim().into(), v);
    }
    if let Some(v) = args.vocab_size {
        obj.insert("vocab_size".into(), v.into());
    }
    if let Some(t) = tok {
        obj.entry("vocab_size").or_insert(t.vocab_size().into());
        let qwen = matches!(
            obj.get("model_type").and_then(Value::as_str),
            Some("qwen2" | "qwen3" | "llama")
        );
        if qwen {
            if let Some(eos) = t.eos_id() {
                obj.entry("eos_token_id").or_insert(eos.into());
                obj.entry("bos_token_id")
                    .or_insert(t.bos_id().unwrap_or(eos).into());
            }
        }
    }
    if !obj.contains_key("vocab_size") {
        bail!("no vocabulary size: give --vocab-size or --tokenizer");
    }
    ModelConfig::from_json_str(&json.to_string()).map_err(|e| anyhow::anyhow!("model config: {e}"))
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))
}
