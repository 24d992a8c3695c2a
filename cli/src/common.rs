//! What several subcommands share: opening a checkpoint and the sampling flags.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::DType;
use sft_data::{Template, TemplateChoice, TemplateOptions};
use sft_model::generate::SamplingParams;
use sft_model::Model;
use sft_tokenizer::Tokenizer;

/// A checkpoint directory opened for inference: weights, tokenizer and chat template.
pub(crate) struct Checkpoint {
    pub model: Model,
    pub tok: Tokenizer,
    pub template: Template,
}

/// How to render prompts: the template choice and an optional Jinja file.
#[derive(clap::Args, Clone)]
pub(crate) struct TemplateArgs {
    /// auto, model, chatml, plain or poem.
    #[arg(long, default_value = "auto")]
    pub template: TemplateChoice,
    /// A Jinja chat template file to use instead of the checkpoint's.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
}

pub(crate) fn open(dir: &Path, t: &TemplateArgs) -> anyhow::Result<Checkpoint> {
    // A hub id (`Qwen/Qwen2.5-0.5B-Instruct`) names its snapshot in the local HF cache.
    let dir = &sft::hub::resolve_model(dir)?;
    // A checkpoint cut short says what it lacks, before anything tries to read the missing part.
    sft_model::manifest::check_complete(dir)?;
    let tok = Tokenizer::from_path(dir)?;
    let model = Model::load(dir, DType::F32, &sft::setup::device()?)
        .with_context(|| format!("loading the model in {}", dir.display()))?;
    sft::setup::check_vocab(&model, &tok)?;
    let chat_template = match &t.chat_template {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| p.display().to_string())?),
        None => None,
    };
    let opts = TemplateOptions {
        chat_template,
        ..TemplateOptions::default()
    };
    let template = Template::with_options(t.template, &tok, &opts)?;
    Ok(Checkpoint {
        model,
        tok,
        template,
    })
}

#[derive(clap::Args, Clone)]
pub(crate) struct SamplingArgs {
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    /// 1.0 is off; above 1 discourages repeating tokens (as `transformers`).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self, stop_ids: Vec<u32>) -> anyhow::Result<SamplingParams> {
        if self.temperature < 0.0 || !self.temperature.is_finite() {
            anyhow::bail!("--temperature must be >= 0 (0 is greedy)");
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                anyhow::bail!("--top-p must be in (0, 1]");
            }
        }
        if self.top_k == Some(0) {
            anyhow::bail!("--top-k must be positive");
        }
        if self.repetition_penalty <= 0.0 {
            anyhow::bail!("--repetition-penalty must be positive");
        }
        Ok(SamplingParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            stop_ids,
            seed: self.seed,
        })
    }
}
