//! Hugging Face checkpoint directories: `config.json` plus `model.safetensors` (or shards listed
//! in `model.safetensors.index.json`).
//!
//! Loading memory-maps the files and converts one tensor at a time to the requested dtype, so the
//! peak is the model plus one tensor. Every parameter of the config must be present with its
//! shape, and every stored tensor must be a parameter, except two harmless extras that
//! `transformers` itself ignores: a tied model's `lm_head.weight` and old `rotary_emb.inv_freq`
//! buffers. Saving streams one tensor at a time into a file written the way `safetensors` does
//! (our own writer, so that conversion errors are reported instead of panicking in a `View`).

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor, Var};
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::TensorView;
use serde_json::{json, Map, Value};

use crate::config::ModelConfig;
use crate::error::{input_error, Error, Result};
use crate::model::{check_dtype, dtype_name, Model, Parts};
use crate::params::var_from_f32;
use crate::quant::{QWeight, Quantize, CHUNK_ROWS};
use candle_core::quantized::GgmlDType;

pub(crate) const CONFIG_FILE: &str = "config.json";
const GENERATION_CONFIG_FILE: &str = "generation_config.json";
const WEIGHTS_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which header entry of a safetensors file contradicts itself, for the error of a file the
/// `safetensors` crate refused without naming the tensor: the first whose byte range is not its
/// element count times its dtype's size, or whose dtype is unknown.
pub(crate) fn header_problem(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).ok()?;
    let header: Map<String, Value> = serde_json::from_slice(&header).ok()?;
    for (name, entry) in &header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = entry.get("dtype")?.as_str()?;
        let size: u64 = match dtype {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
            other => return Some(format!("tensor {name} has an unknown dtype {other:?}")),
        };
        let shape: Vec<u64> = entry
            .get("shape")?
            .as_array()?
            .iter()
            .map(Value::as_u64)
            .collect::<Option<_>>()?;
        let offsets: Vec<u64> = entry
            .get("data_offsets")?
            .as_array()?
            .iter()
            .map(Value::as_u64)
            .collect::<Option<_>>()?;
        let [start, end] = offsets[..] else {
            return Some(format!("tensor {name} has no [start, end] data_offsets"));
        };
        let need = shape
            .iter()
            .try_fold(size, |n, &d| n.checked_mul(d))
            .unwrap_or(u64::MAX);
        if end.checked_sub(start) != Some(need) {
            return Some(format!(
                "tensor {name}: dtype {dtype} and shape {shape:?} take {need} bytes, its data_offsets [{start}, {end}] hold {}",
                end.saturating_sub(start)
            ));
        }
    }
    None
}

pub(crate) fn checkpoint_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Model {
    /// The same model with the tensors `quantize` names kept as ggml blocks (frozen), for a
    /// model made in memory ([`Model::load_with`] quantizes as it reads). Before adapters are
    /// added.
    pub fn quantized_with(self, quantize: &Quantize) -> Result<Model> {
        if self.lora.is_some() {
            return input_error("a base is quantized before adapters are added to it");
        }
        let mut params = Vec::with_capacity(self.params.len());
        let mut quantized = self.quantized;
        for (name, var) in self.params {
            match quantize.type_for(&name, var.dims()) {
                Some(t) => quantized.push((name.clone(), QWeight::quantize(var.as_tensor(), t)?)),
                None => params.push((name, var)),
            }
        }
        let parts = Parts::full(params, quantized);
        Model::assemble(self.cfg, parts, self.dtype, &self.device, false, None)
    }

    /// The same model with every tensor kept as blocks back in the model's dtype (their
    /// dequantized values, trainable again). Before adapters are added.
    pub fn dequantized(self) -> Result<Model> {
        if self.lora.is_some() {
            return input_error("a base is dequantized before adapters are added to it");
        }
        let mut by_name: HashMap<String, Var> = self.params.into_iter().collect();
        for (name, q) in self.quantized {
            let t = q
                .dequantize()?
                .to_dtype(self.dtype)?
                .to_device(&self.device)?;
            by_name.insert(name, Var::from_tensor(&t)?);
        }
        let params = self
            .cfg
            .param_specs()
            .into_iter()
            .map(|s| {
                let var = by_name
                    .remove(&s.name)
                    .expect("every parameter is in the model");
                (s.name, var)
            })
            .collect();
        let parts = Parts::full(params, Vec::new());
        Model::assemble(self.cfg, parts, self.dtype, &self.device, false, None)
    }
}

