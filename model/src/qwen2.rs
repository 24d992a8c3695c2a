//! The Qwen2-family decoder (Qwen2, Qwen3, Llama): the maths of `transformers`'
//! `Qwen2ForCausalLM` / `Qwen3ForCausalLM` / `LlamaForCausalLM`, written with differentiable ops.

use candle_core::{Device, Tensor};

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

/// A decoder of the Qwen2 family, read from a Hugging Face `config.json`.
///
/// - `qwen2`: q/k/v projections always have a bias (as `transformers`' Qwen2), o_proj never.
/// - `qwen3`: `attention_bias` (default false) on q/k/v/o; RMSNorm over `head_dim` on every query
///   and key head (`q_norm`, `k_norm`) before RoPE.
/// - `llama`: `attention_bias` (default false) on q/k/v/o; no q/k norm; `mlp_bias`, RoPE scaling.
/// - `mistral`: Llama's layout with a `sliding_window` on attention.
///
/// All use a SwiGLU MLP, grouped-query attention, RoPE in the "rotate half" layout, and RMSNorm.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RawQwen2Config")]
pub struct Qwen2Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Qwen3 sets it; otherwise `hidden_size / num_attention_heads`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    /// Read from `rope_theta` or, as `transformers` 5 writes it, `rope_parameters.rope_theta`.
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Only `"silu"` is supported.
    pub hidden_act: String,
    /// Bias on q/k/v/o for `qwen3` and `llama`; ignored by `qwen2`, whose q/k/v always have one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    pub initializer_range: f64,
    /// An id, a list of ids, or absent.
    pub bos_token_id: Option<Value>,
    /// An id or a list of ids (Qwen chat models list several).
    pub eos_token_id: Option<Value>,
    /// Every other field of `config.json`, kept so that a saved config round-trips
    /// (`rope_scaling` and `mlp_bias` among them: they are read from here).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// `rope_scaling` / `rope_parameters`, as read (written back through `extra`).
    #[serde(skip)]
    pub rope_scaling: RopeScaling,
    /// Biases on gate/up/down (`mlp_bias`, Llama).
    #[serde(skip)]
    pub mlp_bias: bool,
    /// Mistral's attention window (`sliding_window`).
    #[serde(skip)]
    pub sliding_window: Option<usize>,
}

/// The serde image of `config.json` before defaults and validation.
#[derive(Deserialize)]
struct RawQwen2Config {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    rope_theta: Option<f64>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "default_hidden_act")]
    hidden_act: String,
    attention_bias: Option<bool>,
    #[serde(default = "default_initializer_range")]
    initializer_range: f64,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// `transformers`' default for all three model types.
fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_hidden_act() -> String {
    "silu".to_string()
}

/// `transformers`' default RoPE base when a config names none.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

impl TryFrom<RawQwen2Config> for Qwen2Config {
    type Error = String;

