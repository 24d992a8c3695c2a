//! A nanoGPT-style decoder: token + learned position embeddings, pre-LayerNorm blocks with a
//! fused qkv projection, a 4x GELU MLP, a final LayerNorm and a (usually tied) head.
//!
//! Dropout sites, each drawing its mask from its own stream of the step's seed: 0 is the
//! embedding; layer `i` has `1 + 3i` (attention probabilities), `2 + 3i` (attention output) and
//! `3 + 3i` (MLP output).

use candle_core::Tensor;

use crate::backward::Grads;
use crate::config::GptConfig;
use crate::kernels::{self, NormKind};
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
        kv: Option<&mut [LayerKv]>,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        self.run(ids, positions, mask, kv, dropout_seed, None)
    }

    /// [`Gpt::forward_hidden`] for training with [`Gpt::backward`]: the hidden states and the
    /// activations backward reads. The weights must be detached (no graph is built).
    pub(crate) fn forward_traced(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &ops::Mask,
        dropout_seed: Option<u64>,
    ) -> Result<(Tensor, GptTrace)> {
        let mut blocks = Vec::with_capacity(self.blocks.len());
        let mut last = None;
        let hidden = self.run(
            ids,
            positions,
            Some(mask),
            None,
            dropout_seed,
            Some((&mut blocks, &mut last)),
        )?;
        let trace = GptTrace {
            ids: ids.flatten_all()?,
            positions: positions.flatten_all()?,
            mask: mask.clone(),
            dropout_seed,
            blocks,
            last: last.expect("the forward pass keeps ln_f's input"),
        };
        Ok((hidden, trace))
    }

    fn dropout(&self, dropout_seed: Option<u64>, site: u64) -> Option<Dropout> {
        dropout_seed
            .filter(|_| self.cfg.dropout > 0.0)
            .map(|seed| Dropout {
                p: self.cfg.dropout,
                seed,
                site,
            })
    }

    fn run(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&ops::Mask>,
        mut kv: Option<&mut [LayerKv]>,
        dropout_seed: Option<u64>,
        mut keep: Option<(&mut Vec<BlockTrace>, &mut Option<Tensor>)>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let e = self.cfg.n_embd;
        let heads = self.cfg.n_head;
        let dropout = |site: u64| self.dropout(dropout_seed, site);
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
            let h1 = self.norm(&blk.ln_1, &x)?;
            let qkv = blk.c_attn.forward(&h1, dropout_seed)?;
            let probs = keep.is_some().then(ops::Kept::default);
            let y = match kv.as_deref_mut() {
                None => {
                    ops::attention_qkv(&qkv, heads, mask, dropout(site).as_ref(), probs.as_ref())?
                }
                Some(kv) => {
                    let (q, k, v) = ops::split_qkv(&qkv, heads)?;
                    let (k, v) = kv[i].append(k, v)?;
                    ops::attention(&q, &k, &v, mask, dropout(site).as_ref(), None)?
                }
            };
            let mid = residual(&x, blk.attn_proj.forward(&y, dropout_seed)?, site + 1)?;
            let h2 = self.norm(&blk.ln_2, &mid)?;
            let f = blk.c_fc.forward(&h2, dropout_seed)?;
            let g = ops::gelu(&f)?;
            let out = residual(&mid, blk.mlp_proj.forward(&g, dropout_seed)?, site + 2)?;
            if let Some((blocks, _)) = keep.as_mut() {
                blocks.push(BlockTrace {
                    x,
                    h1,
                    qkv,
                    probs,
                    y,
                    mid,
                    h2,
                    f,
                    g,
                });
            }
            x = out;
        }
        let hidden = self.norm(&self.ln_f, &x)?;
        if let Some((_, last)) = keep {
            *last = Some(x);
        }
        Ok(hidden)
    }

    /// The gradients of every parameter (into `grads`) from the gradient of the hidden states
    /// (b, t, n_embd) that [`Gpt::forward_traced`] returned.
    pub(crate) fn backward(&self, tr: GptTrace, grad: &Tensor, grads: &mut Grads) -> Result<()> {
        let heads = self.cfg.n_head;
        let seed = tr.dropout_seed;
        let dropout = |site: u64| self.dropout(seed, site);
        // x + dropout(h): x takes the gradient as it is, h the gradient times the mask.
        let branch = |g: &Tensor, site: u64| -> Result<Tensor> {
            match dropout(site) {
                Some(d) => Ok(kernels::dropout_backward(&d, g)?),
                None => Ok(g.clone()),
            }
        };
        let mut dx = self.norm_backward(&self.ln_f, &tr.last, grad, grads)?;
        for (i, (blk, a)) in self.blocks.iter().zip(tr.blocks).enumerate().rev() {
            let site = 1 + 3 * i as u64;
            let dg = blk
                .mlp_proj
                .backward(&a.g, &branch(&dx, site + 2)?, grads, seed)?;
            let df = kernels::gelu_backward(&a.f, &dg)?;
            let dh2 = blk.c_fc.backward(&a.h2, &df, grads, seed)?;
            // The residual branch's gradient first, as candle's backward adds them.
            dx = (dx + self.norm_backward(&blk.ln_2, &a.mid, &dh2, grads)?)?;
            let dy = blk
                .attn_proj
                .backward(&a.y, &branch(&dx, site + 1)?, grads, seed)?;
            let dqkv = ops::attention_qkv_backward(
                &a.qkv,
                &a.y,
                &dy,
                heads,
                Some(&tr.mask),
                dropout(site).as_ref(),
                a.probs.as_ref(),
            )?;
            let dh1 = blk.c_attn.backward(&a.h1, &dqkv, grads, seed)?;
            dx = (dx + self.norm_backward(&blk.ln_1, &a.x, &dh1, grads)?)?;
        }
        let dx = dx.flatten_to(1)?;
        let dx = match dropout(0) {
            Some(d) => d.apply(&dx)?,
            None => dx,
        };
        grads.put_rows(&self.wte, &tr.ids, &dx)?;
        grads.put_rows(&self.wpe, &tr.positions, &dx)?;
        Ok(())
    }

    fn norm_backward(
        &self,
        n: &Norm,
        x: &Tensor,
        grad: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let eps = self.cfg.layer_norm_eps;
        ops::norm_backward(NormKind::Layer, x, &n.w, n.b.as_ref(), eps, grad, grads)
    }
}

/// What [`Gpt::backward`] reads of a training forward pass.
pub(crate) struct GptTrace {
    /// Flat token ids and positions (the embedding lookups' gradients add up at them).
    ids: Tensor,
    positions: Tensor,
    mask: ops::Mask,
    dropout_seed: Option<u64>,
    blocks: Vec<BlockTrace>,
    /// The input of `ln_f`.
    last: Tensor,
}

/// A block's activations: the inputs of its norms, products, attention and GELU, and the
/// attention's probabilities and output.
struct BlockTrace {
    x: Tensor,
    h1: Tensor,
    qkv: Tensor,
    /// Where the attention kept its probabilities (training traces always pass one).
    probs: Option<ops::Kept>,
    y: Tensor,
    mid: Tensor,
    h2: Tensor,
    f: Tensor,
    g: Tensor,
}
