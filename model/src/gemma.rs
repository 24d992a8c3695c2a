//! Gemma 2 and Gemma 3 (text): the maths of `transformers`' `Gemma2ForCausalLM` and
//! `Gemma3ForCausalLM`, written with differentiable ops.
//!
//! Against the Qwen2 family: the embedding is scaled by `sqrt(hidden)`; every RMSNorm multiplies
//! by `1 + w` (gains are stored around 0); each layer norms the attention's and the MLP's output
//! too (`post_attention_layernorm`, `pre_`/`post_feedforward_layernorm`); the MLP gate is GELU
//! (tanh approximation); scores are scaled by `query_pre_attn_scalar^-0.5`; layers alternate
//! between sliding-window (`sliding_attention`) and full attention, each kind with its own RoPE
//! base; Gemma 2 soft-caps the attention scores and the logits (`c tanh(x / c)`), Gemma 3 norms
//! each query and key head (`q_norm`, `k_norm`).

use candle_core::{DType, Device, Tensor};

use crate::backward::Grads;
use crate::kernels::{self, NormKind};
use crate::ops::{self, rope_scaling, Linear, Rope, RopeScaling};
use crate::{LayerKv, Result, Weights};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::family::{
    default_initializer_range, foreign_trace, hf_generation_config, DecoderSizes, Family, Network,
};
use crate::hf::{
    layer, DOWN, EMBED, GATE, HEAD, INPUT_NORM, K, K_NORM, NORM, O, POST_ATTN_NORM, Q, Q_NORM, UP,
    V,
};
use crate::params::{spec, Init, ParamSpec};

/// The `model_type`s this file reads.
pub(crate) const GEMMA_MODEL_TYPES: [&str; 2] = ["gemma2", "gemma3_text"];

/// A Gemma 2 or Gemma 3 text decoder, read from a Hugging Face `config.json`. Fields that only
/// select behaviour are read from `extra` (and written back through it) with `transformers`'
/// defaults for the model type.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RawGemmaConfig")]
pub struct GemmaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub initializer_range: f64,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    /// Every other field of `config.json`, kept so that a saved config round-trips.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// Biases on q/k/v/o (`attention_bias`).
    #[serde(skip)]
    pub attention_bias: bool,
    /// Scores are scaled by `query_pre_attn_scalar^-0.5` (not `head_dim^-0.5`).
    #[serde(skip)]
    pub query_pre_attn_scalar: f64,
    /// Per layer: whether it is a sliding-window layer (`layer_types`).
    #[serde(skip)]
    pub sliding: Vec<bool>,
    /// The window of the sliding layers (`sliding_window`; none: they attend everything).
    #[serde(skip)]
    pub sliding_window: Option<usize>,
    /// Gemma 2's `c tanh(s / c)` on attention scores (`attn_logit_softcapping`).
    #[serde(skip)]
    pub attn_softcap: Option<f64>,
    /// `final_logit_softcapping`.
    #[serde(skip)]
    pub final_softcap: Option<f64>,
    /// RoPE base and scaling of the full-attention layers.
    #[serde(skip)]
    pub rope_global: RopeParams,
    /// RoPE base and scaling of the sliding-window layers.
    #[serde(skip)]
    pub rope_local: RopeParams,
}

/// The serde image of `config.json` before defaults and validation.
#[derive(Deserialize)]
struct RawGemmaConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_true")]
    tie_word_embeddings: bool,
    #[serde(default = "default_initializer_range")]
    initializer_range: f64,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_true() -> bool {
    true
}

/// `transformers`' Gemma defaults: head_dim, query_pre_attn_scalar, sliding_window.
const DEFAULT_HEAD_DIM: usize = 256;
const DEFAULT_QUERY_PRE_ATTN_SCALAR: f64 = 256.0;
const DEFAULT_SLIDING_WINDOW: u64 = 4096;

/// A number of `extra`: absent or null gives `default`.
fn opt_f64(
    extra: &Map<String, Value>,
    key: &str,
    default: Option<f64>,
) -> Result<Option<f64>, String> {
    match extra.get(key) {
        None => Ok(default),
        Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
            _ => Err(format!("{key} {v} must be a positive number or null")),
        },
    }
}

