//! llama.cpp's architectures against the families' Hugging Face configs, in one place: tensor
//! names, the metadata that stands for `config.json` (read and written with the GGUF value types
//! llama.cpp checks), and the two ways the tensors differ from Hugging Face's: llama's q and k
//! rows are permuted for llama.cpp's RoPE, and Gemma's norm gains are stored as `1 + w`.
//!
//! What a file says is read the way llama.cpp runs it (its loader's defaults where a key is
//! absent, its fixed choices where it reads none: Gemma's attention scale, Gemma 3's sliding
//! layers' RoPE base), and turned into the `config.json` the families parse, so every check of a
//! Hugging Face config applies to a GGUF file too. Writing refuses what llama.cpp would run
//! differently from the model.

use candle_core::quantized::gguf_file::Value;
use candle_core::Tensor;
use serde_json::{json, Map, Value as Json};

use crate::config::ModelConfig;
use crate::decoder::Layout;
use crate::error::Result;
use crate::gemma::GemmaConfig;
use crate::gguf::file::{value_uint, GgufFile};
use crate::quant::QWeight;
use crate::qwen2::Qwen2Config;
use crate::rope::RopeScaling;

/// The architectures read and written, by `general.architecture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
}

pub(crate) const ARCH_NAMES: [&str; 5] = ["llama", "qwen2", "qwen3", "gemma2", "gemma3"];

/// Gemma 3's default: every sixth layer attends globally (llama.cpp's `set_swa_pattern(6)`, and
/// `transformers`' `sliding_window_pattern`); Gemma 2 alternates.
const GEMMA3_PATTERN: usize = 6;
const GEMMA2_PATTERN: usize = 2;
/// The RoPE base of Gemma 3's sliding layers when a file names none (llama.cpp's default).
const GEMMA3_LOCAL_BASE: f64 = 10_000.0;
/// llama.cpp's defaults for what a file may leave out.
const DEFAULT_ROPE_BASE: f64 = 10_000.0;
const GEMMA2_WINDOW: u64 = 4096;
const GEMMA2_ATTN_SOFTCAP: f64 = 50.0;
const GEMMA2_FINAL_SOFTCAP: f64 = 30.0;
/// The layer counts of Gemma 2 27B and Gemma 3 27B, whose attention llama.cpp scales by
/// `1 / sqrt(hidden / heads)` instead of `1 / sqrt(head_dim)` (their `query_pre_attn_scalar`).
const GEMMA2_27B_LAYERS: usize = 46;
const GEMMA3_27B_LAYERS: usize = 62;
/// Llama 3.x's RoPE ramp (`low_freq_factor`, `high_freq_factor`), which the `rope_freqs` tensor
/// is read back with first.
const LLAMA3_LOW: f64 = 1.0;
const LLAMA3_HIGH: f64 = 4.0;
const LLAMA3_OLD_CONTEXT: f64 = 8192.0;

impl Arch {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
        }
    }

    fn from_name(name: &str) -> Option<Arch> {
        Some(match name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma2" => Arch::Gemma2,
            "gemma3" => Arch::Gemma3,
            _ => return None,
        })
    }

    fn gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }
}

/// Per-layer modules whose GGUF name is the same in every architecture.
const LAYER_NAMES: [(&str, &str); 10] = [
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("input_layernorm", "attn_norm"),
];