impl Model {
    /// Loads `dir/config.json` and its weights, cast to `dtype`. A directory with an
    /// `sft_manifest.json` must hold every file it lists ([`crate::manifest`]): a checkpoint cut
    /// short is an error naming what is missing, never a model built from part of it.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Model> {
        Model::load_with(dir, dtype, device, None)
    }

    /// [`Model::load`], keeping the tensors `quantize` names as ggml blocks (frozen; see
    /// [`Quantize`]), each quantized as it is read, so the whole model never sits in memory in
    /// `dtype`.
    pub fn load_with(
        dir: &Path,
        dtype: DType,
        device: &Device,
        quantize: Option<&Quantize>,
    ) -> Result<Model> {
        check_dtype(dtype)?;
        crate::manifest::check_complete(dir)?;
        let cfg = ModelConfig::from_file(&dir.join(CONFIG_FILE))?;
        let files = weight_files(dir)?;
        let mut mmaps = Vec::with_capacity(files.len());
        for path in &files {
            // SAFETY: the mapping is read-only and lives only while loading; the file must not be
            // truncated by another process meanwhile, which is the usual contract of checkpoint
            // loaders (candle, transformers).
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
                let why = header_problem(path).map_or(String::new(), |p| format!(": {p}"));
                checkpoint_error(path, format!("{e}{why}"))
            })?;
            mmaps.push(st);
        }
        // Which file holds each tensor, so that every error names the file.
        let mut stored: HashMap<String, (usize, TensorView<'_>)> = HashMap::new();
        for (i, st) in mmaps.iter().enumerate() {
            for (name, view) in st.tensors() {
                if stored.insert(name.clone(), (i, view)).is_some() {
                    return Err(checkpoint_error(
                        &files[i],
                        format!("tensor {name} is stored twice"),
                    ));
                }
            }
        }

        let specs = cfg.param_specs();
        let expected: HashMap<&str, &[usize]> = specs
            .iter()
            .map(|s| (s.name.as_str(), s.shape.as_slice()))
            .collect();
        let names: BTreeSet<&String> = stored.keys().collect();
        for name in names {
            let (file, view) = &stored[name];
            let path = &files[*file];
            let expected_shape = match expected.get(name.as_str()) {
                Some(shape) => *shape,
                None if name.ends_with("rotary_emb.inv_freq") => continue,
                None if name == "lm_head.weight" && cfg.tie_word_embeddings() => {
                    // transformers sometimes saves the tied head; it must be the embedding's shape.
                    let embed_shape = &specs[0].shape;
                    if view.shape() != embed_shape.as_slice() {
                        return Err(Error::ShapeMismatch {
                            name: name.clone(),
                            path: path.clone(),
                            expected: embed_shape.clone(),
                            found: view.shape().to_vec(),
                        });
                    }
                    continue;
                }
                None => {
                    return Err(Error::UnexpectedTensor {
                        name: name.clone(),
                        path: path.clone(),
                    })
                }
            };
            if view.shape() != expected_shape {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    path: path.clone(),
                    expected: expected_shape.to_vec(),
                    found: view.shape().to_vec(),
                });
            }
        }

        let missing_path = || {
            if files.len() == 1 {
                files[0].clone()
            } else {
                dir.join(INDEX_FILE)
            }
        };
        let mut params = Vec::with_capacity(specs.len());
        let mut quantized = Vec::new();
        for spec in &specs {
            let Some((file, view)) = stored.get(&spec.name) else {
                return Err(Error::MissingTensor {
                    name: spec.name.clone(),
                    path: missing_path(),
                });
            };
            let named = |e: Error| match e {
                Error::Candle(e) => {
                    checkpoint_error(&files[*file], format!("tensor {}: {e}", spec.name))
                }
                e => e,
            };
            let blocks = quantize.and_then(|q| q.type_for(&spec.name, &spec.shape));
            match blocks {
                Some(t) => {
                    let q = quantize_view(view, t).map_err(named)?;
                    quantized.push((spec.name.clone(), q));
                }
                None => {
                    let var = view_to_var(view, dtype, device).map_err(named)?;
                    params.push((spec.name.clone(), var));
                }
            }
            // SAFETY: the views come from the files' read-only mappings (`MmapedSafetensors`).
            unsafe { release_pages(view.data()) };
        }
        let parts = Parts::full(params, quantized);
        Model::assemble(cfg, parts, dtype, device, false, None)
    }

    /// Writes `dir/config.json`, `dir/generation_config.json` (Qwen family) and
    /// `dir/model.safetensors` with every parameter in `dtype` (no `lm_head.weight` when tied).
    /// Tokenizer files are the caller's business.
    pub fn save(&self, dir: &Path, dtype: DType) -> Result<()> {
        self.save_with(dir, dtype, &HashMap::new())
    }

    /// [`Model::save`] with the values in `values` (by parameter name) in place of the
    /// parameters': the f32 master weights a half-precision model was trained through.
    pub fn save_with(
        &self,
        dir: &Path,
        dtype: DType,
        values: &HashMap<String, Tensor>,
    ) -> Result<()> {
        check_dtype(dtype)?;
        if self.lora.is_some() {
            // Its weights are the base's plus an update: the caller picks the adapter
            // (`save_adapter`) or the merged weights (`merged`).
            return input_error(
                "a model with LoRA adapters is saved with save_adapter, or merged first",
            );
        }
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;

        let mut config = self.cfg.to_json_value();
        let obj = config
            .as_object_mut()
            .expect("a config serialises to a JSON object");
        // transformers 5 reads `dtype`; older versions and other tools read `torch_dtype`.
        obj.insert("torch_dtype".into(), json!(dtype_name(dtype)));
        obj.insert("dtype".into(), json!(dtype_name(dtype)));
        write_json(&dir.join(CONFIG_FILE), &config)?;

        if let Some(gen) = self.cfg.generation_config() {
            write_json(&dir.join(GENERATION_CONFIG_FILE), &gen)?;
        }

        let path = dir.join(WEIGHTS_FILE);
        let tmp = dir.join(format!("{WEIGHTS_FILE}.tmp"));
        // A tensor kept as blocks is written as its values (the rest of the file's dtype).
        let mut tensors: Vec<(&str, Tensor)> = Vec::with_capacity(self.params.len());
        for (n, v) in &self.params {
            let t = match values.get(n) {
                Some(t) => t.clone(),
                None => v.as_detached_tensor(),
            };
            tensors.push((n.as_str(), t));
        }
        for (n, q) in &self.quantized {
            tensors.push((n.as_str(), q.dequantize()?));
        }
        let order: HashMap<String, usize> = self
            .cfg
            .param_specs()
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s.name, i))
            .collect();
        tensors.sort_by_key(|(n, _)| order.get(*n).copied());
        let written = write_safetensors(&tmp, &tensors, dtype);
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        std::fs::rename(&tmp, &path).map_err(io_error(&path))
    }
}

