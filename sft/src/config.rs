//! `TrainConfig`: one TOML file describes a run; `--set section.key=value` overrides any key.
//!
//! Overrides are applied to the parsed TOML tree before deserialising, so they are type-checked
//! exactly like the file. Unknown keys are errors (`deny_unknown_fields` everywhere). Relative
//! paths are relative to the working directory, as in the command line. The resolved config is
//! saved next to every checkpoint.

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::{Deserialize, Serialize};
use sft_data::{Format, LengthPolicy, TemplateChoice, TrainOn};
use sft_model::LoraConfig;

use crate::error::{Error, Result};
use crate::optim::OptimConfig;
use crate::schedule::ScheduleConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub tokenizer: TokenizerSection,
    pub data: DataSection,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub train: TrainSection,
    pub run: RunSection,
    #[serde(default)]
    pub eval: EvalSection,
    /// The acceptance check of `cargo xtask train` (CI), which reads and validates it; a run
    /// keeps it as written.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub check: toml::Table,
    /// LoRA: train low-rank adapters on the frozen `model.path` instead of every weight.
    pub lora: Option<LoraConfig>,
}

/// Where the weights come from: exactly one of `path` (a checkpoint directory to fine-tune),
/// `preset` and/or `init` (a fresh, randomly initialised model).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face-layout checkpoint directory (`config.json`, `model.safetensors`), or a
    /// GGUF file (or a directory holding exactly one).
    pub path: Option<PathBuf>,
    /// A named architecture for a fresh model (see `sft_model::presets`).
    pub preset: Option<String>,
    /// `config.json` fields for a fresh model (override the preset's); `vocab_size` defaults to
    /// the tokenizer's.
    pub init: Option<toml::Table>,
    /// Training dtype: `f32` (default; the only sensible choice on CPU), `bf16`, `f16`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// dtype of saved weights; default: the checkpoint's own `torch_dtype` for `path` models,
    /// `f32` for fresh ones.
    pub save_dtype: Option<String>,
    /// An adapter directory (PEFT's files) to continue training on `path`; its
    /// `adapter_config.json` sets the LoRA settings.
    pub adapter: Option<PathBuf>,
}

fn default_dtype() -> String {
    "f32".into()
}

/// Where the tokenizer comes from: a path, the model directory (default), or built from the
/// training data.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSection {
    /// A tokenizer file or directory; defaults to `model.path`.
    pub path: Option<PathBuf>,
    /// Build one from the training files: `char` or `bpe`. Chats count as rendered by the
    /// template (role names, newlines), so the template's own text is in the vocabulary.
    pub build: Option<BuildTokenizer>,
    /// Marker set of a built tokenizer: `poem` (nanopoet markers) or `chatml`.
    pub specials: Option<SpecialsPreset>,
    /// Vocabulary size of a built BPE (default 4096).
    pub vocab_size: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildTokenizer {
    Char,
    Bpe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpecialsPreset {
    Poem,
    Chatml,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training data: files (`.jsonl`, `.json`, `.parquet`), dataset directories, hub dataset
    /// ids from the local cache (`HuggingFaceTB/smoltalk:all/train`), or tables that add a
    /// split, subset and mixture share (`{path = "a.jsonl", weight = 0.7}`).
    pub train: Vec<DataSource>,
    /// Validation data, as `train`; when empty, `val_ratio` of the training records is held out.
    #[serde(default)]
    pub validation: Vec<DataSource>,
    #[serde(default)]
    pub val_ratio: f64,
    /// Record format; detected from each line's keys when absent.
    pub format: Option<Format>,
    #[serde(default = "default_template")]
    pub template: TemplateChoice,
    /// A Jinja chat template file to use instead of the tokenizer's.
    pub chat_template: Option<PathBuf>,
    /// Extra chat-template variables, as `apply_chat_template(**kwargs)` takes them
    /// (`enable_thinking = false` for Qwen3).
    #[serde(default)]
    pub template_vars: toml::Table,
    /// Which tokens are trained on; per-record default when absent (assistant turns for chats,
    /// the completion for prompt/completion and poems, everything for text).
    pub train_on: Option<TrainOn>,
    /// Longest sample in tokens; default: the model's context length.
    pub max_len: Option<usize>,
    /// What happens to longer samples: `drop` (default), `truncate` or `error`.
    #[serde(default)]
    pub length_policy: LengthPolicy,
    /// Pack several samples per row (block-diagonal attention, positions restart per sample).
    #[serde(default)]
    pub packing: bool,
    /// Poems: probability of keeping each of author/style/title, redrawn every epoch.
    #[serde(default = "default_keep_prob")]
    pub metadata_keep_prob: f64,
    /// Count and report invalid lines instead of stopping at the first.
    #[serde(default)]
    pub skip_invalid: bool,
    /// Batch samples of similar length together (less padding).
    #[serde(default)]
    pub group_by_length: bool,
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Keep rendered and tokenized data on disk, keyed by everything rendering reads, so a
    /// re-run or a resumed run skips rendering (`sft::prepcache`).
    #[serde(default = "yes")]
    pub cache: bool,
    /// Where that cache lives (default `run.out_dir/cache`).
    pub cache_dir: Option<PathBuf>,
    /// Read, render and batch the training data as the run goes, through a seeded shuffle
    /// buffer, instead of holding it all in memory (`sft::stream`): JSONL a line at a time,
    /// parquet and JSON arrays a whole file at a time. Needs `train.max_steps` or
    /// `train.max_time`; validation comes from `data.validation`.
    #[serde(default)]
    pub streaming: bool,
    /// Samples in the streaming shuffle buffer (and records in its preflight report).
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// Keep only records whose fields have one of the listed values (poem fields: `author`,
    /// `style`, `title`): `{ style = ["七言绝句", "浣溪沙"], author = ["李白"] }`. Every listed
    /// field must match, or one of them with `filter_any`. Left-out records are counted in the
    /// preflight report. A `data.train` table's own `filter` replaces this one for its source.
    #[serde(default)]
    pub filter: std::collections::BTreeMap<String, Vec<String>>,
    /// `data.filter` keeps a record when any one listed field matches (nanopoet's "these
    /// styles, or these authors").
    #[serde(default)]
    pub filter_any: bool,
    /// Field values rewritten before filtering and training: per field, a table of old -> new
    /// values, or a JSON file holding one (`{ author = "configs/authors-t2s.json" }`).
    #[serde(default)]
    pub field_map: std::collections::BTreeMap<String, FieldMap>,
}

/// Replacements for one field's values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FieldMap {
    /// A JSON file with one object of old -> new values.
    File(PathBuf),
    Table(std::collections::BTreeMap<String, String>),
}

