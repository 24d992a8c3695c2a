//! The decoder of the families in Llama's layout (Qwen2, Qwen3, Llama, Mistral, Gemma 2, Gemma
//! 3): token embedding, then per layer a pre-norm attention block (grouped-query heads, RoPE in
//! the "rotate half" layout) and a pre-norm gated MLP, each added to the residual stream, then a
//! final RMSNorm and the head. What differs between the families is a [`Layout`], which each
//! family's config file fills from its `config.json`; the maths here follow `transformers`'
//! modelling files of those families.
//!
//! The network runs three ways over the same layer code: a plain forward pass (candle's graph
//! records it where the weights are `Var`s, and a KV cache extends it in generation), a traced
//! forward pass that keeps what the own backward reads, and that backward, which gives candle's
//! gradients bit for bit (terms with several consumers are added in candle's order).

use std::any::Any;

use candle_core::{DType, Device, Tensor};

use crate::backward::Grads;
use crate::error::Result;
use crate::family::{foreign_trace, Family, Network};
use crate::hf::{layer, DOWN, EMBED, GATE, HEAD, K, K_NORM, NORM, O, Q, Q_NORM, UP, V};
use crate::hfconfig::DecoderSizes;
use crate::kernels::{self, NormKind};
use crate::kv::LayerKv;
use crate::ops::{self, Linear};
use crate::params::{spec, Init, Kind, ParamSpec};
use crate::rope::{Rope, RopeScaling};
use crate::weights::{Weight, Weights};

/// How a family's RMSNorms multiply by their gain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gain {
    /// `w * norm(x)`, gains start at 1 (Llama, Qwen, Mistral).
    Plain,
    /// `(1 + w) * norm(x)`, gains stored around 0 and start at 0; in half precision the norm
    /// and the product run in f32 and round once, as `transformers`' Gemma does.
    PlusOne,
}

/// The MLP's gate activation: `act(gate(x)) * up(x)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// SwiGLU (`silu`), one fused op on the CPU.
    Silu,
    /// GELU, tanh approximation (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// The Hugging Face names of a layer's norms, by role: the families name them differently
/// (Llama's `post_attention_layernorm` is the MLP's input norm, Gemma's normalises the
/// attention's output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NormNames {
    /// Before attention.
    pub(crate) attn_in: &'static str,
    /// On the attention's output, before the residual addition (Gemma).
    pub(crate) attn_out: Option<&'static str>,
    /// Before the MLP.
    pub(crate) mlp_in: &'static str,
    /// On the MLP's output, before the residual addition (Gemma).
    pub(crate) mlp_out: Option<&'static str>,
}

/// A RoPE base and its scaling.
pub type RopeParams = (f64, RopeScaling);

/// Everything a family's config decides about the decoder.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Layout {
    pub(crate) sizes: DecoderSizes,
    pub(crate) tie_word_embeddings: bool,
    pub(crate) initializer_range: f64,
    pub(crate) norm_names: NormNames,
    pub(crate) gain: Gain,
    pub(crate) activation: Activation,
    /// Biases on the q, k and v projections, and on the output projection.
    pub(crate) qkv_bias: bool,
    pub(crate) o_bias: bool,
    /// Biases on gate, up and down.
    pub(crate) mlp_bias: bool,
    /// An RMSNorm over `head_dim` on every query and key head before RoPE (Qwen3, Gemma 3).
    pub(crate) qk_norm: bool,
    /// The embedding's output is multiplied by this (Gemma: `sqrt(hidden)` rounded to f32).
    pub(crate) embed_scale: Option<f64>,
    /// q is multiplied by this after RoPE, so that the attention's `1 / sqrt(head_dim)` becomes
    /// `1 / sqrt(query_pre_attn_scalar)` (Gemma).
    pub(crate) query_scale: Option<f64>,
    /// `c tanh(s / c)` on the attention scores (Gemma 2): no fused kernel, so such a model
    /// trains through candle's backward.
    pub(crate) attn_softcap: Option<f64>,
    /// `c tanh(z / c)` on the logits (Gemma 2).
    pub(crate) final_softcap: Option<f64>,
    /// Per layer, whether it attends within `window` only.
    pub(crate) sliding: Vec<bool>,
    /// Keys at least this many positions behind a query are not attended on a sliding layer.
    pub(crate) window: Option<usize>,
    /// RoPE of the full-attention layers and of the sliding ones.
    pub(crate) rope_global: RopeParams,
    pub(crate) rope_local: RopeParams,
}