    fn try_from(raw: RawQwen2Config) -> std::result::Result<Self, String> {
        if !matches!(
            raw.model_type.as_str(),
            "qwen2" | "qwen3" | "llama" | "mistral"
        ) {
            return Err(format!(
                "model_type {:?} is not a Qwen2-family model (qwen2, qwen3, llama, mistral)",
                raw.model_type
            ));
        }
        if raw.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?} is not supported (only \"silu\")",
                raw.hidden_act
            ));
        }
        let extra = &raw.extra;
        let mut scaling = match extra.get("rope_scaling").filter(|v| !v.is_null()) {
            Some(v) => rope_scaling("rope_scaling", v)?,
            None => RopeScaling::None,
        };
        let mut theta = raw.rope_theta;
        if let Some(params) = extra.get("rope_parameters").filter(|v| !v.is_null()) {
            let from_params = rope_scaling("rope_parameters", params)?;
            if scaling != RopeScaling::None && from_params != scaling {
                return Err("rope_scaling and rope_parameters disagree".to_string());
            }
            scaling = from_params;
            if let Some(factor) = params.get("partial_rotary_factor").and_then(Value::as_f64) {
                if factor != 1.0 {
                    return Err(format!("partial_rotary_factor {factor} is not supported"));
                }
            }
            if let Some(t) = params.get("rope_theta") {
                let t = t
                    .as_f64()
                    .ok_or_else(|| format!("rope_parameters.rope_theta: {t}"))?;
                if theta.is_some_and(|top| top != t) {
                    return Err(format!(
                        "rope_theta {} and rope_parameters.rope_theta {t} disagree",
                        theta.unwrap_or_default()
                    ));
                }
                theta = Some(t);
            }
        }
        if let Some(factor) = extra.get("partial_rotary_factor").and_then(Value::as_f64) {
            if factor != 1.0 {
                return Err(format!("partial_rotary_factor {factor} is not supported"));
            }
        }
        if extra.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
            return Err("use_sliding_window = true is not supported".to_string());
        }
        if let Some(types) = extra.get("layer_types").and_then(Value::as_array) {
            if let Some(t) = types.iter().find(|t| t.as_str() != Some("full_attention")) {
                return Err(format!(
                    "layer_types entry {t} is not supported (only full_attention)"
                ));
            }
        }
        let mlp_bias = extra.get("mlp_bias").and_then(Value::as_bool) == Some(true);
        // Mistral's `sliding_window` (null: none); Qwen2's is switched by `use_sliding_window`
        // (refused above) and ignored otherwise, as transformers does.
        let sliding_window = match (raw.model_type.as_str(), extra.get("sliding_window")) {
            ("mistral", Some(v)) if !v.is_null() => match v.as_u64() {
                Some(w) if w > 0 => Some(w as usize),
                _ => return Err(format!("sliding_window {v} must be a positive integer")),
            },
            _ => None,
        };

        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        let head_dim = match raw.head_dim {
            Some(d) => d,
            // A zero count is reported by the size checks below.
            None if heads == 0 => 0,
            None if raw.hidden_size.is_multiple_of(heads) => raw.hidden_size / heads,
            None => {
                return Err(format!(
                    "hidden_size {} is not a multiple of num_attention_heads {heads}",
                    raw.hidden_size
                ))
            }
        };
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
        let theta = theta.unwrap_or(DEFAULT_ROPE_THETA);
        if !(theta.is_finite() && theta > 0.0) {
            return Err(format!("rope_theta {theta} must be positive"));
        }

        Ok(Qwen2Config {
            model_type: raw.model_type,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: raw.head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rope_theta: theta,
            rms_norm_eps: raw.rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings,
            hidden_act: raw.hidden_act,
            attention_bias: raw.attention_bias,
            initializer_range: raw.initializer_range,
            bos_token_id: raw.bos_token_id,
            eos_token_id: raw.eos_token_id,
            extra: raw.extra,
            rope_scaling: scaling,
            mlp_bias,
            sliding_window,
        })
    }
}

impl Qwen2Config {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub(crate) fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || self.attention_bias == Some(true)
    }

    pub(crate) fn o_bias(&self) -> bool {
        self.model_type != "qwen2" && self.attention_bias == Some(true)
    }

    pub(crate) fn qk_norm(&self) -> bool {
        self.model_type == "qwen3"
    }
}

impl Family for Qwen2Config {
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

    fn sliding_window(&self) -> Option<usize> {
        self.sliding_window
    }

    fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("config fields are plain JSON data")
    }

    fn generation_config(&self) -> Option<Value> {
        Some(hf_generation_config(&self.bos_token_id, &self.eos_token_id))
    }

    fn network(&self, w: &Weights, device: &Device) -> Result<Box<dyn Network>> {
        let rope = Rope::new(
            self.rope_theta,
            self.head_dim(),
            self.max_position_embeddings,
            &self.rope_scaling,
            device,
        )?;
        Ok(Box::new(Qwen2::new(self, w, rope)))
    }

    fn param_specs(&self) -> Vec<ParamSpec> {
        let c = self;
        let (h, hd) = (c.hidden_size, c.head_dim());
        let (q_out, kv_out) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let w = Init::Normal(c.initializer_range);
        let mut specs = vec![spec(format!("{EMBED}.weight"), &[c.vocab_size, h], w)];
        for i in 0..c.num_hidden_layers {
            let p = |m: &str, t: &str| format!("{}.{m}.{t}", layer(i));
            for (proj, out) in [(Q, q_out), (K, kv_out), (V, kv_out)] {
                specs.push(spec(p(proj, "weight"), &[out, h], w));
                if c.qkv_bias() {
                    specs.push(spec(p(proj, "bias"), &[out], Init::Zeros));
                }
            }
            specs.push(spec(p(O, "weight"), &[h, q_out], w));
            if c.o_bias() {
                specs.push(spec(p(O, "bias"), &[h], Init::Zeros));
            }
            if c.qk_norm() {
                specs.push(spec(p(Q_NORM, "weight"), &[hd], Init::Ones));
                specs.push(spec(p(K_NORM, "weight"), &[hd], Init::Ones));
            }
            for (proj, out, inp) in [
                (GATE, c.intermediate_size, h),
                (UP, c.intermediate_size, h),
                (DOWN, h, c.intermediate_size),
            ] {
                specs.push(spec(p(proj, "weight"), &[out, inp], w));
                if c.mlp_bias {
                    specs.push(spec(p(proj, "bias"), &[out], Init::Zeros));
                }
            }
            specs.push(spec(p(INPUT_NORM, "weight"), &[h], Init::Ones));
            specs.push(spec(p(POST_ATTN_NORM, "weight"), &[h], Init::Ones));
        }
        specs.push(spec(format!("{NORM}.weight"), &[h], Init::Ones));
        if !c.tie_word_embeddings {
            specs.push(spec(format!("{HEAD}.weight"), &[c.vocab_size, h], w));
        }
        specs
    }
}

#[derive(Debug, Clone)]
struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    gate: Linear,
    up: Linear,
    down: Linear,
    input_norm: Tensor,
    post_norm: Tensor,
}

#[derive(Debug, Clone)]
pub(crate) struct Qwen2 {
    cfg: Qwen2Config,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    rope: Rope,
}