/// A RoPE base (`rope_theta`) and its scaling.
pub type RopeParams = (f64, RopeScaling);

/// The RoPE base and scaling of one layer type from a `rope_parameters` entry.
fn rope_entry(field: &str, v: &Value) -> Result<RopeParams, String> {
    let scaling = rope_scaling(field, v)?;
    let theta = match v.get("rope_theta") {
        Some(t) => t
            .as_f64()
            .filter(|t| t.is_finite() && *t > 0.0)
            .ok_or_else(|| format!("{field}.rope_theta {t} must be positive"))?,
        None => return Err(format!("{field}.rope_theta is missing")),
    };
    Ok((theta, scaling))
}

/// (global, local) RoPE: transformers 5's `rope_parameters` (one entry per layer type for Gemma
/// 3, a single one for Gemma 2), or the older `rope_theta` / `rope_local_base_freq` /
/// `rope_scaling` (which applies to the full-attention layers).
fn rope_params(
    model_type: &str,
    extra: &Map<String, Value>,
) -> Result<(RopeParams, RopeParams), String> {
    let gemma3 = model_type == "gemma3_text";
    if let Some(p) = extra.get("rope_parameters").filter(|v| !v.is_null()) {
        if gemma3 && p.get("full_attention").is_some() {
            let entry = |kind: &str| match p.get(kind) {
                Some(v) if !v.is_null() => rope_entry(&format!("rope_parameters.{kind}"), v),
                _ => Err(format!("rope_parameters.{kind} is missing")),
            };
            return Ok((entry("full_attention")?, entry("sliding_attention")?));
        }
        let one = rope_entry("rope_parameters", p)?;
        if gemma3 {
            return Err(
                "rope_parameters of gemma3_text must have one entry per layer type \
                 (full_attention, sliding_attention)"
                    .into(),
            );
        }
        return Ok((one, one));
    }
    let num = |k: &str, default: f64| -> Result<f64, String> {
        Ok(opt_f64(extra, k, Some(default))?.unwrap_or(default))
    };
    let scaling = match extra.get("rope_scaling").filter(|v| !v.is_null()) {
        Some(v) => rope_scaling("rope_scaling", v)?,
        None => RopeScaling::None,
    };
    if gemma3 {
        let global = (num("rope_theta", 1_000_000.0)?, scaling);
        let local = (num("rope_local_base_freq", 10_000.0)?, RopeScaling::None);
        Ok((global, local))
    } else {
        let one = (num("rope_theta", 10_000.0)?, scaling);
        Ok((one, one))
    }
}

/// Per layer, whether it slides: `layer_types`, else Gemma 2's alternation (even layers slide)
/// or Gemma 3's `sliding_window_pattern` (every `n`-th layer is global).
fn layer_kinds(
    model_type: &str,
    layers: usize,
    extra: &Map<String, Value>,
) -> Result<Vec<bool>, String> {
    if let Some(types) = extra.get("layer_types").filter(|v| !v.is_null()) {
        let types = types.as_array().ok_or("layer_types must be a list")?;
        if types.len() != layers {
            return Err(format!(
                "layer_types has {} entries for {layers} layers",
                types.len()
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(format!(
                    "layer_types entry {t} is not supported (sliding_attention, full_attention)"
                )),
            })
            .collect();
    }
    let pattern =
        match model_type {
            "gemma2" => 2,
            _ => match extra.get("sliding_window_pattern") {
                None | Some(Value::Null) => 6,
                Some(v) => v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                    format!("sliding_window_pattern {v} must be a positive integer")
                })? as usize,
            },
        };
    Ok((0..layers).map(|i| (i + 1) % pattern != 0).collect())
}

impl TryFrom<RawGemmaConfig> for GemmaConfig {
    type Error = String;

