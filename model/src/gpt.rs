//! A nanoGPT-style decoder: token + learned position embeddings, pre-LayerNorm blocks with a
//! fused qkv projection, a 4x GELU MLP, a final LayerNorm and a (usually tied) head.
//!
//! Dropout sites, each drawing its mask from its own stream of the step's seed: 0 is the
//! embedding; layer `i` has `1 + 3i` (attention probabilities), `2 + 3i` (attention output) and
//! `3 + 3i` (MLP output).

use candle_core::Tensor;

use crate::config::GptConfig;
use crate::ops::{self, Dropout, Linear};
use crate::{LayerKv, Result, Weights};

#[derive(Debug, Clone)]
struct Norm {
    w: Tensor,
    b: Option<Tensor>,
}

impl Norm {
    fn new(w: &Weights, name: &str) -> Norm {
        Norm {
            w: w.get(&format!("{name}.weight")),
            b: w.maybe(&format!("{name}.bias")),
        }
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: Norm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: Norm,
    c_fc: Linear,
    mlp_proj: Linear,
}

#[derive(Debug, Clone)]
pub(crate) struct Gpt {
    cfg: GptConfig,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    lm_head: Tensor,
}

impl Gpt {
    pub(crate) fn new(cfg: &GptConfig, w: &Weights) -> Gpt {
        let blocks = (0..cfg.n_layer)
            .map(|i| Block {
                ln_1: Norm::new(w, &format!("h.{i}.ln_1")),
                c_attn: Linear::new(w, &format!("h.{i}.attn.c_attn")),
                attn_proj: Linear::new(w, &format!("h.{i}.attn.c_proj")),
                ln_2: Norm::new(w, &format!("h.{i}.ln_2")),
                c_fc: Linear::new(w, &format!("h.{i}.mlp.c_fc")),
                mlp_proj: Linear::new(w, &format!("h.{i}.mlp.c_proj")),
            })
            .collect();
        let wte = w.get("wte.weight");
        let lm_head = match cfg.tie_word_embeddings {
            true => wte.clone(),
            false => w.get("lm_head.weight"),
        };
        Gpt {
            cfg: cfg.clone(),
            wte,
            wpe: w.get("wpe.weight"),
            blocks,
            ln_f: Norm::new(w, "ln_f"),
            lm_head,
        }
    }

    pub(crate) fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    fn norm(&self, n: &Norm, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &n.w, n.b.as_ref(), self.cfg.layer_norm_eps)
    }

    /// Hidden states after `ln_f`. `dropout_seed: Some(_)` is training mode.
    pub(crate) fn forward_hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&ops::Mask>,
        mut kv: Option<&mut [LayerKv]>,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let e = self.cfg.n_embd;
        let heads = self.cfg.n_head;
        let dropout = |site: u64| {
            dropout_seed
                .filter(|_| self.cfg.dropout > 0.0)
                .map(|seed| Dropout {
                    p: self.cfg.dropout,
                    seed,
                    site,
                })
        };
        let drop = |x: Tensor, site: u64| -> Result<Tensor> {
            match dropout(site) {
                Some(d) => d.apply(&x),
                None => Ok(x),
            }
        };
        let residual = |x: &Tensor, h: Tensor, site: u64| -> Result<Tensor> {
            match dropout(site) {
                Some(d) => ops::residual_dropout(x, &h, &d),
                None => Ok((x + h)?),
            }
        };

        let tok = self.wte.index_select(&ids.flatten_all()?, 0)?;
        let pos = self.wpe.index_select(&positions.flatten_all()?, 0)?;
        let mut x = drop((tok + pos)?.reshape((b, t, e))?, 0)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            let site = 1 + 3 * i as u64;
            let h = self.norm(&blk.ln_1, &x)?;
            let qkv = blk.c_attn.forward(&h)?;
            let y = match kv.as_deref_mut() {
                None => ops::attention_qkv(&qkv, heads, mask, dropout(site).as_ref())?,
                Some(kv) => {
                    let (q, k, v) = ops::split_qkv(&qkv, heads)?;
                    let (k, v) = kv[i].append(k, v)?;
                    ops::attention(&q, &k, &v, mask, dropout(site).as_ref())?
                }
            };
            x = residual(&x, blk.attn_proj.forward(&y)?, site + 1)?;
            let h = self.norm(&blk.ln_2, &x)?;
            let m = blk.mlp_proj.forward(&ops::gelu(&blk.c_fc.forward(&h)?)?)?;
            x = residual(&x, m, site + 2)?;
        }
        self.norm(&self.ln_f, &x)
    }
}