impl Layout {
    fn head_dim(&self) -> usize {
        self.sizes.head_dim
    }

    fn gain_init(&self) -> Init {
        match self.gain {
            Gain::Plain => Init::Ones,
            Gain::PlusOne => Init::Zeros,
        }
    }
}

impl Family for Layout {
    fn vocab_size(&self) -> usize {
        self.sizes.vocab_size
    }
    fn max_positions(&self) -> usize {
        self.sizes.max_position_embeddings
    }
    fn hidden_size(&self) -> usize {
        self.sizes.hidden_size
    }
    fn num_layers(&self) -> usize {
        self.sizes.num_hidden_layers
    }
    fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings
    }
    fn final_logit_softcap(&self) -> Option<f64> {
        self.final_softcap
    }

    /// `transformers`' `named_parameters` order: per layer the attention's projections (each
    /// weight then its bias), its q/k norms, the MLP's projections, then the layer's norms.
    fn param_specs(&self) -> Vec<ParamSpec> {
        let s = &self.sizes;
        let (h, hd) = (s.hidden_size, s.head_dim);
        let (q_out, kv_out) = (s.num_attention_heads * hd, s.num_key_value_heads * hd);
        let w = Init::Normal(self.initializer_range);
        let gain = self.gain_init();
        let embed = spec(
            format!("{EMBED}.weight"),
            &[s.vocab_size, h],
            w,
            Kind::Embedding,
        );
        let mut specs = vec![embed];
        for i in 0..s.num_hidden_layers {
            let p = |m: &str, t: &str| format!("{}.{m}.{t}", layer(i));
            let mut linear = |name: &str, out: usize, inp: usize, bias: bool| {
                specs.push(spec(p(name, "weight"), &[out, inp], w, Kind::Linear));
                if bias {
                    specs.push(spec(p(name, "bias"), &[out], Init::Zeros, Kind::Linear));
                }
            };
            linear(Q, q_out, h, self.qkv_bias);
            linear(K, kv_out, h, self.qkv_bias);
            linear(V, kv_out, h, self.qkv_bias);
            linear(O, h, q_out, self.o_bias);
            if self.qk_norm {
                for norm in [Q_NORM, K_NORM] {
                    specs.push(spec(p(norm, "weight"), &[hd], gain, Kind::Norm));
                }
            }
            let mut linear = |name: &str, out: usize, inp: usize| {
                specs.push(spec(p(name, "weight"), &[out, inp], w, Kind::Linear));
                if self.mlp_bias {
                    specs.push(spec(p(name, "bias"), &[out], Init::Zeros, Kind::Linear));
                }
            };
            linear(GATE, s.intermediate_size, h);
            linear(UP, s.intermediate_size, h);
            linear(DOWN, h, s.intermediate_size);
            let n = &self.norm_names;
            let norms = [Some(n.attn_in), n.attn_out, Some(n.mlp_in), n.mlp_out];
            for norm in norms.into_iter().flatten() {
                specs.push(spec(p(norm, "weight"), &[h], gain, Kind::Norm));
            }
        }
        specs.push(spec(format!("{NORM}.weight"), &[h], gain, Kind::Norm));
        if !self.tie_word_embeddings {
            let head = spec(format!("{HEAD}.weight"), &[s.vocab_size, h], w, Kind::Head);
            specs.push(head);
        }
        specs
    }

    fn network(&self, w: &Weights, device: &Device) -> Result<Box<dyn Network>> {
        let rope = |(theta, scaling): RopeParams| {
            Rope::new(
                theta,
                self.head_dim(),
                self.sizes.max_position_embeddings,
                &scaling,
                device,
            )
        };
        let global = rope(self.rope_global)?;
        let local = match self.rope_local == self.rope_global {
            true => global.clone(),
            false => rope(self.rope_local)?,
        };
        Ok(Box::new(Decoder::new(self, w, global, local)))
    }
}

/// An RMSNorm's gain as the layout multiplies by it.
#[derive(Debug, Clone)]
struct Norm {
    w: Tensor,
    gain: Gain,
}

impl Norm {
    fn new(w: Tensor, gain: Gain) -> Norm {
        Norm { w, gain }
    }

    /// `1 + w`, recomputed per pass so that candle's backward reaches `w` through it.
    fn plus_one(&self) -> Result<Tensor> {
        Ok(self.w.affine(1.0, 1.0)?)
    }

    fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        let dtype = x.dtype();
        match self.gain {
            Gain::Plain => ops::rms_norm(x, &self.w, eps),
            Gain::PlusOne if matches!(dtype, DType::F32 | DType::F64) => {
                ops::rms_norm(x, &self.plus_one()?, eps)
            }
            Gain::PlusOne => {
                // A half-precision `1 + w` would lose most of w's bits.
                let w1 = self.w.to_dtype(DType::F32)?.affine(1.0, 1.0)?;
                Ok(ops::rms_norm(&x.to_dtype(DType::F32)?, &w1, eps)?.to_dtype(dtype)?)
            }
        }
    }

    /// The gradient of `x`; `w`'s goes to `grads` (d(1 + w) = dw).
    fn backward(&self, x: &Tensor, grad: &Tensor, eps: f64, grads: &mut Grads) -> Result<Tensor> {
        match self.gain {
            Gain::Plain => ops::norm_backward(NormKind::Rms, x, &self.w, None, eps, grad, grads),
            Gain::PlusOne => {
                let w1 = self.plus_one()?;
                let (dx, dw, _) =
                    crate::norm::norm_affine_backward(x, NormKind::Rms, eps, &w1, None, grad)?;
                grads.put(&self.w, dw)?;
                Ok(dx)
            }
        }
    }
}