pub(crate) fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("a JSON value always serialises") + "\n";
    std::fs::write(path, text).map_err(io_error(path))
}

/// The safetensors files of a checkpoint: `model.safetensors`, else the shards of the index (as
/// `transformers` looks them up).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX_FILE);
    if !index.is_file() {
        return Err(checkpoint_error(
            dir,
            format!("neither {WEIGHTS_FILE} nor {INDEX_FILE} found"),
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(io_error(&index))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| checkpoint_error(&index, e.to_string()))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| checkpoint_error(&index, "no weight_map object"))?;
    let mut files = BTreeSet::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            checkpoint_error(&index, format!("weight_map[{name}] is not a file name"))
        })?;
        files.insert(file.to_string());
    }
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn st_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    match dtype {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F64 => Some(DType::F64),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::F16 => Some(DType::F16),
        _ => None,
    }
}

/// Lets the kernel drop the mapped pages of a tensor already converted. Mapped file pages count
/// in the process's resident memory until unmapped, and the files stay mapped until every
/// tensor is loaded: without this a 0.5B model in f32 peaks at the model twice over (3.8 GB),
/// which for LoRA training is the whole run's peak. The mapping is private and read-only, so a page
/// read again would be read back from the file unchanged.
///
/// # Safety
/// `bytes` must lie in a read-only private mapping of a file that nobody modifies meanwhile (on
/// anonymous memory the kernel would zero the pages).
pub(crate) unsafe fn release_pages(bytes: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            p if p > 0 => p as usize,
            _ => return,
        };
        let (start, end) = (
            bytes.as_ptr() as usize,
            bytes.as_ptr() as usize + bytes.len(),
        );
        let (first, last) = (start.next_multiple_of(page), end / page * page);
        if last > first {
            // SAFETY: the range lies inside `bytes`, a read-only private file mapping (the
            // caller's contract); MADV_DONTNEED on it only drops pages the kernel can re-read
            // from the file, so `bytes` still reads the same. A failure is harmless.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_DONTNEED,
                );
            }
        }
    }
}

