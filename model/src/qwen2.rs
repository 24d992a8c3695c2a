//! The Qwen2-family decoder (Qwen2, Qwen3, Llama): the maths of `transformers`'
//! `Qwen2ForCausalLM` / `Qwen3ForCausalLM` / `LlamaForCausalLM`, written with differentiable ops.

use candle_core::Tensor;

use crate::backward::Grads;
use crate::config::Qwen2Config;
use crate::kernels::{self, NormKind};
use crate::ops::{self, Linear, Rope};
use crate::{LayerKv, Result, Weights};

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
                let p = |s: &str| format!("model.layers.{i}.{s}");
                Layer {
                    q: Linear::new(w, &p("self_attn.q_proj")),
                    k: Linear::new(w, &p("self_attn.k_proj")),
                    v: Linear::new(w, &p("self_attn.v_proj")),
                    o: Linear::new(w, &p("self_attn.o_proj")),
                    q_norm: w.maybe(&p("self_attn.q_norm.weight")),
                    k_norm: w.maybe(&p("self_attn.k_norm.weight")),
                    gate: Linear::new(w, &p("mlp.gate_proj")),
                    up: Linear::new(w, &p("mlp.up_proj")),
                    down: Linear::new(w, &p("mlp.down_proj")),
                    input_norm: w.get(&p("input_layernorm.weight")),
                    post_norm: w.get(&p("post_attention_layernorm.weight")),
                }
            })
            .collect();
        let embed = w.get("model.embed_tokens.weight");
        let lm_head = match cfg.tie_word_embeddings {
            true => embed.clone(),
            false => w.get("lm_head.weight"),
        };
        Qwen2 {
            cfg: cfg.clone(),
            embed,
            layers,
            norm: w.get("model.norm.weight"),
            lm_head,
            rope,
        }
    }

    pub(crate) fn rope(&self) -> &Rope {
        &self.rope
    }

    pub(crate) fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// Hidden states after the final norm. `mask` is additive (see `ops::segment_mask`); `kv`,
    /// when given, holds one entry per layer that this call extends. `dropout_seed: Some(_)` is
    /// training mode (only LoRA adapters have dropout here).
    pub(crate) fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&ops::Mask>,
        kv: Option<&mut [LayerKv]>,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        self.run(ids, positions, mask, kv, dropout_seed, None)
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
            let dh2_up = l.up.backward_terms(&a.h2, &dup, grads, seed)?;
            let dh2_gate = l.gate.backward_terms(&a.h2, &dgate, grads, seed)?;
            let dh2 = ops::sum_in_order(dh2_up.into_iter().chain(dh2_gate))?;
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
            let dh_v = l.v.backward_terms(&a.h, &dv, grads, seed)?;
            let dh_k =
                l.k.backward_terms(&a.h, &dk.reshape((b, t, ()))?, grads, seed)?;
            let dh_q =
                l.q.backward_terms(&a.h, &dq.reshape((b, t, ()))?, grads, seed)?;
            // In the order candle's backward meets the three projections (and their adapters).
            let dh = ops::sum_in_order(dh_v.into_iter().chain(dh_k).chain(dh_q))?;
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
