//! LoRA's plan: which tensors a LoRA configuration adapts and trains on a model.
//!
//! An adapted layer computes `x W^T + b + scale * dropout(x) A^T B^T` with `A` (r, in) and `B`
//! (out, r); `scale` is `alpha / r` (`alpha / sqrt(r)` with rsLoRA). A starts Kaiming-uniform
//! and B at zero, as PEFT starts them, so a fresh adapter leaves the model's outputs exactly as
//! they were. The base weights are frozen; `modules_to_save` names modules trained fully.
//!
//! [`plan`] is the one place that tells trainable from frozen parameters: `Model::with_lora`
//! and `Model::load_adapter` (`adapter.rs`) both split the base's parameters by it, and the
//! model's backward pass computes no weight gradient for a frozen tensor
//! (`backward::Grads::wants`).

use std::collections::BTreeSet;

use serde::{Deserialize, Deserializer, Serialize};

use crate::config::ModelConfig;
use crate::params::{Init, Kind, ParamSpec};
use crate::weights::{lora_a_name, lora_b_name};

/// `target_modules` value meaning every linear layer but the output head, as in PEFT.
pub const ALL_LINEAR: &str = "all-linear";

/// The `[lora]` section of a training config, and what an adapter's `adapter_config.json`
/// says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the adapters.
    #[serde(default = "default_r")]
    pub r: usize,
    /// The update is scaled by `alpha / r` (`alpha / sqrt(r)` with `use_rslora`).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on an adapter's input, in training only.
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    /// Module names (`q_proj`, `c_attn`, ...: a module matches when its path is the name or ends
    /// with `.name`), or `"all-linear"`: every linear layer except the output head.
    #[serde(
        default = "default_targets",
        deserialize_with = "one_or_many",
        serialize_with = "serialize_targets"
    )]
    pub target_modules: Vec<String>,
    /// Modules trained fully (`embed_tokens`, `lm_head`, ...), saved whole in the adapter.
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// Keep the frozen base's matrices (linear weights, embeddings, an untied head) as ggml
    /// blocks of this type (`q8_0`, `q4_k`, `q6_k`, `q4_0`, ...; see `quant::QUANT_NAMES`):
    /// QLoRA's memory for LoRA's gradients. A training option, not a property of the adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_quant: Option<String>,
}

fn default_r() -> usize {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn default_dropout() -> f64 {
    0.05
}
fn default_targets() -> Vec<String> {
    vec![ALL_LINEAR.into()]
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

fn serialize_targets<S: serde::Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
    match v {
        [one] if one == ALL_LINEAR => s.serialize_str(one),
        _ => v.serialize(s),
    }
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: default_r(),
            alpha: default_alpha(),
            dropout: default_dropout(),
            use_rslora: false,
            target_modules: default_targets(),
            modules_to_save: Vec::new(),
            base_quant: None,
        }
    }
}