fn default_shuffle_buffer() -> usize {
    10_000
}

/// One entry of `data.train`: a path (or hub id) as a string, or a table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DataSource {
    Path(PathBuf),
    Table(DataSourceTable),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSourceTable {
    /// A file, a dataset directory or a hub dataset id.
    pub path: PathBuf,
    /// Of a dataset directory or hub id: the split (default `train`).
    pub split: Option<String>,
    /// Of a dataset directory or hub id: the subset (configuration), such as `all`.
    pub subset: Option<String>,
    /// A mixture share: the weighted sources together keep their total size, split in
    /// proportion to their weights, redrawn each epoch.
    pub weight: Option<f64>,
    /// A mixture share: exactly this many samples of the source per epoch (repeated passes
    /// when more than it has).
    pub samples: Option<usize>,
    /// A mixture share: the source's samples this many times per epoch (`2`: each twice;
    /// `0.5`: a seeded half), e.g. to weight a rare kind of record up.
    pub repeat: Option<f64>,
    /// Keep only this source's records whose fields have one of the listed values, in place of
    /// `data.filter` (`data.field_map` still applies); a file may be listed twice with two
    /// filters, and a record read twice is still held out whole by `val_ratio`.
    pub filter: Option<std::collections::BTreeMap<String, Vec<String>>>,
}

impl DataSource {
    /// The path, split and subset: a table's fields, or a string's `PATH[:SUBSET/SPLIT]` /
    /// `PATH[:SPLIT]` (the hub's spelling, `HuggingFaceTB/smoltalk:all/train`).
    pub fn location(&self) -> (PathBuf, Option<String>, Option<String>) {
        match self {
            DataSource::Table(t) => (t.path.clone(), t.split.clone(), t.subset.clone()),
            DataSource::Path(p) => {
                let text = p.to_string_lossy();
                match text.rsplit_once(':') {
                    Some((path, rest)) if !path.is_empty() && !rest.is_empty() && !p.exists() => {
                        match rest.split_once('/') {
                            Some((subset, split)) => {
                                (path.into(), Some(split.into()), Some(subset.into()))
                            }
                            None => (path.into(), Some(rest.into()), None),
                        }
                    }
                    _ => (p.clone(), None, None),
                }
            }
        }
    }

    pub fn share(&self) -> sft_data::Share {
        match self {
            DataSource::Table(DataSourceTable {
                samples: Some(n), ..
            }) => sft_data::Share::Samples(*n),
            DataSource::Table(DataSourceTable {
                weight: Some(w), ..
            }) => sft_data::Share::Weight(*w),
            DataSource::Table(DataSourceTable {
                repeat: Some(r), ..
            }) => sft_data::Share::Repeat(*r),
            _ => sft_data::Share::All,
        }
    }

    /// How the source is named in reports: its path as written.
    pub fn name(&self) -> String {
        match self {
            DataSource::Path(p) => p.display().to_string(),
            DataSource::Table(t) => {
                let mut name = t.path.display().to_string();
                if let Some(s) = &t.subset {
                    name.push_str(&format!(":{s}"));
                }
                if let Some(s) = &t.split {
                    name.push_str(&format!("/{s}"));
                }
                name
            }
        }
    }
}

impl From<PathBuf> for DataSource {
    fn from(p: PathBuf) -> DataSource {
        DataSource::Path(p)
    }
}

fn default_template() -> TemplateChoice {
    TemplateChoice::Auto
}

