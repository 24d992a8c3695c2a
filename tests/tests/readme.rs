//! The README's "Using the crates alone" examples, run on fixtures: if an API they show changes,
//! this stops compiling or fails.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn readme_examples_work() -> Result<(), Box<dyn std::error::Error>> {
    std::env::set_current_dir(root())?;
    // sft-tokenizer
    let tok = sft_tokenizer::Tokenizer::from_path("tests/data/qwen3-tokenizer".as_ref())?;
    assert_eq!(tok.encode("Hello, world!")?, vec![9707, 11, 1879, 0]);

    // sft-data
    use sft_data::*;
    let read = read_jsonl(
        "tests/data/jsonl/mixed.jsonl".as_ref(),
        None,
        InvalidPolicy::Error,
    )?;
    let template = Template::new(TemplateChoice::Auto, &tok)?;
    let prepared = prepare(&read, &template, &tok, &RenderOptions::default(), 0)?;
    assert!(prepared.report.to_string().contains("first sample"));
    let rows: Vec<Vec<&Rendered>> = prepared.samples.iter().map(|(_, r)| vec![r]).collect();
    let batch = collate(&rows, tok.pad_id().unwrap_or(0), None);
    assert_eq!(batch.batch_size, prepared.samples.len());

    // sft: train a tiny model from a config, then sft-model on its output.
    let out = std::env::temp_dir().join(format!("sft-readme-{}", std::process::id()));
    let cfg = sft::TrainConfig::load(
        "configs/nanopoet-pretrain.toml".as_ref(),
        &[
            "train.max_steps=2".into(),
            "model.init={n_layer = 1, n_embd = 16, n_head = 2}".into(),
            format!("run.out_dir={}", out.display()),
        ],
    )?;
    let summary = sft::train(&cfg, &sft::RunOptions::default(), &mut |_event| {})?;

    use candle_core::{DType, Device, Tensor};
    let model = sft_model::Model::load(&summary.final_model, DType::F32, &Device::Cpu)?;
    let ids = Tensor::new(&[[0u32, 9, 11]], &Device::Cpu)?;
    let pos = Tensor::new(&[[0u32, 1, 2]], &Device::Cpu)?;
    let logits = model.forward(&ids, &pos, &sft_model::AttentionMask::Causal, None)?;
    assert_eq!(logits.dims(), &[1, 3, model.config().vocab_size()]);
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