/// One stored tensor as a `Var` of `dtype`. The common case (CPU, f32 target) decodes straight
/// from the mapped bytes into the var's buffer.
pub(crate) fn view_to_var(view: &TensorView<'_>, dtype: DType, device: &Device) -> Result<Var> {
    let src = st_dtype(view.dtype()).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "stored dtype {:?} is not a float type",
            view.dtype()
        ))
    })?;
    let bytes = view.data();
    let shape = view.shape();
    if dtype == DType::F32 {
        let v: Vec<f32> = match src {
            DType::F32 => bytes
                .par_chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::BF16 => bytes
                .par_chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::F16 => bytes
                .par_chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => {
                let t = Tensor::from_raw_buffer(bytes, src, shape, &Device::Cpu)?;
                return Ok(Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?);
            }
        };
        return var_from_f32(v, shape, dtype, device);
    }
    let t = Tensor::from_raw_buffer(bytes, src, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?;
    Ok(Var::from_tensor(&t)?)
}

/// A stored 2-D tensor quantized to `dtype` straight from the file's bytes, a chunk of rows at a
/// time: the f32 matrix never sits in memory whole.
fn quantize_view(view: &TensorView<'_>, dtype: GgmlDType) -> Result<QWeight> {
    let (rows, cols) = match view.shape() {
        &[rows, cols] => (rows, cols),
        other => return input_error(format!("a {other:?} tensor is not a matrix to quantize")),
    };
    let src = st_dtype(view.dtype()).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "stored dtype {:?} is not a float type",
            view.dtype()
        ))
    })?;
    let size = src.size_in_bytes();
    let bytes = view.data();
    QWeight::quantize_with(rows, cols, dtype, CHUNK_ROWS, &|range, out| {
        let chunk = &bytes[range.start * cols * size..range.end * cols * size];
        for (o, b) in out.iter_mut().zip(chunk.chunks_exact(size)) {
            *o = match src {
                DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                DType::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                DType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
                _ => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32,
            };
        }
        Ok(())
    })
}

/// Writes a safetensors file: an 8-byte little-endian header length, the JSON header (padded
/// with spaces to a multiple of 8 bytes), then each tensor's little-endian bytes in order.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[(&str, Tensor)],
    dtype: DType,
) -> Result<()> {
    let st_name = match dtype {
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        other => return Err(Error::UnsupportedDtype { dtype: other }),
    };
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (name, t) in tensors {
        let len = t.elem_count() * dtype.size_in_bytes();
        header.insert(
            (*name).to_string(),
            json!({ "dtype": st_name, "shape": t.dims(), "data_offsets": [offset, offset + len] }),
        );
        offset += len;
    }
    let mut header =
        serde_json::to_vec(&Value::Object(header)).expect("a JSON value always serialises");
    header.resize(header.len().next_multiple_of(8), b' ');

    let file = std::fs::File::create(path).map_err(io_error(path))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io_error(path))?;
    out.write_all(&header).map_err(io_error(path))?;
    for (_, t) in tensors {
        write_tensor(&mut out, &t.to_dtype(dtype)?)?.map_err(io_error(path))?;
    }
    out.into_inner()
        .map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e.into_error(),
        })?
        .sync_all()
        .map_err(io_error(path))
}

// The writer copies tensors' memory as is, which is safetensors' byte order only on
// little-endian targets (all that candle supports in practice).
#[cfg(not(target_endian = "little"))]
compile_error!("sft-model writes safetensors from memory and needs a little-endian target");

/// Appends a tensor's bytes to `out` (the tensor already has the file's dtype).
fn write_tensor(out: &mut impl Write, t: &Tensor) -> Result<std::io::Result<()>> {
    fn raw<T: Copy>(v: &[T]) -> &[u8] {
        // SAFETY: only called with f32, f64, bf16 and f16 slices: plain numbers with no padding,
        // every byte initialised; u8 has alignment 1 and the length is the slice's byte size.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), size_of_val(v)) }
    }
    let t = t.to_device(&Device::Cpu)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .expect("contiguous() was applied");
    let bytes = match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => raw(&v[start..end]),
        Storage::Cpu(CpuStorage::F64(v)) => raw(&v[start..end]),
        Storage::Cpu(CpuStorage::BF16(v)) => raw(&v[start..end]),
        Storage::Cpu(CpuStorage::F16(v)) => raw(&v[start..end]),
        _ => return Err(Error::UnsupportedDtype { dtype: t.dtype() }),
    };
    Ok(out.write_all(bytes))
}
