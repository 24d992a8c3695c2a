//! LoRA adapters on a [`Model`]: fresh ones ([`Model::with_lora`]), PEFT's files read and
//! written ([`Model::load_adapter`], [`Model::save_adapter`]), and folded into the base
//! ([`Model::merged`]).
//!
//! On disk an adapter is PEFT's: `adapter_config.json` and `adapter_model.safetensors`, tensors
//! named `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, and a module trained fully
//! stored as `base_model.model.<module>.weight`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};
use serde_json::{json, Value};

use crate::checkpoint::{
    self, checkpoint_error, header_problem, io_error, release_pages, view_to_var,
};
use crate::error::{input_error, Error, Result};
use crate::lora::{adapter_specs, plan, LoraConfig, Plan, ALL_LINEAR};
use crate::model::{Adapters, Model, Parts};
use crate::params::{self, ParamSpec};
use crate::quant::QWeight;
use crate::weights::{lora_a_name, lora_b_name};

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's prefix of every stored name (`PeftModelForCausalLM.base_model.model`).
pub(crate) const PEFT_PREFIX: &str = "base_model.model.";

/// `adapter_config.json` as PEFT writes it for a causal LM.
pub(crate) fn adapter_config_json(lora: &LoraConfig, plan: &Plan, base: &str) -> Value {
    let modules_to_save: Option<Vec<&String>> =
        (!lora.modules_to_save.is_empty()).then(|| lora.modules_to_save.iter().collect());
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "modules_to_save": modules_to_save,
        "peft_type": "LORA",
        "r": lora.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": plan.targets.iter().collect::<Vec<_>>(),
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": lora.use_rslora,
    })
}

/// An adapter directory's `adapter_config.json`: the LoRA settings and the base it was made on.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub lora: LoraConfig,
    /// `base_model_name_or_path`: a directory or a hub id.
    pub base: Option<String>,
}

/// Whether `dir` holds an adapter rather than a full checkpoint.
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG_FILE).is_file()
}

