//! GGUF, llama.cpp's file format, in and out: a model read from a `.gguf` file (every tensor
//! dequantized into the model's dtype) and a model written as one llama.cpp loads.
//!
//! - `file`: the container (a checked view of candle's reader, and a streaming writer);
//! - `arch`: llama.cpp's architectures against the families: names, metadata <-> `config.json`,
//!   llama's Q/K permutation and Gemma's `1 + w` norms;
//! - `mix`: the file types `--quant` names and llama.cpp's per-tensor choices for them (the
//!   blocks themselves are [`crate::quant::QWeight`]'s).
//!
//! Tokenizers are not this crate's business: the `tokenizer.*` metadata is read by the caller
//! from [`GgufFile::metadata`] and written by passing it to [`Model::write_gguf`] as opaque
//! key/values.

mod arch;
mod file;
mod mix;

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Var};

use crate::checkpoint::checkpoint_error;
use crate::config::ModelConfig;
use crate::error::{input_error, Error, Result};
use crate::model::{check_dtype, Model, Parts};
use crate::quant::{QWeight, Quantize, CHUNK_ROWS};

pub use crate::gguf::file::{type_name, value_f64, value_uint, GgufFile, TensorEntry};
pub use crate::gguf::mix::{GgufQuant, TensorRole};

/// The `general.architecture`s read and written.
pub const GGUF_ARCHITECTURES: [&str; 5] = arch::ARCH_NAMES;

/// The model config a GGUF file describes, as the family's `config.json` (llama.cpp's defaults
/// filled in, the way llama.cpp runs the file).
pub fn gguf_config_json(file: &GgufFile) -> Result<serde_json::Value> {
    let a = arch::file_arch(file)?;
    arch::config_json(file, a)
}

/// [`gguf_config_json`] parsed and checked by the family.
pub fn gguf_config(file: &GgufFile) -> Result<ModelConfig> {
    let json = gguf_config_json(file)?;
    ModelConfig::from_json_str(&json.to_string()).map_err(|reason| Error::Config {
        path: file.path().to_path_buf(),
        reason: format!("the model its metadata describes: {reason}"),
    })
}

/// One tensor of a written file: its GGUF name, row-major shape and type.
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

impl Model {
    /// The model of a GGUF file, every tensor dequantized to `dtype`: the config from the
    /// metadata ([`gguf_config`]), the tensors under their Hugging Face names with llama's q/k
    /// permutation and Gemma's `1 + w` undone. Every parameter must be in the file with its
    /// shape, and every tensor of the file must be a parameter (or llama's `rope_freqs`, read
    /// into the config).
    pub fn load_gguf(file: &GgufFile, dtype: DType, device: &Device) -> Result<Model> {
        Model::load_gguf_with(file, dtype, device, None)
    }