impl Activation {
    /// `act(gate) * up`.
    fn forward(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Silu => ops::silu_mul(gate, up),
            Activation::GeluTanh => Ok((ops::gelu(gate)? * up)?),
        }
    }

    /// The gradients of gate and up from the product's.
    fn backward(self, gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        match self {
            Activation::Silu => Ok(kernels::silu_mul_backward(gate, up, grad)?),
            Activation::GeluTanh => {
                let act = ops::gelu(gate)?;
                let dup = (grad * &act)?;
                let dgate = kernels::gelu_backward(gate, &(grad * up)?)?;
                Ok((dgate, dup))
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    gate: Linear,
    up: Linear,
    down: Linear,
    attn_in: Norm,
    attn_out: Option<Norm>,
    mlp_in: Norm,
    mlp_out: Option<Norm>,
    sliding: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Decoder {
    layout: Layout,
    embed: Weight,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Weight,
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

impl Decoder {
    fn new(layout: &Layout, w: &Weights, rope_global: Rope, rope_local: Rope) -> Decoder {
        let norm = |name: String| Norm::new(w.get(&format!("{name}.weight")), layout.gain);
        let n = &layout.norm_names;
        let layers = (0..layout.sizes.num_hidden_layers)
            .map(|i| {
                let p = |m: &str| format!("{}.{m}", layer(i));
                let maybe = |m: &str| {
                    let t = w.maybe(&format!("{}.weight", p(m)));
                    t.map(|t| Norm::new(t, layout.gain))
                };
                Layer {
                    q: Linear::new(w, &p(Q)),
                    k: Linear::new(w, &p(K)),
                    v: Linear::new(w, &p(V)),
                    o: Linear::new(w, &p(O)),
                    q_norm: maybe(Q_NORM),
                    k_norm: maybe(K_NORM),
                    gate: Linear::new(w, &p(GATE)),
                    up: Linear::new(w, &p(UP)),
                    down: Linear::new(w, &p(DOWN)),
                    attn_in: norm(p(n.attn_in)),
                    attn_out: n.attn_out.map(|m| norm(p(m))),
                    mlp_in: norm(p(n.mlp_in)),
                    mlp_out: n.mlp_out.map(|m| norm(p(m))),
                    sliding: layout.sliding[i],
                }
            })
            .collect();
        let embed = w.weight(&format!("{EMBED}.weight"));
        let lm_head = match layout.tie_word_embeddings {
            true => embed.clone(),
            false => w.weight(&format!("{HEAD}.weight")),
        };
        Decoder {
            layout: layout.clone(),
            embed,
            layers,
            norm: norm(NORM.to_string()),
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
        let local_mask = match (self.layout.window, mask) {
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
        let local = match self.layout.rope_local == self.layout.rope_global {
            true => global.clone(),
            false => self.rope_local.gather(positions, dtype)?,
        };
        Ok(Context {
            global: (mask.cloned(), global),
            local: (local_mask, local),
        })
    }

    /// A decoder layer's output, and its activations for [`Decoder::layer_backward`]
    /// (`traced`: with the attention's probabilities kept).
    fn run_layer(
        &self,
        l: &Layer,
        x: &Tensor,
        ctx: &Context,
        cache: Option<&mut LayerKv>,
        traced: bool,
        seed: Option<u64>,
    ) -> Result<(Tensor, LayerTrace)> {
        let c = &self.layout;
        let s = &c.sizes;
        let (b, t, _) = x.dims3()?;
        let (heads, kv_heads, hd) = (s.num_attention_heads, s.num_key_value_heads, s.head_dim);
        let eps = s.rms_norm_eps;
        let (mask, (cos, sin)) = ctx.of(l.sliding);

        let h = l.attn_in.forward(x, eps)?;
        let q_in = l.q.forward(&h, seed)?.reshape((b, t, heads, hd))?;
        let k_in = l.k.forward(&h, seed)?.reshape((b, t, kv_heads, hd))?;
        let v = l.v.forward(&h, seed)?.reshape((b, t, kv_heads, hd))?;
        let (q_pre, k_pre) = match (&l.q_norm, &l.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&q_in, eps)?, kn.forward(&k_in, eps)?),
            _ => (q_in.clone(), k_in.clone()),
        };
        let mut q = ops::rope_heads_first(&q_pre, cos, sin)?;
        if let Some(s) = c.query_scale {
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
                let additive = mask.map(ops::Mask::additive);
                let y = ops::composed_attention(&q, &k, &v, additive, None, Some(cap))?;
                y.transpose(1, 2)?.reshape((b, t, heads * hd))?
            }
            None => ops::attention(&q, &k, &v, mask, None, probs.as_ref())?,
        };
        let a = l.o.forward(&y, seed)?;
        let mid = match &l.attn_out {
            Some(n) => (x + n.forward(&a, eps)?)?,
            None => (x + &a)?,
        };

        let h2 = l.mlp_in.forward(&mid, eps)?;
        let gate = l.gate.forward(&h2, seed)?;
        let up = l.up.forward(&h2, seed)?;
        let m = c.activation.forward(&gate, &up)?;
        let f = l.down.forward(&m, seed)?;
        let out = match &l.mlp_out {
            Some(n) => (&mid + n.forward(&f, eps)?)?,
            None => (&mid + &f)?,
        };
        let acts = LayerTrace {
            x: x.clone(),
            h,
            // Only the q/k norms' backward reads them; kept otherwise they would hold the
            // projections' outputs (50 MB of a 0.5B model's 512-token step).
            qk_in: l.q_norm.is_some().then_some((q_in, k_in)),
            q,
            k,
            v,
            probs,
            y,
            // The output norms' inputs, where there are such norms.
            a: l.attn_out.is_some().then_some(a),
            mid,
            h2,
            gate,
            up,
            f: l.mlp_out.is_some().then_some(f),
        };
        Ok((out, acts))
    }

    /// The gradient of a layer's input from its output's (`dx`); its parameters' gradients go
    /// to `grads`.
    fn backward_layer(
        &self,
        l: &Layer,
        a: LayerTrace,
        mut dx: Tensor,
        ctx: &Context,
        grads: &mut Grads,
        seed: Option<u64>,
    ) -> Result<Tensor> {
        let c = &self.layout;
        let eps = c.sizes.rms_norm_eps;
        let (b, t, _) = a.x.dims3()?;
        let (mask, (cos, sin)) = ctx.of(l.sliding);
        let df = match (&l.mlp_out, &a.f) {
            (Some(n), Some(f)) => n.backward(f, &dx, eps, grads)?,
            _ => dx.clone(),
        };
        // The down projection's input, recomputed (the same bits) rather than kept.
        let m = c.activation.forward(&a.gate, &a.up)?;
        let dm = l.down.backward(&m, &df, grads, seed)?;
        drop(m);
        let (dgate, dup) = c.activation.backward(&a.gate, &a.up, &dm)?;
        let dh2 = (l.gate.backward(&a.h2, &dgate, grads, seed)?
            + l.up.backward(&a.h2, &dup, grads, seed)?)?;
        // The residual branch's gradient first, as candle's backward adds them.
        dx = (dx + l.mlp_in.backward(&a.mid, &dh2, eps, grads)?)?;

        let da = match (&l.attn_out, &a.a) {
            (Some(n), Some(out)) => n.backward(out, &dx, eps, grads)?,
            _ => dx.clone(),
        };
        let dy = l.o.backward(&a.y, &da, grads, seed)?;
        let (dq, dk, dv) =
            ops::attention_backward((&a.q, &a.k, &a.v), &a.y, &dy, mask, None, a.probs.as_ref())?;
        let dq = match c.query_scale {
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
        Ok((dx + l.attn_in.backward(&a.x, &dh, eps, grads)?)?)
    }

    /// The dtype of the residual stream: the norms' (never kept as blocks).
    fn dtype(&self) -> DType {
        self.norm.w.dtype()
    }
}

/// The context of a pass as the network was given it.
fn context_of(ctx: &dyn Any) -> Result<&Context> {
    ctx.downcast_ref::<Context>().map_or_else(foreign_trace, Ok)
}

/// A layer's activations: the inputs of its norms, products, rope, attention and gated MLP, and
/// the attention's probabilities and output.
struct LayerTrace {
    x: Tensor,
    h: Tensor,
    /// q and k before their norms and rope, (b, t, heads, head_dim), with q/k norms.
    qk_in: Option<(Tensor, Tensor)>,
    /// q (scaled), k and v as attention read them, heads first.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Where the attention kept its probabilities (None outside a training trace).
    probs: Option<ops::Kept>,
    y: Tensor,
    /// The output projection's output, with a norm on it.
    a: Option<Tensor>,
    mid: Tensor,
    h2: Tensor,
    gate: Tensor,
    up: Tensor,
    /// The down projection's output, with a norm on it.
    f: Option<Tensor>,
}

impl Network for Decoder {
    fn lm_head(&self) -> &Weight {
        &self.lm_head
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn context(
        &self,
        positions: &Tensor,
        mask: Option<&ops::Mask>,
        t_k: usize,
    ) -> Result<Box<dyn Any>> {
        Ok(Box::new(Decoder::context(
            self,
            positions,
            mask,
            t_k,
            self.dtype(),
        )?))
    }

    fn owns(&self, ctx: &dyn Any) -> bool {
        ctx.is::<Context>()
    }

    fn embed(&self, ids: &Tensor, _positions: &Tensor, _seed: Option<u64>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let mut x = ops::embedding(&self.embed, ids, self.dtype())?;
        if let Some(s) = self.layout.embed_scale {
            x = x.affine(s, 0.0)?;
        }
        Ok(x.reshape((b, t, self.layout.sizes.hidden_size))?)
    }

    fn layer(
        &self,
        i: usize,
        x: &Tensor,
        ctx: &dyn Any,
        cache: Option<&mut LayerKv>,
        seed: Option<u64>,
        keep: bool,
    ) -> Result<(Tensor, Option<Box<dyn Any>>)> {
        let ctx = context_of(ctx)?;
        let (out, acts) = self.run_layer(&self.layers[i], x, ctx, cache, keep, seed)?;
        Ok((out, keep.then(|| Box::new(acts) as Box<dyn Any>)))
    }

    fn finish(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x, self.layout.sizes.rms_norm_eps)
    }

    /// Not with an attention soft-cap: the fused attention has no such step, so those models
    /// train through candle's backward.
    fn own_backward(&self) -> bool {
        self.layout.attn_softcap.is_none()
    }

    fn finish_backward(&self, x: &Tensor, grad: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        self.norm
            .backward(x, grad, self.layout.sizes.rms_norm_eps, grads)
    }

    fn layer_backward(
        &self,
        i: usize,
        acts: Box<dyn Any>,
        grad: &Tensor,
        ctx: &dyn Any,
        grads: &mut Grads,
        seed: Option<u64>,
    ) -> Result<Tensor> {
        let Ok(acts) = acts.downcast::<LayerTrace>() else {
            return foreign_trace();
        };
        let ctx = context_of(ctx)?;
        self.backward_layer(&self.layers[i], *acts, grad.clone(), ctx, grads, seed)
    }

    fn embed_backward(
        &self,
        ids: &Tensor,
        _positions: &Tensor,
        grad: &Tensor,
        grads: &mut Grads,
        _seed: Option<u64>,
    ) -> Result<()> {
        let mut dx = grad.flatten_to(1)?;
        if let Some(s) = self.layout.embed_scale {
            dx = dx.affine(s, 0.0)?;
        }
        if let Weight::Dense(embed) = &self.embed {
            grads.put_rows(embed, &ids.flatten_all()?, &dx)?;
        }
        Ok(())
    }

    fn rebuild(&self, w: &Weights) -> Box<dyn Network> {
        Box::new(Decoder::new(
            &self.layout,
            w,
            self.rope_global.clone(),
            self.rope_local.clone(),
        ))
    }
}
