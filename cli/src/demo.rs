//! The bundled demo: `sft train` with no config.
//!
//! The nanopoet flow end to end on poems compiled into the binary: a char tokenizer built from
//! them, a small GPT pretrained on poem text (`configs/nanopoet-pretrain.toml`), SFT on poem
//! records with metadata dropout and loss on the content only (`configs/nanopoet-sft.toml`),
//! then poems sampled for a few author/style prompts. `--set KEY=V` overrides apply to both
//! stages, `--set pretrain.KEY=V` and `--set sft.KEY=V` to one.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sft::TrainConfig;
use sft_data::Prompt;
use sft_model::generate::generate;

use crate::common::{self, SamplingArgs, TemplateArgs};

/// 1,524 poems (400 KB), MIT; see tests/data/poems/README.md.
const POEMS: &str = include_str!("../../tests/data/poems/poems-small.jsonl");
const POEMS_LICENSE: &str = include_str!("../../tests/data/poems/LICENSE-chinese-poetry");
pub(crate) const PRETRAIN: &str = include_str!("../../configs/nanopoet-pretrain.toml");
pub(crate) const SFT: &str = include_str!("../../configs/nanopoet-sft.toml");

/// What the demo changes in the tutorial configs so both stages finish in minutes on two cores:
/// a model of half the depth and 3/4 the width (about 3x cheaper per token) and fewer epochs.
/// The full configs are what docs/results.md measures.
const DEMO_PRETRAIN: &[&str] = &[
    "model.init={n_layer = 4, n_embd = 192, n_head = 6}",
    "train.epochs=3",
    "run.eval_every=100",
    "run.save_every=100",
];
const DEMO_SFT: &[&str] = &["train.epochs=2", "run.eval_every=100"];

/// Prompts the finished model writes poems for.
const PROMPTS: &[&str] = &[
    r#"{"author":"李白","style":"七言绝句"}"#,
    r#"{"author":"杜甫","style":"五言律诗"}"#,
    r#"{"style":"五言绝句"}"#,
    r#"{"author":"苏轼","style":"浣溪沙"}"#,
];

pub(crate) fn run(out: &Path, sets: &[String], json: bool) -> anyhow::Result<()> {
    let data_dir = out.join("data");
    std::fs::create_dir_all(&data_dir).with_context(|| data_dir.display().to_string())?;
    let poems = data_dir.join("poems.jsonl");
    std::fs::write(&poems, POEMS).with_context(|| poems.display().to_string())?;
    std::fs::write(data_dir.join("LICENSE-chinese-poetry"), POEMS_LICENSE)?;
    eprintln!(
        "sft demo: nanopoet (pretrain a char GPT on {} poems, then SFT with metadata) into {}",
        POEMS.lines().count(),
        out.display()
    );

    let pretrain_dir = out.join("pretrain");
    let cfg = stage(
        "pretrain",
        PRETRAIN,
        DEMO_PRETRAIN,
        &[
            format!("data.train=[{:?}]", poems.display().to_string()),
            format!("run.out_dir={}", pretrain_dir.display()),
            // Re-running the demo starts it over.
            "run.overwrite=true".into(),
        ],
        sets,
    )?;
    eprintln!("\n== stage 1/2: pretraining on poem text ==");
    crate::training::run_config(&cfg, None, json, None)?;

    let sft_dir = out.join("sft");
    let cfg = stage(
        "sft",
        SFT,
        DEMO_SFT,
        &[
            format!("data.train=[{:?}]", poems.display().to_string()),
            format!("model.path={}", pretrain_dir.join("final").display()),
            format!("run.out_dir={}", sft_dir.display()),
            "run.overwrite=true".into(),
        ],
        sets,
    )?;
    eprintln!(
        "\n== stage 2/2: SFT on poem records (metadata kept with p = {}) ==",
        cfg.data.metadata_keep_prob
    );
    crate::training::run_config(&cfg, None, json, None)?;

    let model = sft_dir.join("final");
    let ck = common::open(
        &model,
        None,
        &TemplateArgs {
            template: sft_data::TemplateChoice::Auto,
            chat_template: None,
        },
    )?;
    let sampling = SamplingArgs {
        max_new_tokens: 120,
        temperature: 0.8,
        top_k: Some(50),
        top_p: None,
        repetition_penalty: 1.0,
        seed: 0,
    };
    let params = sampling.params(ck.template.stop_ids().to_vec())?;
    let mut prompts = vec![];
    for p in PROMPTS {
        let value: serde_json::Value = serde_json::from_str(p).expect("valid demo prompt");
        prompts.push(Prompt::from_json(&value)?.ids(&ck.template, &ck.tok)?);
    }
    let poems_out = generate(&ck.model, &prompts, &params)?;
    println!("\nsample poems from {}:", model.display());
    for (p, g) in PROMPTS.iter().zip(poems_out) {
        println!("  {p}\n    {}", ck.tok.decode_skip_special(&g.ids)?);
    }
    println!("\nagain with: sft generate --model {} --record '{{\"author\":\"李白\",\"style\":\"七言绝句\"}}' --temperature 0.8 --top-k 50", model.display());
    println!(
        "outputs under {}: pretrain/ and sft/ (checkpoints, metrics.jsonl, loss.svg)",
        out.display()
    );
    Ok(())
}

fn stage(
    name: &str,
    config: &str,
    demo: &[&str],
    paths: &[String],
    sets: &[String],
) -> anyhow::Result<TrainConfig> {
    let own = |s: &String| -> Option<String> {
        match s.split_once('.') {
            Some((stage, rest)) if stage == "pretrain" || stage == "sft" => {
                (stage == name).then(|| rest.to_owned())
            }
            _ => Some(s.clone()),
        }
    };
    let overrides: Vec<String> = demo
        .iter()
        .map(|s| s.to_string())
        .chain(paths.iter().cloned())
        .chain(sets.iter().filter_map(own))
        .collect();
    TrainConfig::from_toml_str(config, &overrides).map_err(|e| anyhow::anyhow!("demo config: {e}"))
}

/// Where the demo writes when no `--set run.out_dir` says otherwise.
pub(crate) fn default_out() -> PathBuf {
    PathBuf::from("runs/demo")
}