/// The GGUF name of a Hugging Face tensor name, `None` for a name the architecture has no
/// place for. `post_attention_layernorm` is the MLP's input norm in Llama's layout (`ffn_norm`)
/// but the attention output's norm in Gemma's (`post_attention_norm`), where the MLP's input
/// norm is `pre_feedforward_layernorm`.
pub(crate) fn gguf_name(arch: Arch, hf: &str) -> Option<String> {
    let (module, suffix) = hf.rsplit_once('.')?;
    let global = match module {
        "model.embed_tokens" => Some("token_embd"),
        "model.norm" => Some("output_norm"),
        "lm_head" => Some("output"),
        _ => None,
    };
    if let Some(g) = global {
        return Some(format!("{g}.{suffix}"));
    }
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, m) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let g = match (m, arch.gemma()) {
        ("post_attention_layernorm", false) => "ffn_norm",
        ("post_attention_layernorm", true) => "post_attention_norm",
        ("pre_feedforward_layernorm", true) => "ffn_norm",
        ("post_feedforward_layernorm", true) => "post_ffw_norm",
        _ => LAYER_NAMES.iter().find(|(h, _)| *h == m)?.1,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// The layer a GGUF tensor name belongs to (`blk.N.`).
pub(crate) fn layer_of(gguf: &str) -> Option<usize> {
    gguf.strip_prefix("blk.")?.split_once('.')?.0.parse().ok()
}

/// How a tensor's values differ between the two layouts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Transform {
    None,
    /// llama's q or k rows (weight or bias) for `heads` heads: Hugging Face keeps each head's
    /// rotated halves apart (`x0..x_{d/2-1}, x_{d/2}..`), llama.cpp interleaves them in pairs
    /// (`x0, x_{d/2}, x1, ...`) for its adjacent-pair RoPE.
    Permute {
        heads: usize,
    },
    /// Gemma's gains: `w` in Hugging Face's files, `1 + w` in llama.cpp's.
    PlusOne,
}

pub(crate) fn transform(arch: Arch, hf: &str, heads: usize, kv_heads: usize) -> Transform {
    if arch.gemma() && hf.ends_with("norm.weight") {
        return Transform::PlusOne;
    }
    if arch == Arch::Llama {
        let module = hf.rsplit_once('.').map_or(hf, |(m, _)| m);
        if module.ends_with("self_attn.q_proj") {
            return Transform::Permute { heads };
        }
        if module.ends_with("self_attn.k_proj") {
            return Transform::Permute { heads: kv_heads };
        }
    }
    Transform::None
}

impl Transform {
    /// Hugging Face's values to llama.cpp's (f32 in, f32 out).
    pub(crate) fn apply(self, t: &Tensor) -> Result<Tensor> {
        match self {
            Transform::None => Ok(t.clone()),
            Transform::PlusOne => Ok(t.affine(1.0, 1.0)?),
            Transform::Permute { heads } => permute(t, heads, false),
        }
    }

    /// llama.cpp's values to Hugging Face's.
    pub(crate) fn undo(self, t: &Tensor) -> Result<Tensor> {
        match self {
            Transform::None => Ok(t.clone()),
            Transform::PlusOne => Ok(t.affine(1.0, -1.0)?),
            Transform::Permute { heads } => permute(t, heads, true),
        }
    }
}