fn default_keep_prob() -> f64 {
    0.5
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Rows per micro-batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    #[serde(default = "one_u64")]
    pub epochs: u64,
    /// Stop after this many optimizer steps (overrides `epochs` for the schedule's length).
    pub max_steps: Option<u64>,
    /// A wall-clock budget for the training loop (evaluations and saves included): `"90s"`,
    /// `"30m"`, `"2h"`, `"1h30m"`. Training ends at the first optimizer step past it, and the
    /// schedule is planned for it: its total is estimated from the first steps' time per step
    /// and re-estimated at each evaluation (and every tenth of the run), so the decay ends with
    /// the budget. `epochs` then does not set the length; `max_steps` still caps it. A resumed
    /// run continues the budget.
    pub max_time: Option<String>,
    /// Stop once the validation loss has not improved by `min_delta` for `patience`
    /// evaluations in a row (`best/` holds the best model). Needs validation data and
    /// `run.eval_every`.
    pub early_stopping: Option<EarlyStopping>,
    /// Compute threads; default: the physical cores.
    pub threads: Option<usize>,
    /// Keep only each decoder layer's input for backward and recompute the layer there
    /// (activation checkpointing): the same gradients for a fraction of the activations'
    /// memory and about a third more compute.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    /// Evaluations without improvement before the run stops.
    pub patience: u64,
    /// How much lower than the best so far a validation loss must be to count as improving.
    #[serde(default)]
    pub min_delta: f64,
}

impl TrainSection {
    /// `max_time` in seconds.
    pub fn max_time_s(&self) -> Option<f64> {
        self.max_time
            .as_deref()
            .map(|t| parse_duration(t).expect("validated when the config was read"))
    }
}

/// `"90s"`, `"30m"`, `"2h"`, `"1h30m"`, `"1.5h"`: a duration in seconds. A bare number is
/// seconds.
pub fn parse_duration(text: &str) -> std::result::Result<f64, String> {
    let bad = || format!("{text:?} is not a duration (like \"90s\", \"30m\", \"2h\" or \"1h30m\")");
    let t = text.trim();
    if let Ok(seconds) = t.parse::<f64>() {
        return (seconds.is_finite() && seconds > 0.0)
            .then_some(seconds)
            .ok_or_else(bad);
    }
    let (mut total, mut number) = (0.0, String::new());
    for c in t.chars() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600.0,
            'm' => 60.0,
            's' => 1.0,
            _ => return Err(bad()),
        };
        let n: f64 = number.parse().map_err(|_| bad())?;
        total += n * unit;
        number.clear();
    }
    if !(number.is_empty() && total.is_finite() && total > 0.0) {
        return Err(bad());
    }
    Ok(total)
}

fn default_batch_size() -> usize {
    8
}

fn one() -> usize {
    1
}

fn one_u64() -> u64 {
    1
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            batch_size: default_batch_size(),
            grad_accum: 1,
            epochs: 1,
            max_steps: None,
            max_time: None,
            early_stopping: None,
            threads: None,
            gradient_checkpointing: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Where checkpoints, `metrics.jsonl` and the loss plot go.
    pub out_dir: PathBuf,
    /// The one seed every random choice derives from.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Log a metrics line every this many optimizer steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Evaluate every this many steps (and always at the end).
    pub eval_every: Option<u64>,
    /// Save a checkpoint every this many steps (and always at the end).
    pub save_every: Option<u64>,
    /// Checkpoints kept besides `best/`.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// A fresh run into an `out_dir` that holds another run's log or checkpoints removes them
    /// first; without it such a run is refused (`--overwrite` on the command line).
    #[serde(default)]
    pub overwrite: bool,
}

fn default_seed() -> u64 {
    42
}

fn default_log_every() -> u64 {
    10
}

fn default_keep_last() -> usize {
    2
}

/// Validation batches and the sample generations shown at each evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Rows per validation batch (default: `train.batch_size`).
    pub batch_size: Option<usize>,
    /// Prompts to generate from at each evaluation, as records: `{style = "七言绝句"}` for poems,
    /// `{messages = [...]}` for chats, `{prompt = "..."}` for plain text.
    #[serde(default)]
    pub samples: Vec<serde_json::Value>,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[serde(default)]
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
}

fn default_max_new_tokens() -> usize {
    64
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            batch_size: None,
            samples: vec![],
            max_new_tokens: default_max_new_tokens(),
            temperature: 0.0,
            top_k: None,
            top_p: None,
        }
    }
}

