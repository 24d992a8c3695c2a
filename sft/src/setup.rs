//! Building the pieces of a run from its config: device, tokenizer, template, model.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use sft_data::{Record, Sample, Template, TemplateOptions};
use sft_model::{Model, ModelConfig, Quantize};
use sft_tokenizer::{
    train_bpe, BpeTrainOptions, CharRoles, CharTokenizer, Tokenizer, TokenizerConfig,
    CHATML_SPECIALS, POEM_SPECIALS,
};

use crate::config::{parse_dtype, BuildTokenizer, SpecialsPreset, TrainConfig};
use crate::error::{Error, Result};

/// The first CUDA GPU when `sft` is built with the `cuda` feature and the driver opens one, else
/// the CPU. candle's `cuda_is_available` only says that the feature is compiled in, so the GPU is
/// opened to find out; callers name the device they got (`Event::Started`, the bench JSON), so a
/// CPU fallback is never silent.
pub fn device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    if let Ok(gpu) = Device::new_cuda(0) {
        return Ok(gpu);
    }
    Ok(Device::Cpu)
}

/// `cpu`, `cuda:0`, `metal:0`.
pub fn device_name(dev: &Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The tokenizer named by the config, the model's own, or one built from the training text.
pub fn tokenizer(cfg: &TrainConfig, records: &[Record]) -> Result<Tokenizer> {
    let t = &cfg.tokenizer;
    if let Some(path) = &t.path {
        return crate::gguf::load_tokenizer(&crate::hub::resolve_model_or_tokenizer(path));
    }
    let Some(build) = t.build else {
        let path = cfg
            .model
            .path
            .as_ref()
            .expect("validated: a fresh model names its tokenizer");
        return crate::gguf::load_tokenizer(&crate::hub::resolve_model(path)?);
    };
    let texts: Vec<&str> = records.iter().flat_map(record_texts).collect();
    let preset = t
        .specials
        .unwrap_or(match records.first().map(|r| &r.sample) {
            Some(Sample::Poem(_)) => SpecialsPreset::Poem,
            _ => SpecialsPreset::Chatml,
        });
    let (specials, roles) = match preset {
        SpecialsPreset::Poem => (
            POEM_SPECIALS.all(),
            CharRoles {
                bos_token: Some(POEM_SPECIALS.begin.into()),
                eos_token: Some(POEM_SPECIALS.content.1.into()),
                pad_token: Some(POEM_SPECIALS.pad.into()),
                unk_token: POEM_SPECIALS.unk.into(),
            },
        ),
        SpecialsPreset::Chatml => (
            CHATML_SPECIALS.to_vec(),
            CharRoles {
                bos_token: None,
                eos_token: Some("<|im_end|>".into()),
                pad_token: Some("<|pad|>".into()),
                unk_token: "<|unk|>".into(),
            },
        ),
    };
    // A chat template writes text of its own (role names, newlines) around the contents; the
    // vocabulary must cover that too, or every such character becomes the unknown token. So a
    // chat's corpus text is its rendering (special-token strings taken out), through a first
    // tokenizer built from the contents alone.
    let mut rendered: Vec<String> = Vec::new();
    if records.iter().any(|r| matches!(r.sample, Sample::Chat(_))) {
        let first = Tokenizer::from_char(CharTokenizer::from_corpus(
            texts.iter().copied(),
            &specials,
            roles.clone(),
        )?);
        let template = template(cfg, &first)?;
        for r in records {
            if let Sample::Chat(c) = &r.sample {
                let mut text = template.render_chat_text(c.messages(), c.tools(), false)?;
                for s in &specials {
                    text = text.replace(s, "");
                }
                rendered.push(text);
            }
        }
    }
    let texts: Vec<&str> = records
        .iter()
        .filter(|r| !matches!(r.sample, Sample::Chat(_)))
        .flat_map(record_texts)
        .chain(rendered.iter().map(String::as_str))
        .collect();
    match build {
        BuildTokenizer::Char => Ok(Tokenizer::from_char(CharTokenizer::from_corpus(
            texts, &specials, roles,
        )?)),
        BuildTokenizer::Bpe => {
            let config = TokenizerConfig {
                bos_token: roles.bos_token,
                eos_token: roles.eos_token,
                pad_token: roles.pad_token,
                unk_token: None,
                ..TokenizerConfig::default()
            };
            let opts = BpeTrainOptions {
                vocab_size: t.vocab_size.unwrap_or(4096),
                min_frequency: 2,
                special_tokens: specials.iter().map(|s| s.to_string()).collect(),
                config,
            };
            Ok(train_bpe(texts.into_iter(), &opts)?)
        }
    }
}

/// The chat template and its options from the `data` section.
pub fn template(cfg: &TrainConfig, tok: &Tokenizer) -> Result<Template> {
    let chat_template = match &cfg.data.chat_template {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?),
        None => None,
    };
    let variables = serde_json::to_value(&cfg.data.template_vars)
        .map_err(|e| Error::Config(format!("data.template_vars: {e}")))?;
    let opts = TemplateOptions {
        chat_template,
        variables: variables.as_object().cloned().unwrap_or_default(),
    };
    Ok(Template::with_options(cfg.data.template, tok, &opts)?)
}