/// Reorders each head's rows: `(heads, 2, d/2)` -> `(heads, d/2, 2)`, or back with `inverse`.
fn permute(t: &Tensor, heads: usize, inverse: bool) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let cols: usize = dims[1..].iter().product();
    let half = rows / heads / 2;
    let (a, b) = if inverse { (half, 2) } else { (2, half) };
    Ok(t.reshape((heads, a, b, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// The permutation of llama's q or k rows on a matrix kept as blocks: whole rows move, each
/// row's blocks as they are; into Hugging Face's order ([`Transform::undo`]) or, with
/// `to_gguf`, back into llama.cpp's ([`Transform::apply`]).
pub(crate) fn permute_blocks(q: &QWeight, heads: usize, to_gguf: bool) -> Result<QWeight> {
    let (rows, cols) = q.dims();
    let bytes = q.bytes()?;
    let row = bytes.len() / rows.max(1);
    let half = rows / heads / 2;
    let mut out = Vec::with_capacity(bytes.len());
    // Hugging Face's row h*d + j*half + i is llama.cpp's h*d + 2*i + j. Each target row in its
    // order takes its source row from the other order.
    for h in 0..heads {
        let base = h * 2 * half;
        for r in 0..2 * half {
            let src = match to_gguf {
                false => base + 2 * (r % half) + r / half,
                true => base + (r % 2) * half + r / 2,
            };
            out.extend_from_slice(&bytes[src * row..(src + 1) * row]);
        }
    }
    QWeight::from_bytes(&out, q.dtype(), rows, cols)
}

/// The architecture a file names, or an error that lists what is read.
pub(crate) fn file_arch(f: &GgufFile) -> Result<Arch> {
    let name = f
        .string("general.architecture")?
        .ok_or_else(|| f.error("metadata key general.architecture is missing"))?;
    Arch::from_name(name).ok_or_else(|| {
        f.error(format!(
            "general.architecture {name:?} is not supported (supported: {})",
            ARCH_NAMES.join(", ")
        ))
    })
}

/// What every architecture's metadata says, read and checked.
#[derive(Clone, Copy)]
struct Common {
    hidden: u64,
    layers: u64,
    heads: u64,
    head_dim: u64,
    theta: f64,
    /// A linear RoPE scaling factor.
    scaling: Option<f64>,
    tied: bool,
}

/// `{arch}.{k}`, the key of an architecture's metadata.
fn arch_key(arch: Arch, k: &str) -> String {
    format!("{}.{k}", arch.name())
}

/// The `config.json` of the family that runs the file as llama.cpp does.
pub(crate) fn config_json(f: &GgufFile, arch: Arch) -> Result<Json> {
    let mut c = Map::new();
    let common = common_keys(f, arch, &mut c)?;
    match arch {
        Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => llama_keys(f, arch, &common, &mut c)?,
        Arch::Gemma2 | Arch::Gemma3 => gemma_keys(f, arch, &common, &mut c)?,
    }
    Ok(Json::Object(c))
}

/// The keys every family shares, put into `c`.
fn common_keys(f: &GgufFile, arch: Arch, c: &mut Map<String, Json>) -> Result<Common> {
    let key = |k: &str| arch_key(arch, k);
    let required = |k: &str| -> Result<u64> {
        f.uint(&key(k))?
            .ok_or_else(|| f.error(format!("metadata key {} is missing", key(k))))
    };
    // Per-layer arrays (`head_count` of some models) are read when every layer agrees.
    let per_layer = |k: &str| -> Result<Option<u64>> {
        let k = key(k);
        match f.get(&k) {
            Some(Value::Array(items)) => {
                let vals: Option<Vec<u64>> = items.iter().map(value_uint).collect();
                match vals.as_deref() {
                    Some([first, rest @ ..]) if rest.iter().all(|v| v == first) => Ok(Some(*first)),
                    _ => Err(f.error(format!(
                        "metadata key {k}: per-layer values that differ are not supported"
                    ))),
                }
            }
            _ => f.uint(&k),
        }
    };
    let hidden = required("embedding_length")?;
    let layers = required("block_count")?;
    let context = required("context_length")?;
    let ff = per_layer("feed_forward_length")?.ok_or_else(|| {
        f.error(format!(
            "metadata key {} is missing",
            key("feed_forward_length")
        ))
    })?;
    let heads = per_layer("attention.head_count")?.ok_or_else(|| {
        f.error(format!(
            "metadata key {} is missing",
            key("attention.head_count")
        ))
    })?;
    if heads == 0 {
        return Err(f.error(format!("{} is 0", key("attention.head_count"))));
    }
    let kv_heads = per_layer("attention.head_count_kv")?.unwrap_or(heads);
    let head_dim = f
        .uint(&key("attention.key_length"))?
        .unwrap_or(hidden / heads);
    if let Some(v) = f.uint(&key("attention.value_length"))? {
        if v != head_dim {
            return Err(f.error(format!(
                "{} {v} differs from the key length {head_dim}, which sft does not support",
                key("attention.value_length")
            )));
        }
    }
    if let Some(rot) = f.uint(&key("rope.dimension_count"))? {
        if rot != head_dim {
            return Err(f.error(format!(
                "{} {rot} is not the head size {head_dim}: partial RoPE is not supported",
                key("rope.dimension_count")
            )));
        }
    }
    let eps = f
        .float(&key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| {
            f.error(format!(
                "metadata key {} is missing",
                key("attention.layer_norm_rms_epsilon")
            ))
        })?;
    let theta = f
        .float(&key("rope.freq_base"))?
        .unwrap_or(DEFAULT_ROPE_BASE);
    let scaling = match f.string(&key("rope.scaling.type"))? {
        None | Some("none") => None,
        Some("linear") => f
            .float(&key("rope.scaling.factor"))?
            .filter(|&x| x != 0.0 && x != 1.0),
        Some(other) => {
            return Err(f.error(format!(
                "{} {other:?} is not supported (none, linear)",
                key("rope.scaling.type")
            )))
        }
    };
    let embed = f
        .tensor("token_embd.weight")
        .ok_or_else(|| f.error("tensor token_embd.weight is missing"))?;
    let vocab = embed.shape[0];
    if let Some(v) = f.uint(&key("vocab_size"))? {
        if v != vocab as u64 {
            return Err(f.error(format!(
                "{} {v} differs from token_embd.weight's {vocab} rows",
                key("vocab_size")
            )));
        }
    }
    let tied = f.tensor("output.weight").is_none();
    let mut put = |k: &str, v: Json| {
        c.insert(k.to_string(), v);
    };
    put("vocab_size", json!(vocab));
    put("hidden_size", json!(hidden));
    put("intermediate_size", json!(ff));
    put("num_hidden_layers", json!(layers));
    put("num_attention_heads", json!(heads));
    put("num_key_value_heads", json!(kv_heads));
    put("head_dim", json!(head_dim));
    put("max_position_embeddings", json!(context));
    put("rms_norm_eps", json!(eps));
    put("tie_word_embeddings", json!(tied));
    for (k, id) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
    ] {
        if let Some(v) = f.uint(id)? {
            put(k, json!(v));
        }
    }
    Ok(Common {
        hidden,
        layers,
        heads,
        head_dim,
        theta,
        scaling,
        tied,
    })
}

/// Llama's and Qwen's keys, put into `c`.
fn llama_keys(f: &GgufFile, arch: Arch, common: &Common, c: &mut Map<String, Json>) -> Result<()> {
    let key = |k: &str| arch_key(arch, k);
    let has = |name: &str| f.tensor(name).is_some();
    let mut put = |k: &str, v: Json| {
        c.insert(k.to_string(), v);
    };
    let Common {
        hidden,
        heads,
        head_dim,
        theta,
        scaling,
        ..
    } = *common;
    put("model_type", json!(arch.name()));
    let class = match arch {
        Arch::Llama => "LlamaForCausalLM",
        Arch::Qwen2 => "Qwen2ForCausalLM",
        _ => "Qwen3ForCausalLM",
    };
    put("architectures", json!([class]));
    put("hidden_act", json!("silu"));
    put("rope_theta", json!(theta));
    let q_bias = has("blk.0.attn_q.bias");
    match arch {
        Arch::Qwen2 if !q_bias => {
            return Err(
                f.error("tensor blk.0.attn_q.bias is missing (Qwen2's q, k and v have biases)")
            )
        }
        Arch::Qwen2 if hidden != heads * head_dim => {
            return Err(f.error(format!(
                "{} {head_dim} x {heads} heads is not the hidden size {hidden}, which \
                 Qwen2 requires",
                key("attention.key_length")
            )))
        }
        Arch::Llama if q_bias != has("blk.0.attn_output.bias") => {
            return Err(f.error(
                "llama: biases on q/k/v without one on attn_output (or the other way \
                 round): transformers' Llama has all four or none",
            ))
        }
        _ => {}
    }
    if arch != Arch::Qwen2 {
        put("attention_bias", json!(q_bias));
    }
    if arch == Arch::Llama {
        put("mlp_bias", json!(has("blk.0.ffn_gate.bias")));
    }
    let llama3 = match arch {
        Arch::Llama if has("rope_freqs.weight") => {
            llama3_from_factors(f, theta, head_dim as usize)?
        }
        _ => None,
    };
    match (llama3, scaling) {
        (Some(_), Some(_)) => {
            return Err(
                f.error("both rope_freqs.weight and a rope.scaling.type: one RoPE scaling only")
            )
        }
        (Some(s), None) => put("rope_scaling", s),
        (None, Some(factor)) => put("rope_scaling", linear_scaling(factor)),
        (None, None) => {}
    }
    Ok(())
}

/// Gemma 2's and Gemma 3's keys, put into `c`.
fn gemma_keys(f: &GgufFile, arch: Arch, common: &Common, c: &mut Map<String, Json>) -> Result<()> {
    let key = |k: &str| arch_key(arch, k);
    let mut put = |k: &str, v: Json| {
        c.insert(k.to_string(), v);
    };
    let Common {
        hidden,
        layers,
        heads,
        head_dim,
        theta,
        scaling,
        tied,
    } = *common;
    let gemma3 = arch == Arch::Gemma3;
    put(
        "model_type",
        json!(if gemma3 { "gemma3_text" } else { "gemma2" }),
    );
    put(
        "architectures",
        json!([if gemma3 {
            "Gemma3ForCausalLM"
        } else {
            "Gemma2ForCausalLM"
        }]),
    );
    put("hidden_activation", json!("gelu_pytorch_tanh"));
    if !gemma3 && !tied {
        return Err(f.error(
            "gemma2 with an output.weight: llama.cpp ties Gemma 2's head to the \
             embedding and would ignore it",
        ));
    }
    // llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B models.
    let big = if gemma3 {
        GEMMA3_27B_LAYERS
    } else {
        GEMMA2_27B_LAYERS
    };
    let scalar = match layers as usize == big {
        true => hidden / heads,
        false => head_dim,
    };
    put("query_pre_attn_scalar", json!(scalar));
    let window = match gemma3 {
        true => f.uint(&key("attention.sliding_window"))?.filter(|&w| w > 0),
        false => Some(
            f.uint(&key("attention.sliding_window"))?
                .unwrap_or(GEMMA2_WINDOW),
        ),
    };
    let pattern = if gemma3 {
        GEMMA3_PATTERN
    } else {
        GEMMA2_PATTERN
    };
    let sliding: Vec<bool> = match window {
        None => vec![false; layers as usize],
        Some(_) => sliding_layers(f, &key("attention.sliding_window_pattern"), layers, pattern)?,
    };
    put("sliding_window", window.map_or(Json::Null, |w| json!(w)));
    let types: Vec<&str> = sliding
        .iter()
        .map(|&s| {
            if s {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    put("layer_types", json!(types));
    let softcap = |k: &str, default: Option<f64>| -> Result<Json> {
        Ok(match f.float(&key(k))?.or(default) {
            Some(x) if x != 0.0 => json!(x),
            _ => Json::Null,
        })
    };
    put(
        "final_logit_softcapping",
        softcap(
            "final_logit_softcapping",
            (!gemma3).then_some(GEMMA2_FINAL_SOFTCAP),
        )?,
    );
    if gemma3 {
        put("attn_logit_softcapping", Json::Null);
        let local = f
            .float(&key("rope.freq_base_swa"))?
            .unwrap_or(GEMMA3_LOCAL_BASE);
        // llama.cpp scales only the global layers' RoPE (the sliding ones run at
        // scale 1), which is transformers' `rope_scaling` for Gemma 3.
        let full = match scaling {
            Some(factor) => {
                json!({"rope_type": "linear", "factor": factor, "rope_theta": theta})
            }
            None => json!({"rope_type": "default", "rope_theta": theta}),
        };
        put(
            "rope_parameters",
            json!({
                "full_attention": full,
                "sliding_attention": {"rope_type": "default", "rope_theta": local},
            }),
        );
    } else {
        put(
            "attn_logit_softcapping",
            softcap("attn_logit_softcapping", Some(GEMMA2_ATTN_SOFTCAP))?,
        );
        if let Some(local) = f.float(&key("rope.freq_base_swa"))? {
            if local != theta {
                return Err(f.error(format!(
                    "{} {local} differs from rope.freq_base {theta}: Gemma 2 has one RoPE \
                     base",
                    key("rope.freq_base_swa")
                )));
            }
        }
        put("rope_theta", json!(theta));
        if let Some(factor) = scaling {
            put("rope_scaling", linear_scaling(factor));
        }
    }
    Ok(())
}

/// transformers' linear RoPE scaling.
fn linear_scaling(factor: f64) -> Json {
    json!({"rope_type": "linear", "factor": factor})
}

/// Which layers slide: `sliding_window_pattern` as one bool per layer or as a period (every
/// `n`-th layer global), else the architecture's period.
fn sliding_layers(f: &GgufFile, key: &str, layers: u64, pattern: usize) -> Result<Vec<bool>> {
    let period = match f.get(key) {
        Some(Value::Array(items)) => {
            if items.len() as u64 != layers {
                return Err(f.error(format!(
                    "metadata key {key}: {} entries for {layers} layers",
                    items.len()
                )));
            }
            return items
                .iter()
                .map(|v| match v {
                    Value::Bool(b) => Ok(*b),
                    other => value_uint(other)
                        .map(|x| x != 0)
                        .ok_or_else(|| f.wrong_type(key, other, "an array of bools")),
                })
                .collect();
        }
        Some(_) => f.uint(key)?.map_or(pattern, |p| p as usize),
        None => pattern,
    };
    Ok((0..layers as usize)
        .map(|i| period == 0 || i % period < period - 1)
        .collect())
}

/// llama.cpp's layer kinds for a period: layer `i` slides unless `i % n == n - 1`.
fn default_sliding(layers: usize, period: usize) -> Vec<bool> {
    (0..layers).map(|i| i % period < period - 1).collect()
}

/// The factors llama.cpp divides each RoPE frequency by for Llama 3's scaling, as its
/// converter computes them (`LlamaModel.generate_extra_tensors`), in f32.
pub(crate) fn llama3_factors(
    theta: f64,
    head_dim: usize,
    factor: f64,
    low: f64,
    high: f64,
    old: f64,
) -> Vec<f32> {
    let (factor, low, high, old) = (factor as f32, low as f32, high as f32, old as f32);
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// Llama 3's `rope_scaling` from the `rope_freqs` tensor: its `factor` is the largest factor,
/// and `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings` are found
/// among the values that give the same factors (Llama 3.x's 1, 4 and the file's
/// `rope.scaling.original_context_length` or 8192 first; only their ratios matter). `None`
/// when every factor is 1.
fn llama3_from_factors(f: &GgufFile, theta: f64, head_dim: usize) -> Result<Option<Json>> {
    let t = f.read_f32("rope_freqs.weight")?;
    let stored: Vec<f32> = t.flatten_all()?.to_vec1()?;
    if stored.len() != head_dim / 2 {
        return Err(f.error(format!(
            "tensor rope_freqs.weight has {} values, the head size {head_dim} needs {}",
            stored.len(),
            head_dim / 2
        )));
    }
    if stored.iter().all(|&x| x == 1.0) {
        return Ok(None);
    }
    let factor = stored.iter().copied().fold(f32::MIN, f32::max) as f64;
    let wavelen = |i: usize| {
        let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
        2.0 * std::f64::consts::PI / freq
    };
    let ramp: Vec<(f64, f64)> = stored
        .iter()
        .enumerate()
        .filter(|(_, &x)| x > 1.0 && (x as f64) < factor)
        .map(|(i, &x)| {
            let smooth = (1.0 / x as f64 - 1.0 / factor) / (1.0 - 1.0 / factor);
            (1.0 / wavelen(i), smooth)
        })
        .collect();
    let mut candidates = vec![];
    let old_key = f
        .float("llama.rope.scaling.original_context_length")?
        .unwrap_or(LLAMA3_OLD_CONTEXT);
    candidates.push((LLAMA3_LOW, LLAMA3_HIGH, old_key));
    candidates.push((LLAMA3_LOW, LLAMA3_HIGH, LLAMA3_OLD_CONTEXT));
    // smooth = (old / w - low) / (high - low) is linear in 1 / w; with low = 1 its slope and
    // intercept give high and old.
    match ramp.as_slice() {
        [] => {
            // No factor on the ramp: any boundaries between the last 1 and the first `factor`.
            let last_one = stored.iter().rposition(|&x| x == 1.0).map(wavelen);
            let first_big = stored.iter().position(|&x| x as f64 == factor).map(wavelen);
            if let (Some(w1), Some(wf)) = (last_one, first_big) {
                let old = (w1 + wf) / 2.0;
                candidates.push((1.0, (1.0 + old / w1) / 2.0, old));
            }
        }
        [(x, s)] => candidates.push((1.0, LLAMA3_HIGH, (1.0 + s * (LLAMA3_HIGH - 1.0)) / x)),
        [(x0, s0), .., (x1, s1)] => {
            let slope = (s1 - s0) / (x1 - x0);
            let intercept = s0 - slope * x0;
            if intercept < 0.0 {
                let high = 1.0 - 1.0 / intercept;
                candidates.push((1.0, high, slope * (high - 1.0)));
            }
        }
    }
    for (low, high, old) in candidates {
        let again = llama3_factors(theta, head_dim, factor, low, high, old);
        let close = again
            .iter()
            .zip(&stored)
            .all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0));
        if close {
            return Ok(Some(json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": old,
            })));
        }
    }
    Err(f.error(
        "tensor rope_freqs.weight holds RoPE factors that are not Llama 3's scaling, which is \
         the only one sft reads from it",
    ))
}

/// What an export writes besides the tensors: the architecture and its metadata, with the
/// value types llama.cpp's loader checks (`u32` counts, `f32` reals), and Llama 3's factors.
pub(crate) struct ArchMetadata {
    pub(crate) arch: Arch,
    pub(crate) kv: Vec<(String, Value)>,
    pub(crate) rope_freqs: Option<Vec<f32>>,
}

fn u32_value(name: &str, v: usize) -> Result<Value, String> {
    u32::try_from(v)
        .map(Value::U32)
        .map_err(|_| format!("{name} {v} does not fit the u32 llama.cpp reads"))
}

/// The metadata of `cfg`, or why llama.cpp cannot run it as it is.
pub(crate) fn metadata(cfg: &ModelConfig) -> std::result::Result<ArchMetadata, String> {
    let (arch, layout): (Arch, &Layout) =
        match cfg {
            ModelConfig::Qwen2(c) => (qwen_arch(c)?, &c.layout),
            ModelConfig::Gemma(c) => (gemma_arch(c)?, &c.layout),
            ModelConfig::Gpt(_) => return Err(
                "model_type sft-gpt has no llama.cpp architecture (llama, qwen2, qwen3, gemma2 \
                 and gemma3 are written)"
                    .into(),
            ),
        };
    let s = &layout.sizes;
    let a = arch.name();
    let mut kv: Vec<(String, Value)> = vec![];
    let mut put = |k: &str, v: Value| kv.push((format!("{a}.{k}"), v));
    put(
        "context_length",
        u32_value("max_position_embeddings", s.max_position_embeddings)?,
    );
    put("embedding_length", u32_value("hidden_size", s.hidden_size)?);
    put(
        "block_count",
        u32_value("num_hidden_layers", s.num_hidden_layers)?,
    );
    put(
        "feed_forward_length",
        u32_value("intermediate_size", s.intermediate_size)?,
    );
    put(
        "attention.head_count",
        u32_value("num_attention_heads", s.num_attention_heads)?,
    );
    put(
        "attention.head_count_kv",
        u32_value("num_key_value_heads", s.num_key_value_heads)?,
    );
    put("attention.key_length", u32_value("head_dim", s.head_dim)?);
    put("attention.value_length", u32_value("head_dim", s.head_dim)?);
    put(
        "attention.layer_norm_rms_epsilon",
        Value::F32(s.rms_norm_eps as f32),
    );
    if arch == Arch::Llama {
        put("vocab_size", u32_value("vocab_size", s.vocab_size)?);
        put("rope.dimension_count", u32_value("head_dim", s.head_dim)?);
    }
    let (theta, scaling) = layout.rope_global;
    put("rope.freq_base", Value::F32(theta as f32));
    let mut rope_freqs = None;
    match scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            put("rope.scaling.type", Value::String("linear".into()));
            put("rope.scaling.factor", Value::F32(factor as f32));
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            if arch != Arch::Llama {
                return Err(format!(
                    "{a}: Llama 3's RoPE scaling is written for llama only"
                ));
            }
            // llama.cpp reads this key for YaRN only; it lets the scaling be read back exactly.
            put(
                "rope.scaling.original_context_length",
                u32_value("original_max_position_embeddings", old as usize)?,
            );
            rope_freqs = Some(llama3_factors(
                theta,
                s.head_dim,
                factor,
                low_freq_factor,
                high_freq_factor,
                old,
            ));
        }
    }
    if arch.gemma() {
        let gemma3 = arch == Arch::Gemma3;
        let (local_theta, local_scaling) = layout.rope_local;
        let pattern = if gemma3 {
            GEMMA3_PATTERN
        } else {
            GEMMA2_PATTERN
        };
        if let Some(w) = layout.window {
            put("attention.sliding_window", u32_value("sliding_window", w)?);
            if layout.sliding != default_sliding(s.num_hidden_layers, pattern) {
                // Read by llama.cpp since it named the key; older readers assume the period.
                put(
                    "attention.sliding_window_pattern",
                    Value::Array(layout.sliding.iter().map(|&b| Value::Bool(b)).collect()),
                );
            }
        } else if layout.sliding.iter().any(|&b| b) || !gemma3 {
            return Err(format!(
                "{a}: sliding layers without a sliding_window cannot be written"
            ));
        }
        if let Some(c) = layout.final_softcap {
            put("final_logit_softcapping", Value::F32(c as f32));
        }
        if gemma3 {
            if local_scaling != RopeScaling::None {
                return Err(
                    "gemma3: llama.cpp runs the sliding layers' RoPE unscaled, this model scales it"
                        .into(),
                );
            }
            if local_theta != GEMMA3_LOCAL_BASE {
                put("rope.freq_base_swa", Value::F32(local_theta as f32));
            }
        } else {
            if (local_theta, local_scaling) != (theta, scaling) {
                return Err("gemma2: the sliding layers' RoPE differs from the global one".into());
            }
            match layout.attn_softcap {
                Some(c) => put("attn_logit_softcapping", Value::F32(c as f32)),
                None => {
                    return Err(
                        "gemma2 without attn_logit_softcapping: llama.cpp always soft-caps Gemma 2's attention"
                            .into(),
                    )
                }
            }
        }
    }
    Ok(ArchMetadata {
        arch,
        kv,
        rope_freqs,
    })
}