impl TrainConfig {
    /// Reads a TOML file and applies `--set` overrides (`section.key=value`).
    pub fn load(path: &Path, overrides: &[String]) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, overrides)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    pub fn from_toml_str(
        text: &str,
        overrides: &[String],
    ) -> std::result::Result<TrainConfig, String> {
        let cfg: TrainConfig = if overrides.is_empty() {
            // Straight from the text, so an error's line is the file's.
            toml::from_str(text).map_err(|e| e.to_string())?
        } else {
            let mut table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
            for o in overrides {
                apply_override(&mut table, o)?;
            }
            // Re-serialising makes toml's error messages quote the offending key in context.
            let merged = toml::to_string(&table).map_err(|e| e.to_string())?;
            match toml::from_str(&merged) {
                Ok(cfg) => cfg,
                // The lines are the merged text's: when the file alone fails the same way,
                // its error points at the file's own line.
                Err(e) => {
                    return Err(match toml::from_str::<TrainConfig>(text) {
                        Err(own) if own.message() == e.message() => own.to_string(),
                        _ => e.to_string(),
                    })
                }
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("the config always serialises")
    }

    /// The rules a config follows beyond its types, section by section; the first one broken
    /// is the error.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.validate_model()?;
        self.validate_data()?;
        self.validate_run()?;
        self.optim.validate()?;
        self.schedule.validate()?;
        Ok(())
    }

    /// `model`, `lora` and `tokenizer`.
    fn validate_model(&self) -> std::result::Result<(), String> {
        let m = &self.model;
        match (&m.path, m.preset.is_some() || m.init.is_some()) {
            (Some(_), true) => {
                return Err(
                    "model: set `path` (fine-tune) or `preset`/`init` (fresh model), not both"
                        .into(),
                )
            }
            (None, false) => return Err(
                "model: set `path` (a checkpoint to fine-tune) or `preset`/`init` (a fresh model)"
                    .into(),
            ),
            _ => {}
        }
        parse_dtype(&m.dtype).map_err(|e| format!("model.dtype: {e}"))?;
        if let Some(lora) = &self.lora {
            lora.validate()?;
        }
        if (self.lora.is_some() || m.adapter.is_some()) && m.path.is_none() {
            return Err(
                "lora: LoRA trains adapters on a base checkpoint (model.path); a fresh model \
                 has no base for the adapter to name"
                    .into(),
            );
        }
        if m.adapter.is_some() && self.lora.is_some() {
            return Err(
                "model.adapter: the adapter's adapter_config.json sets the LoRA settings; \
                 remove the [lora] section"
                    .into(),
            );
        }
        if let Some(d) = &m.save_dtype {
            parse_dtype(d).map_err(|e| format!("model.save_dtype: {e}"))?;
        }
        let t = &self.tokenizer;
        if t.path.is_some() && t.build.is_some() {
            return Err("tokenizer: set `path` or `build`, not both".into());
        }
        if t.path.is_none() && t.build.is_none() && m.path.is_none() {
            return Err(
                "tokenizer: a fresh model needs `tokenizer.path` or `tokenizer.build`".into(),
            );
        }
        Ok(())
    }

    /// `data`, with what streaming rules out elsewhere.
    fn validate_data(&self) -> std::result::Result<(), String> {
        if self.data.train.is_empty() {
            return Err("data.train: at least one training file is required".into());
        }
        let mut weighted = 0;
        for (i, source) in self.data.train.iter().enumerate() {
            if let DataSource::Table(t) = source {
                let shares = [t.weight.is_some(), t.samples.is_some(), t.repeat.is_some()];
                if shares.iter().filter(|&&s| s).count() > 1 {
                    return Err(format!(
                        "data.train[{i}]: set one of `weight`, `samples` and `repeat`"
                    ));
                }
                if t.weight.is_some_and(|w| !(w.is_finite() && w > 0.0)) {
                    return Err(format!("data.train[{i}].weight: must be positive"));
                }
                if t.repeat.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                    return Err(format!("data.train[{i}].repeat: must be positive"));
                }
                weighted += usize::from(t.weight.is_some());
            }
        }
        if weighted > 0 {
            if let Some(i) = self
                .data
                .train
                .iter()
                .position(|s| matches!(s.share(), sft_data::Share::All))
            {
                return Err(format!(
                    "data.train[{i}]: in a weighted mixture every source needs a `weight` (or `samples`)"
                ));
            }
        }
        let source_filters = self
            .data
            .train
            .iter()
            .chain(&self.data.validation)
            .filter_map(|s| match s {
                DataSource::Table(t) => t.filter.as_ref(),
                DataSource::Path(_) => None,
            });
        let mut fields: Vec<&String> = self
            .data
            .filter
            .keys()
            .chain(self.data.field_map.keys())
            .collect();
        let mut per_source = false;
        for f in source_filters {
            fields.extend(f.keys());
            per_source = true;
        }
        if per_source && self.data.streaming {
            return Err("data.streaming: a source's own `filter` needs the whole data in memory; use data.filter".into());
        }
        for field in fields {
            if !sft_data::select::FIELDS.contains(&field.as_str()) {
                return Err(format!(
                    "data.filter / data.field_map: unknown field `{field}` (poem records have {})",
                    sft_data::select::FIELDS.join(", ")
                ));
            }
        }
        if self.data.streaming {
            let d = &self.data;
            let refuse = |what: &str| Err(format!("data.streaming: {what}"));
            if self.train.max_steps.is_none() && self.train.max_time.is_none() {
                return refuse("needs train.max_steps or train.max_time (an epoch's length is unknown until it has been read)");
            }
            if d.val_ratio > 0.0 {
                return refuse(
                    "val_ratio cannot hold records out of a stream; give data.validation files",
                );
            }
            if weighted > 0
                || d.train
                    .iter()
                    .any(|s| !matches!(s.share(), sft_data::Share::All))
            {
                return refuse("mixture weights and sample counts need the whole data in memory; streaming reads the sources in order");
            }
            if d.group_by_length {
                return refuse("group_by_length needs the whole data in memory");
            }
            if self.tokenizer.build == Some(BuildTokenizer::Bpe) {
                return refuse("training a BPE tokenizer needs the whole corpus; build it once and give tokenizer.path");
            }
            if d.shuffle_buffer == 0 {
                return refuse("shuffle_buffer must be positive");
            }
        }
        for (i, source) in self.data.validation.iter().enumerate() {
            if !matches!(source.share(), sft_data::Share::All) {
                return Err(format!(
                    "data.validation[{i}]: weight, samples and repeat are for training sources"
                ));
            }
        }
        if !(0.0..1.0).contains(&self.data.val_ratio) {
            return Err(format!(
                "data.val_ratio: {} is outside [0, 1)",
                self.data.val_ratio
            ));
        }
        if !(0.0..=1.0).contains(&self.data.metadata_keep_prob) {
            return Err(format!(
                "data.metadata_keep_prob: {} is outside [0, 1]",
                self.data.metadata_keep_prob
            ));
        }
        if self.data.max_len == Some(0) {
            return Err("data.max_len: must be positive".into());
        }
        Ok(())
    }

    /// `train` and `run`.
    fn validate_run(&self) -> std::result::Result<(), String> {
        if self.train.batch_size == 0 || self.train.grad_accum == 0 {
            return Err("train.batch_size and train.grad_accum must be positive".into());
        }
        if self.train.epochs == 0 && self.train.max_steps.is_none() {
            return Err("train.epochs: must be positive (or set train.max_steps)".into());
        }
        if self.train.max_steps == Some(0) {
            return Err("train.max_steps: must be positive".into());
        }
        if let Some(t) = &self.train.max_time {
            parse_duration(t).map_err(|e| format!("train.max_time: {e}"))?;
        }
        if let Some(es) = &self.train.early_stopping {
            if es.patience == 0 {
                return Err("train.early_stopping.patience: must be positive".into());
            }
            if es.min_delta.is_nan() || es.min_delta < 0.0 {
                return Err(format!(
                    "train.early_stopping.min_delta: {} must be >= 0",
                    es.min_delta
                ));
            }
            if self.run.eval_every.is_none() {
                return Err(
                    "train.early_stopping: needs run.eval_every (evaluations to compare)".into(),
                );
            }
            if self.data.validation.is_empty() && self.data.val_ratio == 0.0 {
                return Err("train.early_stopping: needs validation data (data.validation or data.val_ratio)".into());
            }
        }
        if self.train.threads == Some(0) {
            return Err("train.threads: must be positive".into());
        }
        if self.run.log_every == 0
            || self.run.eval_every == Some(0)
            || self.run.save_every == Some(0)
        {
            return Err("run: log_every, eval_every and save_every must be positive".into());
        }
        Ok(())
    }
}