impl Qwen2 {
    pub(crate) fn new(cfg: &Qwen2Config, w: &Weights, rope: Rope) -> Qwen2 {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = |m: &str| format!("{}.{m}", layer(i));
                Layer {
                    q: Linear::new(w, &p(Q)),
                    k: Linear::new(w, &p(K)),
                    v: Linear::new(w, &p(V)),
                    o: Linear::new(w, &p(O)),
                    q_norm: w.maybe(&format!("{}.weight", p(Q_NORM))),
                    k_norm: w.maybe(&format!("{}.weight", p(K_NORM))),
                    gate: Linear::new(w, &p(GATE)),
                    up: Linear::new(w, &p(UP)),
                    down: Linear::new(w, &p(DOWN)),
                    input_norm: w.get(&format!("{}.weight", p(INPUT_NORM))),
                    post_norm: w.get(&format!("{}.weight", p(POST_ATTN_NORM))),
                }
            })
            .collect();
        let embed = w.get(&format!("{EMBED}.weight"));
        let lm_head = match cfg.tie_word_embeddings {
            true => embed.clone(),
            false => w.get(&format!("{HEAD}.weight")),
        };
        Qwen2 {
            cfg: cfg.clone(),
            embed,
            layers,
            norm: w.get(&format!("{NORM}.weight")),
            lm_head,
            rope,
        }
    }

    /// [`Qwen2::forward_hidden`] for training with [`Qwen2::backward`]: the hidden states and
    /// the activations backward reads; `None` where a fused kernel does not apply (an odd head
    /// dim). The weights must be detached (no graph is built).
    pub(crate) fn forward_traced(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &ops::Mask,
        dropout_seed: Option<u64>,
    ) -> Result<Option<(Tensor, Qwen2Trace)>> {
        if !self.cfg.head_dim().is_multiple_of(2) {
            return Ok(None);
        }
        let mut tr = Qwen2Trace {
            ids: ids.flatten_all()?,
            mask: mask.clone(),
            dropout_seed,
            tables: None,
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
        Ok(Some((hidden, tr)))
    }

    fn run(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&ops::Mask>,
        mut kv: Option<&mut [LayerKv]>,
        seed: Option<u64>,
        mut keep: Option<&mut Qwen2Trace>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let dtype = self.embed.dtype();
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((
            b,
            t,
            self.cfg.hidden_size,
        ))?;
        let (cos, sin) = self.rope.gather(positions, dtype)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let cache = kv.as_deref_mut().map(|kv| &mut kv[i]);
            let traced = keep.is_some();
            let (out, acts) = self.layer(layer, &x, (&cos, &sin), mask, cache, traced, seed)?;
            if let Some(tr) = keep.as_deref_mut() {
                tr.layers.push(acts);
            }
            x = out;
        }
        let hidden = ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?;
        if let Some(tr) = keep {
            tr.tables = Some((cos, sin));
            tr.last = Some(x);
        }
        Ok(hidden)
    }

    /// A decoder layer's output, and its activations for [`Qwen2::backward`] (`traced`: with
    /// the attention's probabilities kept).
    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        l: &Layer,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        mask: Option<&ops::Mask>,
        cache: Option<&mut LayerKv>,
        traced: bool,
        seed: Option<u64>,
    ) -> Result<(Tensor, LayerTrace)> {
        let c = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (heads, kv_heads, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let eps = c.rms_norm_eps;

        let h = ops::rms_norm(x, &l.input_norm, eps)?;
        let q_in = l.q.forward(&h, seed)?.reshape((b, t, heads, hd))?;
        let k_in = l.k.forward(&h, seed)?.reshape((b, t, kv_heads, hd))?;
        let v = l.v.forward(&h, seed)?.reshape((b, t, kv_heads, hd))?;
        let (q_pre, k_pre) = match (&l.q_norm, &l.k_norm) {
            (Some(qn), Some(kn)) => (
                ops::rms_norm(&q_in, qn, eps)?,
                ops::rms_norm(&k_in, kn, eps)?,
            ),
            _ => (q_in.clone(), k_in.clone()),
        };
        let q = ops::rope_heads_first(&q_pre, cos, sin)?;
        let k = ops::rope_heads_first(&k_pre, cos, sin)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v)?,
            None => (k, v),
        };
        let probs = traced.then(ops::Kept::default);
        let y = ops::attention(&q, &k, &v, mask, None, probs.as_ref())?;
        let mid = (x + l.o.forward(&y, seed)?)?;

        let h2 = ops::rms_norm(&mid, &l.post_norm, eps)?;
        let gate = l.gate.forward(&h2, seed)?;
        let up = l.up.forward(&h2, seed)?;
        let m = ops::silu_mul(&gate, &up)?;
        let out = (&mid + l.down.forward(&m, seed)?)?;
        let acts = LayerTrace {
            x: x.clone(),
            h,
            // Only the q/k norms' backward reads them (Qwen3); kept otherwise they would hold
            // the projections' outputs (50 MB of a 0.5B model's 512-token step).
            qk_in: l.q_norm.is_some().then_some((q_in, k_in)),
            q,
            k,
            v,
            probs,
            y,
            mid,
            h2,
            gate,
            up,
        };
        Ok((out, acts))
    }

    /// The gradients of every parameter (into `grads`) from the gradient of the hidden states
    /// (b, t, hidden) that [`Qwen2::forward_traced`] returned.
    pub(crate) fn backward(&self, tr: Qwen2Trace, grad: &Tensor, grads: &mut Grads) -> Result<()> {
        let c = &self.cfg;
        let eps = c.rms_norm_eps;
        let rms = |x: &Tensor, w: &Tensor, g: &Tensor, grads: &mut Grads| {
            ops::norm_backward(NormKind::Rms, x, w, None, eps, g, grads)
        };
        let (cos, sin) = tr
            .tables
            .as_ref()
            .expect("the forward pass keeps its tables");
        let last = tr
            .last
            .as_ref()
            .expect("the forward pass keeps the final norm's input");
        let seed = tr.dropout_seed;
        let mut dx = rms(last, &self.norm, grad, grads)?;
        for (l, a) in self.layers.iter().zip(tr.layers).rev() {
            let (b, t, _) = a.x.dims3()?;
            // The down projection's input, recomputed (the same bits) rather than kept: for the
            // 0.5B model it was 240 MB of a 512-token step's activations.
            let m = ops::silu_mul(&a.gate, &a.up)?;
            let dm = l.down.backward(&m, &dx, grads, seed)?;
            drop(m);
            let (dgate, dup) = kernels::silu_mul_backward(&a.gate, &a.up, &dm)?;
            let dh2 = (l.gate.backward(&a.h2, &dgate, grads, seed)?
                + l.up.backward(&a.h2, &dup, grads, seed)?)?;
            // The residual branch's gradient first, as candle's backward adds them.
            dx = (dx + rms(&a.mid, &l.post_norm, &dh2, grads)?)?;

            let dy = l.o.backward(&a.y, &dx, grads, seed)?;
            let (dq, dk, dv) = ops::attention_backward(
                (&a.q, &a.k, &a.v),
                &a.y,
                &dy,
                Some(&tr.mask),
                None,
                a.probs.as_ref(),
            )?;
            // Undo the heads-first layouts: rope's backward for q and k, a transpose for v.
            let mut dq = kernels::rope_backward(&dq, cos, sin)?;
            let mut dk = kernels::rope_backward(&dk, cos, sin)?;
            if let (Some(qn), Some(kn), Some((q_in, k_in))) = (&l.q_norm, &l.k_norm, &a.qk_in) {
                dq = rms(q_in, qn, &dq, grads)?;
                dk = rms(k_in, kn, &dk, grads)?;
            }
            let dv = dv.transpose(1, 2)?.reshape((b, t, ()))?;
            let dh_v = l.v.backward(&a.h, &dv, grads, seed)?;
            let dh_k = l.k.backward(&a.h, &dk.reshape((b, t, ()))?, grads, seed)?;
            let dh_q = l.q.backward(&a.h, &dq.reshape((b, t, ()))?, grads, seed)?;
            // In the order candle's backward meets the three projections.
            let dh = ((dh_v + dh_k)? + dh_q)?;
            dx = (dx + rms(&a.x, &l.input_norm, &dh, grads)?)?;
        }
        let dx = dx.flatten_to(1)?;
        grads.put_rows(&self.embed, &tr.ids, &dx)?;
        Ok(())
    }
}