    fn try_from(raw: RawGemmaConfig) -> std::result::Result<Self, String> {
        let mt = raw.model_type.as_str();
        if !GEMMA_MODEL_TYPES.contains(&mt) {
            return Err(format!(
                "model_type {mt:?} is not a Gemma model ({})",
                GEMMA_MODEL_TYPES.join(", ")
            ));
        }
        let extra = &raw.extra;
        let act = extra
            .get("hidden_activation")
            .and_then(Value::as_str)
            .unwrap_or("gelu_pytorch_tanh");
        if !matches!(act, "gelu_pytorch_tanh" | "gelu_new") {
            return Err(format!(
                "hidden_activation {act:?} is not supported (only \"gelu_pytorch_tanh\")"
            ));
        }
        if extra
            .get("use_bidirectional_attention")
            .and_then(Value::as_bool)
            == Some(true)
        {
            return Err("use_bidirectional_attention = true is not supported".into());
        }
        if let Some(factor) = extra.get("partial_rotary_factor").and_then(Value::as_f64) {
            if factor != 1.0 {
                return Err(format!("partial_rotary_factor {factor} is not supported"));
            }
        }
        let attention_bias = extra.get("attention_bias").and_then(Value::as_bool) == Some(true);
        let query_pre_attn_scalar = opt_f64(
            extra,
            "query_pre_attn_scalar",
            Some(DEFAULT_QUERY_PRE_ATTN_SCALAR),
        )?
        .ok_or("query_pre_attn_scalar must be a number")?;
        let sliding_window = match extra.get("sliding_window") {
            None => Some(DEFAULT_SLIDING_WINDOW as usize),
            Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(w) if w > 0 => Some(w as usize),
                _ => return Err(format!("sliding_window {v} must be a positive integer")),
            },
        };
        let gemma2 = mt == "gemma2";
        // Gemma 3's attention has no soft-cap in transformers, whatever its config says.
        let attn_softcap = match gemma2 {
            true => opt_f64(extra, "attn_logit_softcapping", Some(50.0))?,
            false => None,
        };
        let final_softcap = opt_f64(extra, "final_logit_softcapping", gemma2.then_some(30.0))?;
        let (rope_global, rope_local) = rope_params(mt, extra)?;
        let sliding = layer_kinds(mt, raw.num_hidden_layers, extra)?;

        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        let head_dim = raw.head_dim.unwrap_or(DEFAULT_HEAD_DIM);
        DecoderSizes {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
        }
        .check()?;
        Ok(GemmaConfig {
            model_type: raw.model_type,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings,
            initializer_range: raw.initializer_range,
            bos_token_id: raw.bos_token_id,
            eos_token_id: raw.eos_token_id,
            extra: raw.extra,
            attention_bias,
            query_pre_attn_scalar,
            sliding,
            sliding_window,
            attn_softcap,
            final_softcap,
            rope_global,
            rope_local,
        })
    }
}

impl GemmaConfig {
    fn qk_norm(&self) -> bool {
        self.model_type == "gemma3_text"
    }

    /// What q is multiplied by so that the attention's `1 / sqrt(head_dim)` becomes
    /// `1 / sqrt(query_pre_attn_scalar)`; `None` when they agree (Gemma 2 2B/9B, Gemma 3).
    fn query_scale(&self) -> Option<f64> {
        let s = (self.head_dim as f64 / self.query_pre_attn_scalar).sqrt();
        (s != 1.0).then_some(s)
    }

    /// The embedding's multiplier, `sqrt(hidden)`, as `transformers` rounds it to f32.
    fn embed_scale(&self) -> f64 {
        (self.hidden_size as f64).sqrt() as f32 as f64
    }
}