    /// [`Model::load_gguf`], keeping the matrices `quantize` names as ggml blocks (frozen): a
    /// matrix stored in the type asked for keeps its blocks as they are (llama's q and k rows
    /// reordered whole), any other is dequantized and quantized to it.
    pub fn load_gguf_with(
        file: &GgufFile,
        dtype: DType,
        device: &Device,
        quantize: Option<&Quantize>,
    ) -> Result<Model> {
        check_dtype(dtype)?;
        let a = arch::file_arch(file)?;
        let cfg = gguf_config(file)?;
        let specs = cfg.param_specs();
        let (heads, kv_heads) = heads(&cfg);
        let mut wanted = std::collections::HashMap::new();
        for spec in &specs {
            let name = arch::gguf_name(a, &spec.name).ok_or_else(|| {
                file.error(format!("{} has no GGUF name for {}", a.name(), spec.name))
            })?;
            wanted.insert(name, spec);
        }
        for t in file.tensors() {
            let extra = a == arch::Arch::Llama && t.name == "rope_freqs.weight";
            if !extra && !wanted.contains_key(&t.name) {
                return Err(Error::UnexpectedTensor {
                    name: t.name.clone(),
                    path: file.path().to_path_buf(),
                });
            }
        }
        let mut params = Vec::with_capacity(specs.len());
        let mut quantized = Vec::new();
        for spec in &specs {
            let name = arch::gguf_name(a, &spec.name).expect("mapped above");
            let entry = file.tensor(&name).ok_or_else(|| Error::MissingTensor {
                name: format!("{name} ({})", spec.name),
                path: file.path().to_path_buf(),
            })?;
            if entry.shape != spec.shape {
                return Err(Error::ShapeMismatch {
                    name: format!("{name} ({})", spec.name),
                    path: file.path().to_path_buf(),
                    expected: spec.shape.clone(),
                    found: entry.shape.clone(),
                });
            }
            let named = |e: Error| checkpoint_error(file.path(), format!("tensor {name}: {e}"));
            let transform = arch::transform(a, &spec.name, heads, kv_heads);
            let blocks = quantize.and_then(|q| q.type_for(&spec.name, &spec.shape));
            match blocks {
                // Kept as blocks: the stored ones, in the HF row order (llama's q/k rows are
                // reordered whole), converted to another type a chunk of rows at a time so that
                // the f32 matrix never exists whole.
                Some(b) if transform != arch::Transform::PlusOne => {
                    let stored = file.read_blocks(&name)?;
                    let stored = match transform {
                        arch::Transform::Permute { heads } => {
                            arch::permute_blocks(&stored, heads, false).map_err(named)?
                        }
                        _ => stored,
                    };
                    let q = if b == entry.dtype {
                        stored
                    } else {
                        let (rows, cols) = stored.dims();
                        QWeight::quantize_with(rows, cols, b, CHUNK_ROWS, &|range, out| {
                            stored.dequantize_rows(range, out)
                        })
                        .map_err(named)?
                    };
                    quantized.push((spec.name.clone(), q));
                }
                // Only matrices are kept as blocks, and only Gemma's norms (vectors) are stored
                // as 1 + w.
                Some(_) => {
                    return Err(named(Error::Input {
                        reason: "a norm stored as 1 + w cannot be kept as blocks".into(),
                    }))
                }
                None => {
                    let t = transform.undo(&file.read_f32(&name)?).map_err(named)?;
                    let var = Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?;
                    params.push((spec.name.clone(), var));
                }
            }
        }
        Model::assemble(
            cfg,
            Parts::full(params, quantized),
            dtype,
            device,
            false,
            None,
        )
    }