/// What [`Qwen2::backward`] reads of a training forward pass.
pub(crate) struct Qwen2Trace {
    /// Flat token ids (the embedding's gradient adds up at them).
    ids: Tensor,
    mask: ops::Mask,
    /// The training step's dropout seed (LoRA's dropout masks are drawn again from it).
    dropout_seed: Option<u64>,
    /// The rope tables at the batch's positions.
    tables: Option<(Tensor, Tensor)>,
    layers: Vec<LayerTrace>,
    /// The input of the final norm.
    last: Option<Tensor>,
}

/// A layer's activations: the inputs of its norms, products, rope, attention and SwiGLU, and the
/// attention's probabilities and output.
struct LayerTrace {
    x: Tensor,
    h: Tensor,
    /// q and k before their norms and rope, (b, t, heads, head_dim), with q/k norms (Qwen3).
    qk_in: Option<(Tensor, Tensor)>,
    /// q, k and v as attention read them, heads first.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Where the attention kept its probabilities (None outside a training trace).
    probs: Option<ops::Kept>,
    y: Tensor,
    mid: Tensor,
    h2: Tensor,
    gate: Tensor,
    up: Tensor,
}

impl Network for Qwen2 {
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

    fn forward_traced(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &ops::Mask,
        dropout_seed: Option<u64>,
    ) -> Result<Option<(Tensor, Box<dyn std::any::Any>)>> {
        Ok(
            Qwen2::forward_traced(self, ids, positions, mask, dropout_seed)?
                .map(|(h, tr)| (h, Box::new(tr) as Box<dyn std::any::Any>)),
        )
    }

    fn backward(
        &self,
        trace: Box<dyn std::any::Any>,
        grad: &Tensor,
        grads: &mut Grads,
    ) -> Result<()> {
        match trace.downcast::<Qwen2Trace>() {
            Ok(tr) => Qwen2::backward(self, *tr, grad, grads),
            Err(_) => foreign_trace(),
        }
    }

    fn rebuild(&self, w: &Weights) -> Box<dyn Network> {
        Box::new(Qwen2::new(&self.cfg, w, self.rope.clone()))
    }
}