/// Keys a resumed run may change: how long it runs, and what it logs, saves and checks. Every
/// other key shapes the trajectory (data, model, batch, accumulation, seed, optimizer,
/// schedule), so changing it would break bit-identical resumption and is refused.
pub const RESUME_MUTABLE: &[&str] = &[
    "train.max_steps",
    "train.epochs",
    "train.max_time",
    "train.early_stopping",
    "train.threads",
    // The same gradients, bit for bit, either way.
    "train.gradient_checkpointing",
    "model.save_dtype",
    "data.cache",
    "data.cache_dir",
    "run.out_dir",
    "run.log_every",
    "run.eval_every",
    "run.save_every",
    "run.keep_last",
    "run.overwrite",
    "eval",
    "check",
];

/// One key that differs between a checkpoint's config and the config it resumes under.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigChange {
    /// Dotted key, `train.max_steps`.
    pub key: String,
    /// The checkpoint's value and the new one, as TOML (`none` where unset).
    pub before: String,
    pub after: String,
}

impl std::fmt::Display for ConfigChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} -> {}", self.key, self.before, self.after)
    }
}

impl TrainConfig {
    /// The keys in which `self` differs from `saved` (the config of the checkpoint being
    /// resumed): `Ok` with the changes when all are in [`RESUME_MUTABLE`], else `Err` with the
    /// ones that are not.
    pub fn resume_changes(
        &self,
        saved: &TrainConfig,
    ) -> std::result::Result<Vec<ConfigChange>, Vec<ConfigChange>> {
        let flat = |cfg: &TrainConfig| {
            let value = toml::Value::try_from(cfg).expect("the config always serialises");
            let mut out = std::collections::BTreeMap::new();
            flatten("", &value, &mut out);
            out
        };
        let (a, b) = (flat(saved), flat(self));
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let show = |v: Option<&toml::Value>| v.map_or("none".to_string(), |v| v.to_string());
        let changes: Vec<ConfigChange> = keys
            .into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| ConfigChange {
                key: k.clone(),
                before: show(a.get(k)),
                after: show(b.get(k)),
            })
            .collect();
        let mutable = |key: &str| {
            RESUME_MUTABLE
                .iter()
                .any(|m| key == *m || key.strip_prefix(m).is_some_and(|r| r.starts_with('.')))
        };
        let (ok, refused): (Vec<_>, Vec<_>) = changes.into_iter().partition(|c| mutable(&c.key));
        if refused.is_empty() {
            Ok(ok)
        } else {
            Err(refused)
        }
    }
}