fn qwen_arch(c: &Qwen2Config) -> std::result::Result<Arch, String> {
    let l = &c.layout;
    let arch = match c.model_type.as_str() {
        "llama" | "mistral" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        other => {
            return Err(format!(
                "model_type {other:?} has no llama.cpp architecture"
            ))
        }
    };
    if l.window.is_some() {
        return Err(format!(
            "model_type {:?} with a sliding_window: llama.cpp's llama architecture attends to every position",
            c.model_type
        ));
    }
    if arch == Arch::Qwen2 && l.sizes.num_attention_heads * l.sizes.head_dim != l.sizes.hidden_size
    {
        return Err(format!(
            "qwen2: head_dim {} x {} heads is not hidden_size {}, which llama.cpp's qwen2 assumes",
            l.sizes.head_dim, l.sizes.num_attention_heads, l.sizes.hidden_size
        ));
    }
    if arch == Arch::Qwen3 && l.qkv_bias {
        return Err("qwen3 with attention_bias: llama.cpp's qwen3 has no attention biases".into());
    }
    if arch != Arch::Llama && l.mlp_bias {
        return Err(format!(
            "{}: MLP biases are written for llama only",
            arch.name()
        ));
    }
    Ok(arch)
}

fn gemma_arch(c: &GemmaConfig) -> std::result::Result<Arch, String> {
    let l = &c.layout;
    let gemma3 = c.model_type == "gemma3_text";
    let arch = if gemma3 { Arch::Gemma3 } else { Arch::Gemma2 };
    if c.attention_bias {
        return Err(format!(
            "{}: llama.cpp's Gemma has no attention biases",
            c.model_type
        ));
    }
    if !gemma3 && !c.tie_word_embeddings {
        return Err("gemma2 with an untied head: llama.cpp ties Gemma 2's head".into());
    }
    let big = if gemma3 {
        GEMMA3_27B_LAYERS
    } else {
        GEMMA2_27B_LAYERS
    };
    let s = &l.sizes;
    let scale_by = match s.num_hidden_layers == big {
        true => s.hidden_size / s.num_attention_heads,
        false => s.head_dim,
    };
    if c.query_pre_attn_scalar != scale_by as f64 {
        return Err(format!(
            "{}: query_pre_attn_scalar {} is not {scale_by}, the scale llama.cpp uses for {} \
             layers",
            c.model_type, c.query_pre_attn_scalar, s.num_hidden_layers
        ));
    }
    Ok(arch)
}