impl LoraConfig {
    /// The factor of the low-rank product, as PEFT computes it.
    pub fn scale(&self) -> f64 {
        match self.use_rslora {
            true => self.alpha / (self.r as f64).sqrt(),
            false => self.alpha / self.r as f64,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.r == 0 {
            return Err("lora.r must be at least 1".into());
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(format!("lora.alpha: {} is out of range", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!(
                "lora.dropout: {} is out of range [0, 1)",
                self.dropout
            ));
        }
        if self.target_modules.is_empty() {
            return Err("lora.target_modules is empty".into());
        }
        if let Some(q) = &self.base_quant {
            if crate::quant::quant_type(q).is_none() {
                let names: Vec<&str> = crate::quant::QUANT_NAMES.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "lora.base_quant: {q:?} is not a ggml type ({})",
                    names.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// Which tensors a LoRA configuration trains on one model.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    /// Adapted modules in model order: (module path, out, in).
    pub(crate) adapted: Vec<(String, usize, usize)>,
    /// Base parameters trained fully (`modules_to_save`), by name.
    pub(crate) saved: BTreeSet<String>,
    /// The short names of the adapted modules (`q_proj`, ...), as `adapter_config.json` lists
    /// them.
    pub(crate) targets: BTreeSet<String>,
    /// A tied output head saved with the embedding: (the embedding's name, `lm_head.weight`).
    pub(crate) tied_head: Option<(String, String)>,
}

fn matches(module: &str, name: &str) -> bool {
    module == name || module.ends_with(&format!(".{name}"))
}

fn short(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// What `lora` adapts and trains on a model of `cfg`; an error names the setting at fault.
pub(crate) fn plan(cfg: &ModelConfig, lora: &LoraConfig) -> Result<Plan, String> {
    lora.validate()?;
    let specs = cfg.param_specs();
    let weight = |s: &&ParamSpec| s.name.ends_with(".weight");
    let all_linear = lora.target_modules.iter().any(|t| t == ALL_LINEAR);
    let mut adapted = Vec::new();
    let mut used: BTreeSet<&str> = BTreeSet::new();
    for s in specs.iter().filter(weight).filter(|s| s.shape.len() == 2) {
        let module = s.module();
        let hit = lora
            .target_modules
            .iter()
            .find(|t| *t != ALL_LINEAR && matches(module, t));
        if let Some(t) = hit {
            if s.kind != Kind::Linear {
                return Err(format!(
                    "lora.target_modules: {t} ({module}) is not a linear layer; list it in \
                     lora.modules_to_save to train it fully"
                ));
            }
            used.insert(t);
        }
        if s.kind == Kind::Linear && (all_linear || hit.is_some()) {
            adapted.push((module.to_string(), s.shape[0], s.shape[1]));
        }
    }
    let linear_names: BTreeSet<&str> = specs
        .iter()
        .filter(|s| s.kind == Kind::Linear)
        .map(|s| short(s.module()))
        .collect();
    for t in &lora.target_modules {
        if t != ALL_LINEAR && !used.contains(t.as_str()) {
            return Err(format!(
                "lora.target_modules: no module named {t} in this model (linear layers: {})",
                linear_names.iter().copied().collect::<Vec<_>>().join(", ")
            ));
        }
    }

    let embedding = specs
        .iter()
        .find(|s| s.kind == Kind::Embedding)
        .map(|s| s.name.clone())
        .expect("every model has a token embedding");
    let tied = cfg.tie_word_embeddings();
    let mut saved = BTreeSet::new();
    let mut tied_head = None;
    let mut asked_head = false;
    let mut asked_embedding = false;
    for m in &lora.modules_to_save {
        if tied && (m == "lm_head" || matches("lm_head", m)) {
            asked_head = true;
            continue;
        }
        let found: Vec<&ParamSpec> = specs.iter().filter(|s| matches(s.module(), m)).collect();
        if found.is_empty() {
            let names: BTreeSet<&str> = specs.iter().map(|s| short(s.module())).collect();
            return Err(format!(
                "lora.modules_to_save: no module named {m} in this model (modules: {})",
                names.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        for s in found {
            if adapted.iter().any(|(a, _, _)| a == s.module()) {
                return Err(format!(
                    "lora: {} is both adapted (target_modules) and trained fully \
                     (modules_to_save)",
                    s.module()
                ));
            }
            asked_embedding |= s.name == embedding;
            saved.insert(s.name.clone());
        }
    }
    if tied && asked_head != asked_embedding {
        // The head *is* the embedding: training one trains the other, and PEFT would keep two
        // separate copies, so the only layout both agree on lists both.
        return Err(format!(
            "lora.modules_to_save: this model ties its output head to its embedding; list both \
             lm_head and {} to train them (one tensor), or neither",
            short(embedding.rsplit_once('.').map_or(&embedding, |(m, _)| m))
        ));
    }
    if tied && asked_head {
        tied_head = Some((embedding, "lm_head.weight".to_string()));
    }
    let targets = adapted
        .iter()
        .map(|(m, _, _)| short(m).to_string())
        .collect();
    Ok(Plan {
        adapted,
        saved,
        targets,
        tied_head,
    })
}

/// The specs of the adapter tensors, in model order: A then B of each adapted module.
pub(crate) fn adapter_specs(plan: &Plan, r: usize) -> Vec<ParamSpec> {
    plan.adapted
        .iter()
        .flat_map(|(m, out, inp)| {
            // PEFT: kaiming_uniform_(A, a=sqrt(5)), whose bound is 1 / sqrt(fan_in).
            let bound = 1.0 / (*inp as f64).sqrt();
            [
                ParamSpec {
                    name: lora_a_name(m),
                    shape: vec![r, *inp],
                    init: Init::Uniform(bound),
                    kind: Kind::Linear,
                },
                ParamSpec {
                    name: lora_b_name(m),
                    shape: vec![*out, r],
                    init: Init::Zeros,
                    kind: Kind::Linear,
                },
            ]
        })
        .collect()
}

/// The matrices a LoRA configuration leaves frozen, which a quantized base keeps as ggml blocks:
/// linear weights, the embeddings and an untied head (norms and biases stay in the training
/// dtype, as do `modules_to_save`).
pub fn frozen_matrices(cfg: &ModelConfig, lora: &LoraConfig) -> Result<BTreeSet<String>, String> {
    let plan = plan(cfg, lora)?;
    let specs = cfg.param_specs();
    Ok(specs
        .into_iter()
        .filter(|s| s.shape.len() == 2 && !plan.saved.contains(&s.name))
        .filter(|s| matches!(s.kind, Kind::Linear | Kind::Embedding | Kind::Head))
        .map(|s| s.name)
        .collect())
}