impl Family for GemmaConfig {
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn max_positions(&self) -> usize {
        self.max_position_embeddings
    }
    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
    fn num_layers(&self) -> usize {
        self.num_hidden_layers
    }
    fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings
    }

    fn final_logit_softcap(&self) -> Option<f64> {
        self.final_softcap
    }

    fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("config fields are plain JSON data")
    }

    fn generation_config(&self) -> Option<Value> {
        Some(hf_generation_config(&self.bos_token_id, &self.eos_token_id))
    }

    fn network(&self, w: &Weights, device: &Device) -> Result<Box<dyn Network>> {
        let rope = |(theta, scaling): RopeParams| {
            Rope::new(
                theta,
                self.head_dim,
                self.max_position_embeddings,
                &scaling,
                device,
            )
        };
        let global = rope(self.rope_global)?;
        let local = match self.rope_local == self.rope_global {
            true => global.clone(),
            false => rope(self.rope_local)?,
        };
        Ok(Box::new(Gemma::new(self, w, global, local)))
    }

    fn param_specs(&self) -> Vec<ParamSpec> {
        let c = self;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q_out, kv_out) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let w = Init::Normal(c.initializer_range);
        // Gains multiply as `1 + w`: transformers initialises them to zero.
        let gain = Init::Zeros;
        let mut specs = vec![spec(format!("{EMBED}.weight"), &[c.vocab_size, h], w)];
        for i in 0..c.num_hidden_layers {
            let p = |m: &str, t: &str| format!("{}.{m}.{t}", layer(i));
            for (proj, out, inp) in [(Q, q_out, h), (K, kv_out, h), (V, kv_out, h), (O, h, q_out)] {
                specs.push(spec(p(proj, "weight"), &[out, inp], w));
                if c.attention_bias {
                    specs.push(spec(p(proj, "bias"), &[out], Init::Zeros));
                }
            }
            if c.qk_norm() {
                specs.push(spec(p(Q_NORM, "weight"), &[hd], gain));
                specs.push(spec(p(K_NORM, "weight"), &[hd], gain));
            }
            for (proj, out, inp) in [
                (GATE, c.intermediate_size, h),
                (UP, c.intermediate_size, h),
                (DOWN, h, c.intermediate_size),
            ] {
                specs.push(spec(p(proj, "weight"), &[out, inp], w));
            }
            for norm in [INPUT_NORM, POST_ATTN_NORM, PRE_FF_NORM, POST_FF_NORM] {
                specs.push(spec(p(norm, "weight"), &[h], gain));
            }
        }
        specs.push(spec(format!("{NORM}.weight"), &[h], gain));
        if !c.tie_word_embeddings {
            specs.push(spec(format!("{HEAD}.weight"), &[c.vocab_size, h], w));
        }
        specs
    }
}

// Gemma's own module names; the rest are Llama's (`crate::hf`).
const PRE_FF_NORM: &str = "pre_feedforward_layernorm";
const POST_FF_NORM: &str = "post_feedforward_layernorm";

/// A Gemma RMSNorm gain: the stored `w` (which takes the gradient) and `w + 1` (what multiplies).
#[derive(Debug, Clone)]
struct Gain {
    w: Tensor,
}

impl Gain {
    fn new(w: Tensor) -> Gain {
        Gain { w }
    }

    /// `1 + w`, recomputed per pass so that candle's backward reaches `w` through it.
    fn plus_one(&self) -> Result<Tensor> {
        Ok(self.w.affine(1.0, 1.0)?)
    }

    fn norm(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        let dtype = x.dtype();
        if matches!(dtype, DType::F32 | DType::F64) {
            return ops::rms_norm(x, &self.plus_one()?, eps);
        }
        // Half precision as transformers does it: normalised and multiplied by `1 + w` in f32,
        // rounded once (a half-precision `1 + w` alone loses most of w's bits).
        let w1 = self.w.to_dtype(DType::F32)?.affine(1.0, 1.0)?;
        Ok(ops::rms_norm(&x.to_dtype(DType::F32)?, &w1, eps)?.to_dtype(dtype)?)
    }

