//! What several subcommands share: the model flags, opening a checkpoint, the template and
//! sampling flags.

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

/// The model a command runs, and on how many threads: `[--threads N] --model DIR
/// [--adapter DIR]`.
#[derive(clap::Args)]
pub(crate) struct ModelArgs {
    #[command(flatten)]
    pub threads: Threads,
    /// The checkpoint directory to run (or a hub id in the local cache), or a GGUF file.
    #[arg(long = "model", value_name = "MODEL")]
    pub path: PathBuf,
    /// A LoRA adapter directory (PEFT's files) applied to `--model`, its base. `--model` may
    /// also name an adapter directory alone: its `base_model_name_or_path` is the base.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

impl ModelArgs {
    /// Opens the model for inference (see [`open`]).
    pub fn open(&self, t: &TemplateArgs) -> anyhow::Result<Checkpoint> {
        open(&self.path, self.adapter.as_deref(), t)
    }
}

/// `--threads N`: the compute threads of a command that runs a model (`sft train` takes
/// `train.threads` from its config).
#[derive(clap::Args)]
pub(crate) struct Threads {
    /// Compute threads (default: the physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Opens `dir` for inference: a checkpoint, an adapter directory on its base, or (with
/// `adapter`) a base and an adapter. The tokenizer is the adapter's when it has one, else the
/// base's.
pub(crate) fn open(
    dir: &Path,
    adapter: Option<&Path>,
    t: &TemplateArgs,
) -> anyhow::Result<Checkpoint> {
    open_with(dir, adapter, None, t)
}

/// [`open`], with the tokenizer of `tokenizer_from` (a model and its adapter) when `dir` has
/// none of its own and no adapter is given (any other failure to read a tokenizer is an error).
pub(crate) fn open_with(
    dir: &Path,
    adapter: Option<&Path>,
    tokenizer_from: Option<(&Path, Option<&Path>)>,
    t: &TemplateArgs,
) -> anyhow::Result<Checkpoint> {
    // A hub id (`Qwen/Qwen2.5-0.5B-Instruct`) names its snapshot in the local HF cache.
    let dir = &sft::hub::resolve_model(dir)?;
    // A checkpoint cut short says what it lacks, before anything tries to read the missing part.
    if dir.is_dir() {
        sft_model::manifest::check_complete(dir)?;
    }
    if let Some(a) = adapter {
        sft_model::manifest::check_complete(a)?;
    }
    let tok = match tokenizer_from {
        Some((model, from_adapter)) if adapter.is_none() && !sft::setup::has_tokenizer(dir) => {
            sft::setup::inference_tokenizer(&sft::hub::resolve_model(model)?, from_adapter)?
        }
        _ => sft::setup::inference_tokenizer(dir, adapter)?,
    };
    let model = sft::setup::load_for_inference(dir, adapter, DType::F32, &sft::setup::device()?)
        .with_context(|| match adapter {
            Some(a) => format!(
                "loading the model in {} with the adapter in {}",
                dir.display(),
                a.display()
            ),
            None => format!("loading the model in {}", dir.display()),
        })?;
    sft::setup::check_vocab(&model, &tok)?;
    let chat_template = match &t.chat_template {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| p.display().to_string())?),
        None => None,
    };
    let opts = TemplateOptions {
        chat_template,
        ..TemplateOptions::default()
    };
    let template = template(t.template, &tok, &opts, t.chat_template.as_deref())?;
    Ok(Checkpoint {
        model,
        tok,
        template,
    })
}

/// [`Template::with_options`], its error naming the file the Jinja chat template came from
/// (`--chat-template FILE`, or the tokenizer's `chat_template.jinja` or `tokenizer_config.json`)
/// when that template is the one being built: a template that does not compile or fails its
/// probe is that file's fault.
pub(crate) fn template(
    choice: TemplateChoice,
    tok: &Tokenizer,
    opts: &TemplateOptions,
    chat_template: Option<&Path>,
) -> anyhow::Result<Template> {
    Template::with_options(choice, tok, opts).map_err(|e| {
        match chat_template_file(choice, tok, opts, chat_template) {
            Some(file) => {
                anyhow::Error::new(e).context(format!("the chat template in {}", file.display()))
            }
            None => e.into(),
        }
    })
}

/// The file a `choice` template is read from, if it is read from one.
fn chat_template_file(
    choice: TemplateChoice,
    tok: &Tokenizer,
    opts: &TemplateOptions,
    chat_template: Option<&Path>,
) -> Option<PathBuf> {
    if !matches!(choice, TemplateChoice::Auto | TemplateChoice::Model) {
        return None;
    }
    if opts.chat_template.is_some() {
        return chat_template.map(Path::to_path_buf);
    }
    tok.config().chat_template.as_ref()?;
    // `chat_template.jinja` overrides the config's template (see `TokenizerConfig`).
    let named = |name: &str| {
        tok.source_files()
            .find(|p| p.file_name().is_some_and(|n| n == name))
            .map(Path::to_path_buf)
    };
    named("chat_template.jinja")
        .or_else(|| named("tokenizer_config.json"))
        .or_else(|| tok.origin().map(Path::to_path_buf))
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

#[cfg(test)]
mod tests {
    use super::*;
    use sft_tokenizer::{CharRoles, CharTokenizer, CHATML_SPECIALS};

    /// A char tokenizer saved with `tokenizer_config.json` holding `chat_template`, read back.
    fn tokenizer_with_template(dir: &Path, chat_template: &str) -> Tokenizer {
        let roles = CharRoles {
            bos_token: None,
            eos_token: Some("<|im_end|>".into()),
            pad_token: Some("<|pad|>".into()),
            unk_token: "<|unk|>".into(),
        };
        let chars =
            CharTokenizer::from_corpus(["abc user assistant\n"], &CHATML_SPECIALS, roles).unwrap();
        let mut tok = Tokenizer::from_char(chars);
        let mut config = tok.config().clone();
        config.chat_template = Some(chat_template.into());
        tok = tok.with_config(config);
        tok.save(dir).unwrap();
        Tokenizer::from_path(dir).unwrap()
    }

    #[test]
    fn a_broken_chat_template_names_its_file() {
        let dir = std::env::temp_dir().join(format!("sft-cli-template-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tok = tokenizer_with_template(&dir, "{% if messages %}never closed");
        let opts = TemplateOptions::default();
        let err = template(TemplateChoice::Auto, &tok, &opts, None).unwrap_err();
        let config = dir.join("tokenizer_config.json");
        assert_eq!(
            err.to_string(),
            format!("the chat template in {}", config.display())
        );
        assert!(format!("{err:#}").contains("syntax error"), "{err:#}");
        // A `--chat-template` file is named instead; a built-in template names no file.
        let flag = dir.join("mine.jinja");
        let opts = TemplateOptions {
            chat_template: Some("{{ raise_exception('no') }}".into()),
            ..TemplateOptions::default()
        };
        let err = template(TemplateChoice::Model, &tok, &opts, Some(&flag)).unwrap_err();
        assert!(err.to_string().contains("mine.jinja"), "{err:#}");
        assert!(template(TemplateChoice::ChatMl, &tok, &opts, Some(&flag)).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