    /// Writes the model as a GGUF file llama.cpp loads: the architecture's metadata, then
    /// `extra` (the tokenizer's keys, `general.name`, ... in the order given), then the tensors
    /// under llama.cpp's names in the types `quant` chooses ([`GgufQuant::tensor_type`]),
    /// quantized one at a time from f32. `progress(done, total, name)` is called before each
    /// tensor. A model llama.cpp would run differently (another architecture, a layout its
    /// loader has no key for) is refused by name, before anything is written.
    pub fn write_gguf(
        &self,
        path: &Path,
        quant: GgufQuant,
        extra: &[(String, Value)],
        progress: &mut dyn FnMut(usize, usize, &str),
    ) -> Result<Vec<WrittenTensor>> {
        if self.lora.is_some() {
            return input_error("a model with LoRA adapters is merged before it is exported");
        }
        let meta = arch::metadata(&self.cfg).map_err(|reason| Error::Input {
            reason: format!("cannot export to GGUF: {reason}"),
        })?;
        let a = meta.arch;
        let mut kv = vec![
            (
                "general.architecture".to_string(),
                Value::String(a.name().into()),
            ),
            ("general.type".to_string(), Value::String("model".into())),
        ];
        kv.extend(meta.kv);
        kv.push(("general.file_type".into(), Value::U32(quant.file_type())));
        kv.push(("general.quantization_version".into(), Value::U32(2)));
        for (k, v) in extra {
            if kv.iter().any(|(have, _)| have == k) {
                return input_error(format!("metadata key {k} is the model's to write"));
            }
            kv.push((k.clone(), v.clone()));
        }

        let dense: std::collections::HashMap<&str, &Var> =
            self.params.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let blocks: std::collections::HashMap<&str, &QWeight> = self
            .quantized
            .iter()
            .map(|(n, q)| (n.as_str(), q))
            .collect();
        let specs = self.cfg.param_specs();
        let tied = self.cfg.tie_word_embeddings();
        let n_layers = self.cfg.num_layers();
        let (heads, kv_heads) = heads(&self.cfg);
        // (GGUF name, HF name or none for rope_freqs, shape, type)
        let mut plan: Vec<(String, Option<&str>, Vec<usize>, GgmlDType)> = vec![];
        if let Some(f) = &meta.rope_freqs {
            plan.push((
                "rope_freqs.weight".into(),
                None,
                vec![f.len()],
                GgmlDType::F32,
            ));
        }
        for spec in &specs {
            let name = arch::gguf_name(a, &spec.name).ok_or_else(|| Error::Input {
                reason: format!("{} has no GGUF name for {}", a.name(), spec.name),
            })?;
            let dtype = quant.tensor_type(&TensorRole {
                name: &name,
                shape: &spec.shape,
                layer: arch::layer_of(&name),
                n_layers,
                tied,
            });
            plan.push((name, Some(spec.name.as_str()), spec.shape.clone(), dtype));
        }
        let headers: Vec<file::TensorHeader> = plan
            .iter()
            .map(|(name, _, shape, dtype)| file::TensorHeader {
                name: name.clone(),
                shape: shape.clone(),
                dtype: *dtype,
            })
            .collect();
        let total = plan.len();
        file::write(path, &kv, &headers, |i| {
            let (name, hf, _, dtype) = &plan[i];
            progress(i, total, name);
            let named = |e: Error| checkpoint_error(path, format!("tensor {name}: {e}"));
            let t = match hf {
                None => candle_core::Tensor::new(
                    meta.rope_freqs.as_deref().unwrap_or_default(),
                    &Device::Cpu,
                )?,
                Some(hf) => {
                    let transform = arch::transform(a, hf, heads, kv_heads);
                    // Blocks already of the file's type go as they are: quantizing their values
                    // again would cost the time and, for the k-quants, change them.
                    if let (None, Some(q)) = (dense.get(hf), blocks.get(hf)) {
                        if q.dtype() == *dtype && transform != arch::Transform::PlusOne {
                            let q = match transform {
                                arch::Transform::Permute { heads } => {
                                    arch::permute_blocks(q, heads, true).map_err(named)?
                                }
                                _ => QWeight::clone(q),
                            };
                            return Ok(q.bytes().map_err(named)?.into_owned());
                        }
                    }
                    let w = match (dense.get(hf), blocks.get(hf)) {
                        (Some(v), _) => v.as_tensor().to_device(&Device::Cpu)?,
                        (None, Some(q)) => q.dequantize().map_err(named)?,
                        (None, None) => {
                            return input_error(format!("the model has no tensor {hf}"))
                        }
                    };
                    let w = w.to_dtype(DType::F32)?;
                    transform.apply(&w)?
                }
            };
            tensor_bytes(&t, *dtype).map_err(named)
        })?;
        progress(total, total, "");
        Ok(plan
            .into_iter()
            .map(|(name, _, shape, dtype)| WrittenTensor { name, shape, dtype })
            .collect())
    }
}

/// A tensor's bytes in a GGUF file: a matrix as `dtype`'s blocks, a vector (always F32) as its
/// little-endian values.
fn tensor_bytes(t: &candle_core::Tensor, dtype: GgmlDType) -> Result<Vec<u8>> {
    if t.rank() == 2 {
        return Ok(QWeight::quantize(t, dtype)?.bytes()?.into_owned());
    }
    if dtype != GgmlDType::F32 {
        return input_error(format!(
            "a vector is written as F32, not {}",
            type_name(dtype)
        ));
    }
    let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok(values.iter().flat_map(|x| x.to_le_bytes()).collect())
}

/// (query heads, key/value heads) of a decoder; GPT configs never reach the permutation.
fn heads(cfg: &ModelConfig) -> (usize, usize) {
    match cfg {
        ModelConfig::Qwen2(c) => (
            c.layout.sizes.num_attention_heads,
            c.layout.sizes.num_key_value_heads,
        ),
        ModelConfig::Gemma(c) => (
            c.layout.sizes.num_attention_heads,
            c.layout.sizes.num_key_value_heads,
        ),
        ModelConfig::Gpt(_) => (1, 1),
    }
}