    /// The gradient of `x`; `w`'s goes to `grads` (d(1 + w) = dw).
    fn backward(&self, x: &Tensor, grad: &Tensor, eps: f64, grads: &mut Grads) -> Result<Tensor> {
        let w1 = self.plus_one()?;
        let (dx, dw, _) =
            crate::norm::norm_affine_backward(x, NormKind::Rms, eps, &w1, None, grad)?;
        grads.put(&self.w, dw)?;
        Ok(dx)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Gain>,
    k_norm: Option<Gain>,
    gate: Linear,
    up: Linear,
    down: Linear,
    input_norm: Gain,
    post_attn_norm: Gain,
    pre_ff_norm: Gain,
    post_ff_norm: Gain,
    sliding: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Gemma {
    cfg: GemmaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Gain,
    lm_head: Tensor,
    rope_global: Rope,
    rope_local: Rope,
}

/// Per pass: the masks and rope tables of the two layer kinds.
struct Context {
    global: (Option<ops::Mask>, (Tensor, Tensor)),
    local: (Option<ops::Mask>, (Tensor, Tensor)),
}

impl Context {
    fn of(&self, sliding: bool) -> (Option<&ops::Mask>, (&Tensor, &Tensor)) {
        let (mask, (cos, sin)) = match sliding {
            true => &self.local,
            false => &self.global,
        };
        (mask.as_ref(), (cos, sin))
    }
}

impl Gemma {
    fn new(cfg: &GemmaConfig, w: &Weights, rope_global: Rope, rope_local: Rope) -> Gemma {
        let gain = |name: String| Gain::new(w.get(&format!("{name}.weight")));
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = |m: &str| format!("{}.{m}", layer(i));
                Layer {
                    q: Linear::new(w, &p(Q)),
                    k: Linear::new(w, &p(K)),
                    v: Linear::new(w, &p(V)),
                    o: Linear::new(w, &p(O)),
                    q_norm: w.maybe(&format!("{}.weight", p(Q_NORM))).map(Gain::new),
                    k_norm: w.maybe(&format!("{}.weight", p(K_NORM))).map(Gain::new),
                    gate: Linear::new(w, &p(GATE)),
                    up: Linear::new(w, &p(UP)),
                    down: Linear::new(w, &p(DOWN)),
                    input_norm: gain(p(INPUT_NORM)),
                    post_attn_norm: gain(p(POST_ATTN_NORM)),
                    pre_ff_norm: gain(p(PRE_FF_NORM)),
                    post_ff_norm: gain(p(POST_FF_NORM)),
                    sliding: cfg.sliding[i],
                }
            })
            .collect();
        let embed = w.get(&format!("{EMBED}.weight"));
        let lm_head = match cfg.tie_word_embeddings {
            true => embed.clone(),
            false => w.get(&format!("{HEAD}.weight")),
        };
        Gemma {
            cfg: cfg.clone(),
            embed,
            layers,
            norm: gain(NORM.to_string()),
            lm_head,
            rope_global,
            rope_local,
        }
    }

    /// The masks and tables for queries at `positions` over `t_k` keys (the cache's and the new
    /// ones). The sliding layers' mask is the full mask with old keys also forbidden; a single
    /// cached query has no mask (every key is visible), unless the window hides some.
    fn context(
        &self,
        positions: &Tensor,
        mask: Option<&ops::Mask>,
        t_k: usize,
        dtype: DType,
    ) -> Result<Context> {
        let t = positions.dim(1)?;
        let offset = t_k - t;
        let local_mask = match (self.cfg.sliding_window, mask) {
            (Some(w), Some(m)) if t_k > w => {
                Some(ops::Mask::new(ops::slide(m.additive(), w, offset)?)?)
            }
            (Some(w), None) if t_k > w => {
                let causal = ops::causal_mask(t, offset, dtype, positions.device())?;
                Some(ops::Mask::new(ops::slide(&causal, w, offset)?)?)
            }
            _ => mask.cloned(),
        };
        let global = self.rope_global.gather(positions, dtype)?;
        let local = match self.cfg.rope_local == self.cfg.rope_global {
            true => global.clone(),
            false => self.rope_local.gather(positions, dtype)?,
        };
        Ok(Context {
            global: (mask.cloned(), global),
            local: (local_mask, local),
        })
    }

    fn run(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&ops::Mask>,
        mut kv: Option<&mut [LayerKv]>,
        seed: Option<u64>,
        mut keep: Option<&mut GemmaTrace>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let dtype = self.embed.dtype();
        let cached = kv.as_deref().map_or(0, |kv| kv[0].len());
        let ctx = self.context(positions, mask, cached + t, dtype)?;
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .affine(self.cfg.embed_scale(), 0.0)?
            .reshape((b, t, self.cfg.hidden_size))?;
        for (i, layer) in self.layers.iter().enumerate() {
            let cache = kv.as_deref_mut().map(|kv| &mut kv[i]);
            let traced = keep.is_some();
            let (out, acts) = self.layer(layer, &x, &ctx, cache, traced, seed)?;
            if let Some(tr) = keep.as_deref_mut() {
                tr.layers.push(acts);
            }
            x = out;
        }
        let hidden = self.norm.norm(&x, self.cfg.rms_norm_eps)?;
        if let Some(tr) = keep {
            tr.ctx = Some(ctx);
            tr.last = Some(x);
        }
        Ok(hidden)
    }