/// Leaves of a TOML tree by dotted key; arrays are leaves.
fn flatten(
    prefix: &str,
    value: &toml::Value,
    out: &mut std::collections::BTreeMap<String, toml::Value>,
) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        leaf => {
            out.insert(prefix.to_string(), leaf.clone());
        }
    }
}

/// `f32`/`float32`, `bf16`/`bfloat16`, `f16`/`float16`.
pub fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        "f64" | "float64" => Ok(DType::F64),
        other => Err(format!(
            "unknown dtype {other:?} (expected f32, bf16 or f16)"
        )),
    }
}

/// The short name of `dtype` (`f32`, `bf16`, `f16`, `f64`), as [`parse_dtype`] reads it.
pub fn dtype_name(dtype: DType) -> String {
    format!("{dtype:?}").to_lowercase()
}

/// Applies `a.b.c=value`; the value is read as TOML (`3`, `1e-4`, `true`, `"x"`, `[1, 2]`) and
/// falls back to a plain string, so `--set run.out_dir=runs/x` needs no quotes.
fn apply_override(table: &mut toml::Table, spec: &str) -> std::result::Result<(), String> {
    let (path, raw) = spec
        .split_once('=')
        .ok_or_else(|| format!("--set {spec:?}: expected section.key=value"))?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(format!("--set {spec:?}: empty key in {path:?}"));
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {}", raw.trim())) {
        Ok(mut t) => t.remove("v").expect("parsed above"),
        Err(_) => toml::Value::String(raw.trim().to_owned()),
    };
    let (last, parents) = keys.split_last().expect("split yields at least one key");
    let mut cur = table;
    for k in parents {
        let entry = cur
            .entry(k.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("--set {spec:?}: `{k}` is not a section"))?;
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_read_back() {
        for d in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            assert_eq!(parse_dtype(&dtype_name(d)), Ok(d));
        }
    }

    const BASE: &str = r#"
        [model]
        path = "ckpt"

        [data]
        train = ["train.jsonl"]

        [run]
        out_dir = "runs/x"
    "#;

    #[test]
    fn defaults_are_the_documented_ones() {
        let cfg = TrainConfig::from_toml_str(BASE, &[]).unwrap();
        assert_eq!(cfg.optim.lr, 2e-5);
        assert_eq!(cfg.optim.max_grad_norm, 1.0);
        assert_eq!(cfg.train.batch_size, 8);
        assert_eq!(cfg.run.seed, 42);
        assert_eq!(cfg.data.length_policy, LengthPolicy::Drop);
        assert_eq!(cfg.data.template, TemplateChoice::Auto);
        assert!(cfg.data.shuffle);
        // The saved form reads back to the same config.
        let again = TrainConfig::from_toml_str(&cfg.to_toml_string(), &[]).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn overrides_are_type_checked() {
        let sets = [
            "optim.lr=3e-4".to_string(),
            "train.batch_size=2".into(),
            "run.out_dir=runs/other".into(),
            "data.train_on=last".into(),
            "data.packing=true".into(),
            "schedule.kind=linear".into(),
        ];
        let cfg = TrainConfig::from_toml_str(BASE, &sets).unwrap();
        assert_eq!(cfg.optim.lr, 3e-4);
        assert_eq!(cfg.train.batch_size, 2);
        assert_eq!(cfg.run.out_dir, PathBuf::from("runs/other"));
        assert_eq!(cfg.data.train_on, Some(TrainOn::Last));
        assert!(cfg.data.packing);
        let err = TrainConfig::from_toml_str(BASE, &["train.batch_size=two".into()]).unwrap_err();
        assert!(
            err.contains("batch_size") || err.contains("invalid type"),
            "{err}"
        );
        let err = TrainConfig::from_toml_str(BASE, &["optim.lr".into()]).unwrap_err();
        assert!(err.contains("section.key=value"), "{err}");
    }

    #[test]
    fn lora_sections_are_read_and_checked() {
        let cfg = TrainConfig::from_toml_str(BASE, &["lora.r=8".into()]).unwrap();
        let lora = cfg.lora.as_ref().unwrap();
        assert_eq!((lora.r, lora.alpha, lora.dropout), (8, 32.0, 0.05));
        assert_eq!(lora.target_modules, ["all-linear"]);
        let again = TrainConfig::from_toml_str(&cfg.to_toml_string(), &[]).unwrap();
        assert_eq!(again, cfg);
        let err = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            TrainConfig::from_toml_str(BASE, &sets).unwrap_err()
        };
        assert!(err(&["lora.r=0"]).contains("lora.r"));
        assert!(err(&["lora.dropout=1.0"]).contains("lora.dropout"));
        assert!(err(&["lora.rank=8"]).contains("rank"));
        let e = err(&["lora.r=8", "model.adapter=runs/a/final"]);
        assert!(e.contains("remove the [lora] section"), "{e}");
        let fresh = BASE.replace("path = \"ckpt\"", "preset = \"tiny-gpt\"");
        let e = TrainConfig::from_toml_str(&fresh, &["lora.r=8".into()]).unwrap_err();
        assert!(e.contains("model.path"), "{e}");
    }

    #[test]
    fn resuming_may_change_the_length_and_the_logging_only() {
        let saved = TrainConfig::from_toml_str(BASE, &["train.max_steps=10".into()]).unwrap();
        let same = saved.clone();
        assert_eq!(same.resume_changes(&saved), Ok(vec![]));
        let longer = TrainConfig::from_toml_str(
            BASE,
            &[
                "train.max_steps=20".into(),
                "run.log_every=1".into(),
                "eval.temperature=0.5".into(),
            ],
        )
        .unwrap();
        let changes = longer.resume_changes(&saved).unwrap();
        let shown: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            shown,
            [
                "eval.temperature 0.0 -> 0.5",
                "run.log_every 10 -> 1",
                "train.max_steps 10 -> 20"
            ]
        );
        let other = TrainConfig::from_toml_str(
            BASE,
            &[
                "train.max_steps=20".into(),
                "optim.lr=1e-3".into(),
                "train.batch_size=2".into(),
                "run.seed=7".into(),
                "data.train=[\"other.jsonl\"]".into(),
            ],
        )
        .unwrap();
        let refused: Vec<String> = other
            .resume_changes(&saved)
            .unwrap_err()
            .into_iter()
            .map(|c| c.key)
            .collect();
        assert_eq!(
            refused,
            ["data.train", "optim.lr", "run.seed", "train.batch_size"]
        );
        // A key that was unset on one side counts too.
        let accum = TrainConfig::from_toml_str(BASE, &["train.grad_accum=4".into()]).unwrap();
        let refused = accum.resume_changes(&saved).unwrap_err();
        assert_eq!(refused[0].key, "train.grad_accum");
    }

    #[test]
    fn data_sources_are_paths_hub_ids_or_tables() {
        let cfg = TrainConfig::from_toml_str(
            BASE,
            &[r#"data.train=["a.jsonl", "HuggingFaceTB/smoltalk:all/train", "Owner/Set:test", {path = "b.parquet", weight = 0.3}, {path = "d", split = "dev", subset = "x", samples = 50}]"#.into()],
        );
        let err = cfg.unwrap_err();
        assert!(err.contains("every source needs a `weight`"), "{err}");
        let cfg = TrainConfig::from_toml_str(
            BASE,
            &[r#"data.train=["a.jsonl", "HuggingFaceTB/smoltalk:all/train", "Owner/Set:test", {path = "d", split = "dev", subset = "x", samples = 50}]"#.into()],
        )
        .unwrap();
        let locs: Vec<_> = cfg.data.train.iter().map(|s| s.location()).collect();
        let s = |x: &str| Some(x.to_string());
        assert_eq!(
            locs,
            vec![
                ("a.jsonl".into(), None, None),
                ("HuggingFaceTB/smoltalk".into(), s("train"), s("all")),
                ("Owner/Set".into(), s("test"), None),
                ("d".into(), s("dev"), s("x")),
            ]
        );
        assert_eq!(cfg.data.train[3].share(), sft_data::Share::Samples(50));
        assert_eq!(cfg.data.train[3].name(), "d:x/dev");
        // A table round-trips through the saved config.
        let again = TrainConfig::from_toml_str(&cfg.to_toml_string(), &[]).unwrap();
        assert_eq!(again, cfg);
        let err = TrainConfig::from_toml_str(
            BASE,
            &[r#"data.train=[{path = "a", weight = 1.0, samples = 3}]"#.into()],
        )
        .unwrap_err();
        assert!(
            err.contains("one of `weight`, `samples` and `repeat`"),
            "{err}"
        );
        // A source's own filter and repeat: read, round-tripped, refused where they cannot work.
        let cfg = TrainConfig::from_toml_str(
            BASE,
            &[r#"data.train=["a.jsonl", {path = "a.jsonl", filter = {style = ["x"]}, repeat = 2.5}]"#.into()],
        )
        .unwrap();
        assert_eq!(cfg.data.train[1].share(), sft_data::Share::Repeat(2.5));
        assert_eq!(
            TrainConfig::from_toml_str(&cfg.to_toml_string(), &[]).unwrap(),
            cfg
        );
        for (set, needle) in [
            (
                r#"data.train=[{path = "a", repeat = 0.0}]"#,
                "repeat: must be positive",
            ),
            (
                r#"data.train=[{path = "a", repeat = 2.0, samples = 3}]"#,
                "one of",
            ),
            (
                r#"data.train=[{path = "a", filter = {colour = ["x"]}}]"#,
                "colour",
            ),
            (
                r#"data.validation=[{path = "a", repeat = 2.0}]"#,
                "training sources",
            ),
        ] {
            let err = TrainConfig::from_toml_str(BASE, &[set.into()]).unwrap_err();
            assert!(err.contains(needle), "{set}: {err}");
        }
        let err = TrainConfig::from_toml_str(
            BASE,
            &[
                r#"data.train=[{path = "a", filter = {style = ["x"]}}]"#.into(),
                "data.streaming=true".into(),
                "train.max_steps=5".into(),
            ],
        )
        .unwrap_err();
        assert!(err.contains("own `filter`"), "{err}");
        let err =
            TrainConfig::from_toml_str(BASE, &[r#"data.train=[{paht = "a"}]"#.into()]).unwrap_err();
        assert!(
            err.contains("data.train") || err.contains("variant"),
            "{err}"
        );
    }

    #[test]
    fn durations_read_as_people_write_them() {
        for (text, seconds) in [
            ("90s", 90.0),
            ("30m", 1800.0),
            ("2h", 7200.0),
            ("1h30m", 5400.0),
            ("1.5h", 5400.0),
            ("45", 45.0),
        ] {
            assert_eq!(parse_duration(text), Ok(seconds), "{text}");
        }
        for bad in ["", "m", "10x", "1h30", "-5m", "0s", "h1"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let err = TrainConfig::from_toml_str(BASE, &["train.max_time=soon".into()]).unwrap_err();
        assert!(err.contains("train.max_time"), "{err}");
        let err = TrainConfig::from_toml_str(BASE, &["train.early_stopping={patience = 2}".into()])
            .unwrap_err();
        assert!(err.contains("run.eval_every"), "{err}");
        let cfg = TrainConfig::from_toml_str(
            BASE,
            &[
                "train.early_stopping={patience = 2, min_delta = 0.01}".into(),
                "run.eval_every=10".into(),
                "data.val_ratio=0.1".into(),
                "train.max_time=\"2m\"".into(),
            ],
        )
        .unwrap();
        assert_eq!(cfg.train.max_time_s(), Some(120.0));
        assert_eq!(cfg.train.early_stopping.unwrap().patience, 2);
    }

    /// `[check]` is `cargo xtask train`'s, which reads and validates it: a run keeps any table
    /// there as written (through the saved config, and it may change on resume), while every
    /// other section still refuses keys it does not know.
    #[test]
    fn check_is_kept_as_written() {
        let text = format!("{BASE}\n[check]\nmax_val_loss = 2.5\nnot_read_here = \"kept\"\n");
        let cfg = TrainConfig::from_toml_str(&text, &[]).unwrap();
        assert_eq!(
            cfg.check.get("max_val_loss"),
            Some(&toml::Value::Float(2.5))
        );
        assert_eq!(
            TrainConfig::from_toml_str(&cfg.to_toml_string(), &[]).unwrap(),
            cfg
        );
        let set = TrainConfig::from_toml_str(&text, &["check.max_val_loss=1.5".into()]).unwrap();
        assert_eq!(
            set.check.get("max_val_loss"),
            Some(&toml::Value::Float(1.5))
        );
        let plain = TrainConfig::from_toml_str(BASE, &[]).unwrap();
        assert!(plain.check.is_empty());
        assert!(!plain.to_toml_string().contains("[check]"));
        let keys: Vec<String> = cfg
            .resume_changes(&plain)
            .unwrap()
            .into_iter()
            .map(|c| c.key)
            .collect();
        assert_eq!(keys, ["check.max_val_loss", "check.not_read_here"]);
        let err = TrainConfig::from_toml_str(&format!("check = 3\n{BASE}"), &[]).unwrap_err();
        assert!(err.contains("check"), "{err}");
        let err = TrainConfig::from_toml_str(&format!("{BASE}\n[eval]\nmax_new_tokns = 3\n"), &[])
            .unwrap_err();
        assert!(err.contains("max_new_tokns"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = TrainConfig::from_toml_str(BASE, &["optim.lrr=1".into()]).unwrap_err();
        assert!(err.contains("lrr"), "{err}");
        let err =
            TrainConfig::from_toml_str(&format!("{BASE}\n[bogus]\nx = 1\n"), &[]).unwrap_err();
        assert!(err.contains("bogus"), "{err}");
        let err =
            TrainConfig::from_toml_str(BASE, &["data.train_on=everything".into()]).unwrap_err();
        assert!(err.contains("everything"), "{err}");
        let err = TrainConfig::from_toml_str(BASE, &["optim.lr=-1".into()]).unwrap_err();
        assert!(err.contains("optim.lr"), "{err}");
        let err =
            TrainConfig::from_toml_str(BASE, &["model.preset=tiny-qwen2".into()]).unwrap_err();
        assert!(err.contains("not both"), "{err}");
        let err = TrainConfig::from_toml_str(BASE, &["model.dtype=f8".into()]).unwrap_err();
        assert!(err.contains("model.dtype"), "{err}");
        let err = TrainConfig::from_toml_str(BASE, &["data.val_ratio=1.5".into()]).unwrap_err();
        assert!(err.contains("val_ratio"), "{err}");
    }
}