/// Reads `dir/adapter_config.json`, refusing PEFT options this crate does not implement by name.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let bad = |reason: String| Error::Config {
        path: path.clone(),
        reason,
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    match get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => {
            return Err(bad(format!(
                "peft_type {other:?}: only LORA adapters are supported"
            )))
        }
    }
    // Options that change what the adapter computes or where it applies: set to anything but
    // their off value (null, false, {}, []), they are refused rather than ignored.
    let off = |v: &Value| match v {
        Value::Bool(b) => !b,
        Value::Object(o) => o.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    let mut unsupported: Vec<(&str, bool)> = [
        "use_dora",
        "fan_in_fan_out",
        "lora_bias",
        "layers_to_transform",
        "rank_pattern",
        "alpha_pattern",
        "trainable_token_indices",
        "exclude_modules",
        "target_parameters",
        "layer_replication",
        "alora_invocation_tokens",
        "use_qalora",
        "use_bdlora",
        "arrow_config",
    ]
    .into_iter()
    .map(|k| (k, get(k).is_some_and(|v| !off(v))))
    .collect();
    unsupported.push(("bias", get("bias").is_some_and(|v| v != &json!("none"))));
    if let Some((key, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(bad(format!(
            "{key} = {} is not supported",
            get(key).cloned().unwrap_or(Value::Null)
        )));
    }
    let num = |k: &str| get(k).and_then(Value::as_f64);
    let r = match get("r").and_then(Value::as_u64) {
        Some(r) => r as usize,
        None => return Err(bad("field r: a positive integer is required".into())),
    };
    let strings = |k: &str| -> Result<Vec<String>> {
        match get(k) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("field {k}: strings expected")))
                })
                .collect(),
            Some(other) => Err(bad(format!("field {k}: {other} is not a list of names"))),
        }
    };
    let target_modules = strings("target_modules")?;
    if target_modules.len() == 1
        && target_modules[0] != ALL_LINEAR
        && get("target_modules").is_some_and(Value::is_string)
    {
        // PEFT reads a single string as a regular expression over module paths.
        return Err(bad(format!(
            "field target_modules: the regular expression {:?} is not supported; list the module names",
            target_modules[0]
        )));
    }
    let lora = LoraConfig {
        r,
        alpha: num("lora_alpha").unwrap_or(8.0),
        dropout: num("lora_dropout").unwrap_or(0.0),
        use_rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        target_modules,
        modules_to_save: strings("modules_to_save")?,
        base_quant: None,
    };
    lora.validate().map_err(bad)?;
    Ok(AdapterConfig {
        lora,
        base: get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// Where an adapter's base is: `base_model_name_or_path` as written (absolute, or relative to
/// the working directory as PEFT reads it), else relative to the adapter directory. An error
/// names every path it tried.
pub fn base_dir(adapter_dir: &Path, base: &str) -> Result<PathBuf> {
    let given = PathBuf::from(base);
    let beside = adapter_dir.join(base);
    for p in [&given, &beside] {
        if p.join(checkpoint::CONFIG_FILE).is_file() {
            return Ok(p.clone());
        }
    }
    Err(Error::Config {
        path: adapter_dir.join(ADAPTER_CONFIG_FILE),
        reason: format!(
            "base model {base:?} not found: no config.json in {} or {}",
            given.display(),
            beside.display()
        ),
    })
}

/// The stored name of each tensor an adapter file holds for `plan`, with the internal name it
/// loads into: every adapter matrix and fully trained tensor, and a tied head's alias.
pub(crate) fn stored_names(plan: &Plan, specs: &[ParamSpec]) -> HashMap<String, String> {
    let mut names: HashMap<String, String> = specs
        .iter()
        .map(|s| (format!("{PEFT_PREFIX}{}", s.name), s.name.clone()))
        .collect();
    for n in &plan.saved {
        names.insert(format!("{PEFT_PREFIX}{n}"), n.clone());
    }
    if let Some((embed, head)) = &plan.tied_head {
        names.insert(format!("{PEFT_PREFIX}{head}"), embed.clone());
    }
    names
}

impl Model {
    /// Adds fresh adapters to a base model (PEFT's initialisation, seeded per tensor name): its
    /// weights are frozen from then on except those of `modules_to_save`.
    pub fn with_lora(self, lora: &LoraConfig, seed: u64) -> Result<Model> {
        self.check_base()?;
        let plan = plan(&self.cfg, lora).map_err(|reason| Error::Input { reason })?;
        let specs = adapter_specs(&plan, lora.r);
        let adapters = params::init_params(&specs, seed, self.dtype, &self.device)?;
        self.split(lora.clone(), plan, adapters, HashMap::new())
    }

    /// Adds the adapter stored in `dir` (PEFT's files) to this base model.
    pub fn load_adapter(self, dir: &Path) -> Result<Model> {
        self.check_base()?;
        crate::manifest::check_complete(dir)?;
        let ac = read_adapter_config(dir)?;
        let plan = plan(&self.cfg, &ac.lora).map_err(|reason| Error::Config {
            path: dir.join(ADAPTER_CONFIG_FILE),
            reason,
        })?;
        let specs = adapter_specs(&plan, ac.lora.r);
        let path = dir.join(ADAPTER_WEIGHTS_FILE);
        // SAFETY: read-only and only while loading, as in `Model::load`.
        let st =
            unsafe { candle_core::safetensors::MmapedSafetensors::new(&path) }.map_err(|e| {
                let why = header_problem(&path).map_or(String::new(), |p| format!(": {p}"));
                checkpoint_error(&path, format!("{e}{why}"))
            })?;
        let names = stored_names(&plan, &specs);
        let base_shapes: HashMap<&str, Vec<usize>> = self
            .params
            .iter()
            .map(|(n, v)| (n.as_str(), v.dims().to_vec()))
            .collect();
        let shape_of = |internal: &str| -> Vec<usize> {
            match specs.iter().find(|s| s.name == internal) {
                Some(s) => s.shape.clone(),
                None => base_shapes[internal].clone(),
            }
        };
        let mut stored: HashMap<String, Var> = HashMap::new();
        let mut tensors = st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, view) in &tensors {
            let Some(internal) = names.get(name) else {
                return Err(Error::UnexpectedTensor {
                    name: name.clone(),
                    path: path.clone(),
                });
            };
            let expected = shape_of(internal);
            if view.shape() != expected.as_slice() {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    path: path.clone(),
                    expected,
                    found: view.shape().to_vec(),
                });
            }
            let var = view_to_var(view, self.dtype, &self.device)?;
            // SAFETY: the view comes from the file's read-only mapping (`MmapedSafetensors`).
            unsafe { release_pages(view.data()) };
            if let Some(prev) = stored.get(internal) {
                // A tied head stored beside its embedding must be the same tensor.
                let diff = (prev.as_tensor() - var.as_tensor())?.abs()?.max_all()?;
                if diff.to_dtype(DType::F64)?.to_scalar::<f64>()? != 0.0 {
                    return Err(checkpoint_error(
                        &path,
                        format!("{name} differs from {internal}, which the model ties it to"),
                    ));
                }
            }
            stored.insert(internal.clone(), var);
        }
        let required = specs
            .iter()
            .map(|s| s.name.clone())
            .chain(plan.saved.iter().cloned());
        for internal in required {
            if !stored.contains_key(&internal) {
                return Err(Error::MissingTensor {
                    name: format!("{PEFT_PREFIX}{internal}"),
                    path: path.clone(),
                });
            }
        }
        let adapters = specs
            .iter()
            .map(|s| (s.name.clone(), stored.remove(&s.name).expect("checked")))
            .collect();
        self.split(ac.lora, plan, adapters, stored)
    }

    /// Whether this is a plain model (adapters go on a base, not on another adapter).
    fn check_base(&self) -> Result<()> {
        match self.lora {
            Some(_) => input_error("the model already carries LoRA adapters (merge them first)"),
            None => Ok(()),
        }
    }

    /// Re-assembles a base model with adapters: the base's tensors frozen, except those of
    /// `plan.saved` (their values from `replace` when it has them), each module's A and B after
    /// its weight.
    fn split(
        self,
        config: LoraConfig,
        plan: Plan,
        adapters: Vec<(String, Var)>,
        mut replace: HashMap<String, Var>,
    ) -> Result<Model> {
        let mut adapters: HashMap<String, Var> = adapters.into_iter().collect();
        let adapted: BTreeSet<&str> = plan.adapted.iter().map(|(m, _, _)| m.as_str()).collect();
        let mut base: HashMap<String, Var> = self.params.into_iter().collect();
        let quantized: BTreeSet<&str> = self.quantized.iter().map(|(n, _)| n.as_str()).collect();
        let (mut params, mut frozen) = (Vec::new(), Vec::new());
        for spec in self.cfg.param_specs() {
            let name = spec.name;
            let module = name.rsplit_once('.').map_or(name.as_str(), |(m, _)| m);
            let takes_adapter = name.ends_with(".weight") && adapted.contains(module);
            if quantized.contains(name.as_str()) {
                if plan.saved.contains(&name) {
                    return input_error(format!(
                        "lora.modules_to_save: {name} is kept quantized and cannot be trained"
                    ));
                }
            } else {
                let var = base.remove(&name).expect("every parameter is in the model");
                if plan.saved.contains(&name) {
                    let var = replace.remove(&name).unwrap_or(var);
                    params.push((name.clone(), var));
                } else {
                    frozen.push((name.clone(), var));
                }
            }
            if takes_adapter {
                for n in [lora_a_name(module), lora_b_name(module)] {
                    let v = adapters.remove(&n).expect("an adapter per adapted module");
                    params.push((n, v));
                }
            }
        }
        debug_assert!(adapters.is_empty() && replace.is_empty() && base.is_empty());
        let parts = Parts {
            params,
            frozen,
            quantized: self.quantized,
            lora: Some(Adapters { config, plan }),
        };
        Model::assemble(self.cfg, parts, self.dtype, &self.device, false, None)
    }

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (PEFT's format, the
    /// model's dtype), naming `base` as `base_model_name_or_path`. Tokenizer files are the
    /// caller's business.
    pub fn save_adapter(&self, dir: &Path, base: &str) -> Result<()> {
        let Some(ad) = &self.lora else {
            return input_error("save_adapter: the model has no LoRA adapters");
        };
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let config = adapter_config_json(&ad.config, &ad.plan, base);
        checkpoint::write_json(&dir.join(ADAPTER_CONFIG_FILE), &config)?;
        let mut tensors: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(n, v)| (format!("{PEFT_PREFIX}{n}"), v.as_detached_tensor()))
            .collect();
        if let Some((embed, head)) = &ad.plan.tied_head {
            let (_, v) = self
                .params
                .iter()
                .find(|(n, _)| n == embed)
                .expect("a saved tied embedding is trainable");
            tensors.push((format!("{PEFT_PREFIX}{head}"), v.as_detached_tensor()));
        }
        let named: Vec<(&str, Tensor)> = tensors
            .iter()
            .map(|(n, t)| (n.as_str(), t.clone()))
            .collect();
        let path = dir.join(ADAPTER_WEIGHTS_FILE);
        let tmp = dir.join(format!("{ADAPTER_WEIGHTS_FILE}.tmp"));
        let written = checkpoint::write_safetensors(&tmp, &named, self.dtype);
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        std::fs::rename(&tmp, &path).map_err(io_error(&path))
    }

    /// A plain model with each adapter's `scale * B A` added to its weight (PEFT's
    /// `merge_and_unload`), sharing nothing with this one. A model without adapters is copied.
    pub fn merged(&self) -> Result<Model> {
        let by_name: HashMap<&str, &Var> = self
            .params
            .iter()
            .chain(&self.frozen)
            .map(|(n, v)| (n.as_str(), v))
            .collect();
        let quantized: HashMap<&str, &QWeight> = self
            .quantized
            .iter()
            .map(|(n, q)| (n.as_str(), q))
            .collect();
        let scale = self.lora.as_ref().map(|l| l.config.scale());
        let mut params = Vec::new();
        for spec in self.cfg.param_specs() {
            let blocks;
            let w = match quantized.get(spec.name.as_str()) {
                Some(q) => {
                    blocks = q
                        .dequantize()?
                        .to_dtype(self.dtype)?
                        .to_device(&self.device)?;
                    &blocks
                }
                None => by_name[spec.name.as_str()].as_tensor(),
            };
            let module = spec.module();
            let t = match (scale, by_name.get(lora_a_name(module).as_str())) {
                (Some(scale), Some(a)) if spec.name.ends_with(".weight") => {
                    let b = by_name[lora_b_name(module).as_str()].as_tensor();
                    let delta = b.matmul(a.as_tensor())?.affine(scale, 0.0)?;
                    (w + delta.to_dtype(w.dtype())?)?
                }
                _ => w.copy()?,
            };
            params.push((spec.name.clone(), Var::from_tensor(&t)?));
        }
        Model::assemble(
            self.cfg.clone(),
            Parts::full(params, Vec::new()),
            self.dtype,
            &self.device,
            false,
            None,
        )
    }
}
