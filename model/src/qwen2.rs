//! The Qwen2-family decoder (Qwen2, Qwen3, Llama): the maths of `transformers`'
//! `Qwen2ForCausalLM` / `Qwen3ForCausalLM` / `LlamaForCausalLM`, written with differentiable ops.

use candle_core::Tensor;

use crate::config::Qwen2Config;
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
    gate: Tensor,
    up: Tensor,
    down: Tensor,
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
                    gate: w.get(&p("mlp.gate_proj.weight")),
                    up: w.get(&p("mlp.up_proj.weight")),
                    down: w.get(&p("mlp.down_proj.weight")),
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
    /// when given, holds one entry per layer that this call extends.
    pub(crate) fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&ops::Mask>,
        mut kv: Option<&mut [LayerKv]>,
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
            x = self.layer(layer, &x, &cos, &sin, mask, cache)?;
        }
        ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }

    fn layer(
        &self,
        l: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&ops::Mask>,
        cache: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (heads, kv_heads, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let eps = c.rms_norm_eps;

        let h = ops::rms_norm(x, &l.input_norm, eps)?;
        let mut q = l.q.forward(&h)?.reshape((b, t, heads, hd))?;
        let mut k = l.k.forward(&h)?.reshape((b, t, kv_heads, hd))?;
        let v = l.v.forward(&h)?.reshape((b, t, kv_heads, hd))?;
        if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
            q = ops::rms_norm(&q, qn, eps)?;
            k = ops::rms_norm(&k, kn, eps)?;
        }
        let q = ops::rope_heads_first(&q, cos, sin)?;
        let k = ops::rope_heads_first(&k, cos, sin)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v)?,
            None => (k, v),
        };
        let y = ops::attention(&q, &k, &v, mask, None)?;
        let x = (x + l.o.forward(&y)?)?;

        let h = ops::rms_norm(&x, &l.post_norm, eps)?;
        let m = ops::silu_mul(
            &ops::linear(&h, &l.gate, None)?,
            &ops::linear(&h, &l.up, None)?,
        )?;
        Ok((x + ops::linear(&m, &l.down, None)?)?)
    }
}