/// Every piece of text a record carries: the corpus a built tokenizer learns from.
pub(crate) fn record_texts(r: &Record) -> Vec<&str> {
    match &r.sample {
        Sample::Chat(c) => c.messages().iter().map(|m| m.content.as_str()).collect(),
        Sample::Completion { prompt, completion } => vec![prompt, completion],
        Sample::Text(t) => vec![t],
        Sample::Poem(p) => vec![&p.author, &p.style, &p.title, &p.content],
    }
}

/// The model to train: a checkpoint, or a fresh one from a preset and/or an `init` table; with
/// LoRA, adapters on it (`model.adapter`'s, else fresh ones).
pub fn model(cfg: &TrainConfig, tok: &Tokenizer, dtype: DType, device: &Device) -> Result<Model> {
    let base = base_model(cfg, tok, dtype, device)?;
    Ok(match (&cfg.model.adapter, &cfg.lora) {
        (Some(dir), _) => base.load_adapter(dir)?,
        (None, Some(lora)) => base.with_lora(lora, cfg.run.seed)?,
        (None, None) => base,
    })
}

/// The model a resumed run continues: the checkpoint's weights, or for LoRA the base of
/// `model.path` with the checkpoint's adapter.
pub fn resumed_model(
    cfg: &TrainConfig,
    tok: &Tokenizer,
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<Model> {
    if sft_model::is_adapter_dir(dir) {
        return Ok(base_model(cfg, tok, dtype, device)?.load_adapter(dir)?);
    }
    Ok(Model::load(dir, dtype, device)?)
}

/// The name an adapter gives its base (`base_model_name_or_path`): `model.path` as written.
pub fn base_name(cfg: &TrainConfig) -> String {
    cfg.model
        .path
        .as_ref()
        .map_or(String::new(), |p| p.display().to_string())
}

/// The model an evaluation or generation command runs: a checkpoint, or an adapter directory
/// on its base (`base`, else the adapter's `base_model_name_or_path`, a directory or a hub id in
/// the local cache), or `base` with `adapter`.
pub fn load_for_inference(
    path: &Path,
    adapter: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<Model> {
    let (base, adapter) = match adapter {
        Some(a) => (Some(path), a),
        None if sft_model::is_adapter_dir(path) => (None, path),
        None => return crate::gguf::load_model(path, dtype, device),
    };
    let base = match base {
        Some(b) => crate::hub::resolve_model(b)?,
        None => adapter_base(adapter)?,
    };
    let model = crate::gguf::load_model(&base, dtype, device)?;
    Ok(model.load_adapter(adapter)?)
}

/// Whether `path` carries a tokenizer of its own: a `tokenizer.json` or `char_tokenizer.json`
/// in the directory, or a GGUF file (whose metadata holds one).
pub fn has_tokenizer(path: &Path) -> bool {
    ["tokenizer.json", "char_tokenizer.json"]
        .iter()
        .any(|f| path.join(f).is_file())
        || matches!(crate::gguf::gguf_path(path), Ok(Some(_)))
}

/// The tokenizer an inference command uses for `model` (with `adapter`): the adapter's when it
/// carries one (an `sft` adapter does), else the base's (`model`, or, for an adapter directory
/// given alone, its `base_model_name_or_path`).
pub fn inference_tokenizer(model: &Path, adapter: Option<&Path>) -> Result<Tokenizer> {
    let has_tokenizer = |d: &Path| {
        ["tokenizer.json", "char_tokenizer.json"]
            .iter()
            .any(|f| d.join(f).is_file())
    };
    let dir = match adapter {
        Some(a) if has_tokenizer(a) => a.to_path_buf(),
        Some(_) => model.to_path_buf(),
        None if sft_model::is_adapter_dir(model) && !has_tokenizer(model) => adapter_base(model)?,
        None => model.to_path_buf(),
    };
    crate::gguf::load_tokenizer(&dir)
}

/// Where an adapter directory's base checkpoint is: `base_model_name_or_path` as a GGUF file or
/// a directory (as written, or beside the adapter), else as a hub id in the local cache.
pub fn adapter_base(adapter: &Path) -> Result<PathBuf> {
    let ac = sft_model::read_adapter_config(adapter)?;
    let Some(base) = ac.base else {
        return Err(Error::Config(format!(
            "{}: base_model_name_or_path is not set; give the base with --base",
            adapter.join(sft_model::ADAPTER_CONFIG_FILE).display()
        )));
    };
    // A GGUF base: the file (or its directory) as written, or beside the adapter.
    for p in [PathBuf::from(&base), adapter.join(&base)] {
        if crate::gguf::gguf_path(&p)?.is_some() {
            return Ok(p);
        }
    }
    match sft_model::base_dir(adapter, &base) {
        Ok(dir) => Ok(dir),
        Err(not_a_dir) => match crate::hub::HubId::parse(&base) {
            Some(_) => crate::hub::resolve_model(Path::new(&base)),
            None => Err(not_a_dir.into()),
        },
    }
}

/// The model without adapters.
fn base_model(cfg: &TrainConfig, tok: &Tokenizer, dtype: DType, device: &Device) -> Result<Model> {
    if let Some(path) = &cfg.model.path {
        let path = crate::hub::resolve_model(path)?;
        let quantize = match base_quant(cfg) {
            Some(q) => Some(quantize_frozen(cfg, &crate::gguf::model_config(&path)?, q)?),
            None => None,
        };
        return crate::gguf::load_model_with(&path, dtype, device, quantize.as_ref());
    }
    let mut json = match &cfg.model.preset {
        Some(name) => sft_model::presets::preset(name).ok_or_else(|| {
            Error::Config(format!(
                "model.preset: unknown preset {name:?} (known: {})",
                sft_model::presets::NAMES.join(", ")
            ))
        })?,
        None => serde_json::Value::Object(Default::default()),
    };
    let obj = json.as_object_mut().expect("presets are objects");
    if let Some(init) = &cfg.model.init {
        let init =
            serde_json::to_value(init).map_err(|e| Error::Config(format!("model.init: {e}")))?;
        for (k, v) in init.as_object().expect("a table").iter() {
            obj.insert(k.clone(), v.clone());
        }
    }
    obj.entry("vocab_size")
        .or_insert_with(|| tok.vocab_size().into());
    let config = ModelConfig::from_json_str(&json.to_string())
        .map_err(|e| Error::Config(format!("model.init: {e}")))?;
    let model = Model::init(&config, cfg.run.seed, dtype, device)?;
    Ok(match base_quant(cfg) {
        Some(q) => model.quantized_with(&quantize_frozen(cfg, &config, q)?)?,
        None => model,
    })
}

/// `lora.base_quant`, when set.
fn base_quant(cfg: &TrainConfig) -> Option<&str> {
    cfg.lora.as_ref().and_then(|l| l.base_quant.as_deref())
}

/// What a quantized base keeps as blocks: every matrix LoRA leaves frozen, in `quant`'s type.
fn quantize_frozen(cfg: &TrainConfig, config: &ModelConfig, quant: &str) -> Result<Quantize> {
    let lora = cfg.lora.as_ref().expect("base_quant is a [lora] key");
    let dtype = sft_model::quant::quant_type(quant)
        .ok_or_else(|| Error::Config(format!("lora.base_quant: unknown type {quant:?}")))?;
    let names = sft_model::frozen_matrices(config, lora).map_err(Error::Config)?;
    Ok(Quantize { dtype, names })
}

/// What a quantized base holds, per ggml type: `q4_k: 168 tensors, q5_0: 72`, the types a
/// tensor fell back to when its rows are not whole blocks of the one asked for included.
pub fn quantized_summary(model: &Model) -> Option<String> {
    let mut counts = std::collections::BTreeMap::new();
    for (_, q) in model.quantized() {
        *counts
            .entry(sft_model::quant::quant_name(q.dtype()))
            .or_insert(0usize) += 1;
    }
    (!counts.is_empty()).then(|| {
        counts
            .iter()
            .map(|(t, n)| format!("{t}: {n} tensors"))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// Every id the tokenizer can produce must have a row in the embedding.
pub fn check_vocab(model: &Model, tok: &Tokenizer) -> Result<()> {
    let (m, t) = (model.config().vocab_size(), tok.vocab_size());
    if t > m {
        return Err(Error::Config(format!(
            "the tokenizer has {t} tokens but the model's vocabulary is {m}: they do not belong together"
        )));
    }
    Ok(())
}

/// `data.max_len`, else the model's context; longer than the context is an error now rather
/// than at the first sample that long, mid-run.
pub fn max_len(cfg: &TrainConfig, model: &Model) -> Result<usize> {
    let context = model.config().max_positions();
    let max_len = cfg.data.max_len.unwrap_or(context);
    if max_len > context {
        return Err(Error::Config(format!(
            "data.max_len = {max_len} is longer than the model's context of {context} positions"
        )));
    }
    Ok(max_len)
}

/// Padding never reaches the loss or attention, so any valid id will do; the tokenizer's own
/// pad (or eos) keeps batches readable when printed.
pub fn pad_id(tok: &Tokenizer) -> u32 {
    tok.pad_id().or(tok.eos_id()).unwrap_or(0)
}

/// The dtype the exported model is written in: `model.save_dtype`, else the checkpoint's own
/// `torch_dtype`, else the training dtype.
pub fn save_dtype(cfg: &TrainConfig, model: &Model) -> Result<DType> {
    if let Some(d) = &cfg.model.save_dtype {
        return parse_dtype(d).map_err(Error::Config);
    }
    if let Some(path) = &cfg.model.path {
        if let Some(d) = checkpoint_dtype(&crate::hub::resolve_model(path)?) {
            return Ok(d);
        }
    }
    Ok(model.dtype())
}

/// The dtype a checkpoint's `config.json` says its weights are in (`torch_dtype`, or
/// `transformers` 5's `dtype`), when it says one this crate knows.
pub fn checkpoint_dtype(dir: &Path) -> Option<DType> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let d = v.get("torch_dtype").or(v.get("dtype"))?.as_str()?;
    parse_dtype(d).ok()
}