    /// A decoder layer's output, and its activations for [`Gemma::backward`] (`traced`: with
    /// the attention's probabilities kept).
    fn layer(
        &self,
        l: &Layer,
        x: &Tensor,
        ctx: &Context,
        cache: Option<&mut LayerKv>,
        traced: bool,
        seed: Option<u64>,
    ) -> Result<(Tensor, LayerTrace)> {
        let c = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (heads, kv_heads, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let eps = c.rms_norm_eps;
        let (mask, (cos, sin)) = ctx.of(l.sliding);

        let h = l.input_norm.norm(x, eps)?;
        let q_in = l.q.forward(&h, seed)?.reshape((b, t, heads, hd))?;
        let k_in = l.k.forward(&h, seed)?.reshape((b, t, kv_heads, hd))?;
        let v = l.v.forward(&h, seed)?.reshape((b, t, kv_heads, hd))?;
        let (q_pre, k_pre) = match (&l.q_norm, &l.k_norm) {
            (Some(qn), Some(kn)) => (qn.norm(&q_in, eps)?, kn.norm(&k_in, eps)?),
            _ => (q_in.clone(), k_in.clone()),
        };
        let mut q = ops::rope_heads_first(&q_pre, cos, sin)?;
        if let Some(s) = c.query_scale() {
            q = q.affine(s, 0.0)?;
        }
        let k = ops::rope_heads_first(&k_pre, cos, sin)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v)?,
            None => (k, v),
        };
        let probs = traced.then(ops::Kept::default);
        let y = match c.attn_softcap {
            Some(cap) => {
                let y = ops::composed_attention(
                    &q,
                    &k,
                    &v,
                    mask.map(ops::Mask::additive),
                    None,
                    Some(cap),
                )?;
                y.transpose(1, 2)?.reshape((b, t, heads * hd))?
            }
            None => ops::attention(&q, &k, &v, mask, None, probs.as_ref())?,
        };
        let a = l.o.forward(&y, seed)?;
        let mid = (x + l.post_attn_norm.norm(&a, eps)?)?;

        let h2 = l.pre_ff_norm.norm(&mid, eps)?;
        let gate = l.gate.forward(&h2, seed)?;
        let up = l.up.forward(&h2, seed)?;
        let m = (ops::gelu(&gate)? * &up)?;
        let f = l.down.forward(&m, seed)?;
        let out = (&mid + l.post_ff_norm.norm(&f, eps)?)?;
        let acts = LayerTrace {
            x: x.clone(),
            h,
            qk_in: l.q_norm.is_some().then_some((q_in, k_in)),
            q,
            k,
            v,
            probs,
            y,
            a,
            mid,
            h2,
            gate,
            up,
            f,
        };
        Ok((out, acts))
    }

    /// The gradients of every parameter (into `grads`) from the gradient of the hidden states
    /// (b, t, hidden) that [`Gemma::forward_traced`] returned.
    fn backward(&self, tr: GemmaTrace, grad: &Tensor, grads: &mut Grads) -> Result<()> {
        let c = &self.cfg;
        let eps = c.rms_norm_eps;
        let ctx = tr.ctx.as_ref().expect("the forward pass keeps its tables");
        let last = tr
            .last
            .as_ref()
            .expect("the forward pass keeps the final norm's input");
        let seed = tr.dropout_seed;
        let mut dx = self.norm.backward(last, grad, eps, grads)?;
        for (l, a) in self.layers.iter().zip(tr.layers).rev() {
            let (b, t, _) = a.x.dims3()?;
            let (mask, (cos, sin)) = ctx.of(l.sliding);
            let df = l.post_ff_norm.backward(&a.f, &dx, eps, grads)?;
            // The down projection's input, recomputed (the same bits) rather than kept.
            let act = ops::gelu(&a.gate)?;
            let m = (&act * &a.up)?;
            let dm = l.down.backward(&m, &df, grads, seed)?;
            drop(m);
            let dup = (&dm * &act)?;
            let dgate = kernels::gelu_backward(&a.gate, &(&dm * &a.up)?)?;
            let dh2 = (l.gate.backward(&a.h2, &dgate, grads, seed)?
                + l.up.backward(&a.h2, &dup, grads, seed)?)?;
            // The residual branch's gradient first, as candle's backward adds them.
            dx = (dx + l.pre_ff_norm.backward(&a.mid, &dh2, eps, grads)?)?;

            let da = l.post_attn_norm.backward(&a.a, &dx, eps, grads)?;
            let dy = l.o.backward(&a.y, &da, grads, seed)?;
            let (dq, dk, dv) = ops::attention_backward(
                (&a.q, &a.k, &a.v),
                &a.y,
                &dy,
                mask,
                None,
                a.probs.as_ref(),
            )?;
            let dq = match c.query_scale() {
                Some(s) => dq.affine(s, 0.0)?,
                None => dq,
            };
            // Undo the heads-first layouts: rope's backward for q and k, a transpose for v.
            let mut dq = kernels::rope_backward(&dq, cos, sin)?;
            let mut dk = kernels::rope_backward(&dk, cos, sin)?;
            if let (Some(qn), Some(kn), Some((q_in, k_in))) = (&l.q_norm, &l.k_norm, &a.qk_in) {
                dq = qn.backward(q_in, &dq, eps, grads)?;
                dk = kn.backward(k_in, &dk, eps, grads)?;
            }
            let dv = dv.transpose(1, 2)?.reshape((b, t, ()))?;
            let dh_v = l.v.backward(&a.h, &dv, grads, seed)?;
            let dh_k = l.k.backward(&a.h, &dk.reshape((b, t, ()))?, grads, seed)?;
            let dh_q = l.q.backward(&a.h, &dq.reshape((b, t, ()))?, grads, seed)?;
            // In the order candle's backward meets the three projections.
            let dh = ((dh_v + dh_k)? + dh_q)?;
            dx = (dx + l.input_norm.backward(&a.x, &dh, eps, grads)?)?;
        }
        let dx = dx.flatten_to(1)?.affine(c.embed_scale(), 0.0)?;
        grads.put_rows(&self.embed, &tr.ids, &dx)?;
        Ok(())
    }
}

/// What [`Gemma::backward`] reads of a training forward pass.
pub(crate) struct GemmaTrace {
    /// Flat token ids (the embedding's gradient adds up at them).
    ids: Tensor,
    dropout_seed: Option<u64>,
    /// The masks and rope tables of the pass.
    ctx: Option<Context>,
    layers: Vec<LayerTrace>,
    /// The input of the final norm.
    last: Option<Tensor>,
}

/// A layer's activations: the inputs of its norms, products, rope, attention and gated MLP, and
/// the attention's probabilities and output.
struct LayerTrace {
    x: Tensor,
    h: Tensor,
    /// q and k before their norms and rope (Gemma 3).
    qk_in: Option<(Tensor, Tensor)>,
    /// q (scaled), k and v as attention read them, heads first.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Option<ops::Kept>,
    y: Tensor,
    /// The output projection's output (the post-attention norm's input).
    a: Tensor,
    mid: Tensor,
    h2: Tensor,
    gate: Tensor,
    up: Tensor,
    /// The down projection's output (the post-feedforward norm's input).
    f: Tensor,
}

impl Network for Gemma {
    fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&ops::Mask>,
        kv: Option<&mut [LayerKv]>,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        self.run(ids, positions, mask, kv, dropout_seed, None)
    }

    /// `None` with Gemma 2's attention soft-cap: the fused attention has no such step, so
    /// those models train through candle's backward.
    fn forward_traced(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &ops::Mask,
        dropout_seed: Option<u64>,
    ) -> Result<Option<(Tensor, Box<dyn std::any::Any>)>> {
        if self.cfg.attn_softcap.is_some() {
            return Ok(None);
        }
        let mut tr = GemmaTrace {
            ids: ids.flatten_all()?,
            dropout_seed,
            ctx: None,
            layers: Vec::with_capacity(self.layers.len()),
            last: None,
        };
        let hidden = self.run(
            ids,
            positions,
            Some(mask),
            None,
            dropout_seed,
            Some(&mut tr),
        )?;
        // The sliding mask fits the fused attention whenever the full one does (`Model` checks
        // that): a window cuts each query's contiguous key range to a contiguous range.
        Ok(Some((hidden, Box::new(tr))))
    }

    fn backward(
        &self,
        trace: Box<dyn std::any::Any>,
        grad: &Tensor,
        grads: &mut Grads,
    ) -> Result<()> {
        match trace.downcast::<GemmaTrace>() {
            Ok(tr) => Gemma::backward(self, *tr, grad, grads),
            Err(_) => foreign_trace(),
        }
    }

    fn rebuild(&self, w: &Weights) -> Box<dyn Network> {
        Box::new(Gemma::new(
            &self.cfg,
            w,
            self.rope_global.clone(),
            self.rope_local.clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// google/gemma-3-1b-it's config.json as transformers 4.50 wrote it: RoPE in the older
    /// fields, the layer kinds from `sliding_window_pattern`.
    const GEMMA3_1B: &str = r#"{
      "architectures": ["Gemma3ForCausalLM"],
      "attention_bias": false, "attention_dropout": 0.0, "attn_logit_softcapping": null,
      "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
      "final_logit_softcapping": null, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
      "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912,
      "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
      "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
      "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
      "rope_scaling": null, "rope_theta": 1000000, "sliding_window": 512,
      "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
      "use_cache": true, "vocab_size": 262144
    }"#;

    fn parse(s: &str) -> std::result::Result<GemmaConfig, String> {
        serde_json::from_str(s).map_err(|e| e.to_string())
    }

    #[test]
    fn gemma3_1b_reads_its_layer_kinds_and_two_rope_bases() {
        let c = parse(GEMMA3_1B).unwrap();
        let globals: Vec<usize> = (0..26).filter(|&i| !c.sliding[i]).collect();
        assert_eq!(globals, [5, 11, 17, 23]);
        assert_eq!(c.rope_global, (1e6, RopeScaling::None));
        assert_eq!(c.rope_local, (1e4, RopeScaling::None));
        assert_eq!(
            (c.sliding_window, c.attn_softcap, c.final_softcap),
            (Some(512), None, None)
        );
        assert_eq!(c.query_scale(), None);
        assert!(c.qk_norm() && c.tie_word_embeddings);
        // Round trip: every key written back as read (and the default tie written out).
        let back = serde_json::to_value(&c).unwrap();
        let orig: Value = serde_json::from_str(GEMMA3_1B).unwrap();
        for (k, v) in orig.as_object().unwrap() {
            assert_eq!(back.get(k), Some(v), "{k}");
        }
        assert_eq!(back["tie_word_embeddings"], Value::Bool(true));
    }

    #[test]
    fn gemma2_defaults_are_transformers() {
        let s = GEMMA3_1B
            .replace(
                r#""model_type": "gemma3_text""#,
                r#""model_type": "gemma2""#,
            )
            .replace(r#""attn_logit_softcapping": null,"#, "")
            .replace(r#""final_logit_softcapping": null,"#, "")
            .replace(
                r#""query_pre_attn_scalar": 256, "#,
                r#""query_pre_attn_scalar": 144, "#,
            );
        let c = parse(&s).unwrap();
        assert_eq!((c.attn_softcap, c.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!(c.sliding[..4], [true, false, true, false]);
        // Gemma 2 has one RoPE base: rope_theta.
        assert_eq!(c.rope_global, c.rope_local);
        assert_eq!(c.rope_global.0, 1e6);
        assert!(!c.qk_norm());
        let s = (256.0f64 / 144.0).sqrt();
        assert_eq!(c.query_scale(), Some(s));
    }

    #[test]
    fn what_gemma_cannot_do_is_refused_by_name() {
        for (from, to, needle) in [
            (
                r#""use_cache": true"#,
                r#""use_bidirectional_attention": true"#,
                "bidirectional",
            ),
            (
                r#""hidden_activation": "gelu_pytorch_tanh""#,
                r#""hidden_activation": "relu""#,
                "relu",
            ),
            (
                r#""rope_scaling": null"#,
                r#""rope_scaling": {"rope_type": "yarn", "factor": 8.0}"#,
                "yarn",
            ),
            (
                r#""use_cache": true"#,
                r#""layer_types": ["chunked_attention"]"#,
                "layer_types",
            ),
            (
                r#""sliding_window": 512"#,
                r#""sliding_window": 0"#,
                "sliding_window",
            ),
            (r#""head_dim": 256"#, r#""head_dim": 255"#, "head_dim"),
        ] {
            let s = GEMMA3_1B.replace(from, to);
            assert_ne!(s, GEMMA3_1B, "{from}");
            let err = parse(&s).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
