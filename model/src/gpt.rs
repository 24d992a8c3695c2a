//! A nanoGPT-style decoder: token + learned position embeddings, pre-LayerNorm blocks with a
//! fused qkv projection, a 4x GELU MLP, a final LayerNorm and a (usually tied) head.
//!
//! Dropout sites, each drawing its mask from its own stream of the step's seed: 0 is the
//! embedding; layer `i` has `1 + 3i` (attention probabilities), `2 + 3i` (attention output) and
//! `3 + 3i` (MLP output).

use std::any::Any;

use candle_core::{Device, Tensor};

use serde::{Deserialize, Serialize};

use crate::backward::Grads;
use crate::error::Result;
use crate::family::{foreign_trace, Family, Network};
use crate::hfconfig::{check_limits, default_initializer_range, MAX_LAYERS, MAX_WIDTH};
use crate::kernels::{self, NormKind};
use crate::kv::LayerKv;
use crate::ops::{self, Dropout, Linear};
use crate::params::{spec, Init, Kind, ParamSpec};
use crate::weights::{Weight, Weights};

/// The `model_type` of [`GptConfig`].
pub const GPT_MODEL_TYPE: &str = "sft-gpt";

/// A nanoGPT-style decoder: learned positions, pre-LayerNorm blocks, fused qkv projection,
/// tanh-approximated GELU MLP (4x), dropout in training mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    /// Always [`GPT_MODEL_TYPE`].
    pub model_type: String,
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// The context length: positions `0..block_size` have an embedding.
    pub block_size: usize,
    /// Probability for embedding, attention-probability and residual dropout (training only).
    #[serde(default)]
    pub dropout: f64,
    /// Biases in Linear layers and LayerNorms (nanoGPT's switch).
    #[serde(default = "default_true")]
    pub bias: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
}

fn default_true() -> bool {
    true
}

fn default_layer_norm_eps() -> f64 {
    1e-5
}

/// Keys that [`crate::Model::save`] and Hugging Face tooling add to any `config.json`; a GPT
/// config tolerates them and rejects every other unknown key (a typo must not pass silently).
pub(crate) const GPT_IGNORED_KEYS: [&str; 4] = [
    "dtype",
    "torch_dtype",
    "transformers_version",
    "architectures",
];

impl GptConfig {
    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        if self.model_type != GPT_MODEL_TYPE {
            return Err(format!(
                "model_type {:?} is not {GPT_MODEL_TYPE:?}",
                self.model_type
            ));
        }
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("block_size", self.block_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            ));
        }
        check_limits(&[
            ("vocab_size", self.vocab_size, MAX_WIDTH),
            ("n_embd", self.n_embd, MAX_WIDTH),
            ("n_layer", self.n_layer, MAX_LAYERS),
            ("block_size", self.block_size, MAX_WIDTH),
        ])?;
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout {} is outside [0, 1)", self.dropout));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(format!(
                "layer_norm_eps {} must be positive",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}

impl Family for GptConfig {
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn max_positions(&self) -> usize {
        self.block_size
    }
    fn hidden_size(&self) -> usize {
        self.n_embd
    }
    fn num_layers(&self) -> usize {
        self.n_layer
    }
    fn dropout(&self) -> f64 {
        self.dropout
    }
    fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings
    }

    fn network(&self, w: &Weights, _device: &Device) -> Result<Box<dyn Network>> {
        Ok(Box::new(Gpt::new(self, w)))
    }

    fn param_specs(&self) -> Vec<ParamSpec> {
        let c = self;
        let e = c.n_embd;
        let w = Init::Normal(c.initializer_range);
        // nanoGPT/GPT-2: residual projections start smaller so the residual stream's variance
        // does not grow with depth.
        let w_resid = Init::Normal(c.initializer_range / (2.0 * c.n_layer as f64).sqrt());
        let mut specs = vec![
            spec(
                format!("{WTE}.weight"),
                &[c.vocab_size, e],
                w,
                Kind::Embedding,
            ),
            spec(
                format!("{WPE}.weight"),
                &[c.block_size, e],
                w,
                Kind::Embedding,
            ),
        ];
        let norm = |specs: &mut Vec<ParamSpec>, name: String| {
            specs.push(spec(format!("{name}.weight"), &[e], Init::Ones, Kind::Norm));
            if c.bias {
                specs.push(spec(format!("{name}.bias"), &[e], Init::Zeros, Kind::Norm));
            }
        };
        let linear =
            |specs: &mut Vec<ParamSpec>, name: String, out: usize, inp: usize, init: Init| {
                specs.push(spec(
                    format!("{name}.weight"),
                    &[out, inp],
                    init,
                    Kind::Linear,
                ));
                if c.bias {
                    let bias = spec(format!("{name}.bias"), &[out], Init::Zeros, Kind::Linear);
                    specs.push(bias);
                }
            };
        for i in 0..c.n_layer {
            let p = |m: &str| format!("{}.{m}", block(i));
            norm(&mut specs, p(LN_1));
            linear(&mut specs, p(C_ATTN), 3 * e, e, w);
            linear(&mut specs, p(ATTN_PROJ), e, e, w_resid);
            norm(&mut specs, p(LN_2));
            linear(&mut specs, p(C_FC), 4 * e, e, w);
            linear(&mut specs, p(MLP_PROJ), e, 4 * e, w_resid);
        }
        norm(&mut specs, LN_F.into());
        if !c.tie_word_embeddings {
            specs.push(spec(
                format!("{HEAD}.weight"),
                &[c.vocab_size, e],
                w,
                Kind::Head,
            ));
        }
        specs
    }
}

// The module names, written once: the parameter specs above and the constructor below both read
// them.
const WTE: &str = "wte";
const WPE: &str = "wpe";
const LN_F: &str = "ln_f";
const HEAD: &str = "lm_head";
const LN_1: &str = "ln_1";
const C_ATTN: &str = "attn.c_attn";
const ATTN_PROJ: &str = "attn.c_proj";
const LN_2: &str = "ln_2";
const C_FC: &str = "mlp.c_fc";
const MLP_PROJ: &str = "mlp.c_proj";

fn block(i: usize) -> String {
    format!("h.{i}")
}

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
    wte: Weight,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    lm_head: Weight,
}

impl Gpt {
    pub(crate) fn new(cfg: &GptConfig, w: &Weights) -> Gpt {
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let p = |m: &str| format!("{}.{m}", block(i));
                Block {
                    ln_1: Norm::new(w, &p(LN_1)),
                    c_attn: Linear::new(w, &p(C_ATTN)),
                    attn_proj: Linear::new(w, &p(ATTN_PROJ)),
                    ln_2: Norm::new(w, &p(LN_2)),
                    c_fc: Linear::new(w, &p(C_FC)),
                    mlp_proj: Linear::new(w, &p(MLP_PROJ)),
                }
            })
            .collect();
        let wte = w.weight(&format!("{WTE}.weight"));
        let lm_head = match cfg.tie_word_embeddings {
            true => wte.clone(),
            false => w.weight(&format!("{HEAD}.weight")),
        };
        Gpt {
            cfg: cfg.clone(),
            wte,
            wpe: w.get(&format!("{WPE}.weight")),
            blocks,
            ln_f: Norm::new(w, LN_F),
            lm_head,
        }
    }

    fn norm(&self, n: &Norm, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &n.w, n.b.as_ref(), self.cfg.layer_norm_eps)
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

    /// Block `i` on `x`, and its activations for [`Gpt::backward_block`] (`keep`: with the
    /// attention's probabilities kept).
    fn block(
        &self,
        i: usize,
        x: &Tensor,
        mask: Option<&ops::Mask>,
        kv: Option<&mut LayerKv>,
        seed: Option<u64>,
        keep: bool,
    ) -> Result<(Tensor, BlockTrace)> {
        let blk = &self.blocks[i];
        let heads = self.cfg.n_head;
        let site = 1 + 3 * i as u64;
        let dropout = |site: u64| self.dropout(seed, site);
        let residual = |x: &Tensor, h: Tensor, site: u64| -> Result<Tensor> {
            match dropout(site) {
                Some(d) => ops::residual_dropout(x, &h, &d),
                None => Ok((x + h)?),
            }
        };
        let h1 = self.norm(&blk.ln_1, x)?;
        let qkv = blk.c_attn.forward(&h1, seed)?;
        let probs = keep.then(ops::Kept::default);
        let y = match kv {
            None => ops::attention_qkv(&qkv, heads, mask, dropout(site).as_ref(), probs.as_ref())?,
            Some(kv) => {
                let (q, k, v) = ops::split_qkv(&qkv, heads)?;
                let (k, v) = kv.append(k, v)?;
                ops::attention(&q, &k, &v, mask, dropout(site).as_ref(), None)?
            }
        };
        let mid = residual(x, blk.attn_proj.forward(&y, seed)?, site + 1)?;
        let h2 = self.norm(&blk.ln_2, &mid)?;
        let f = blk.c_fc.forward(&h2, seed)?;
        let g = ops::gelu(&f)?;
        let out = residual(&mid, blk.mlp_proj.forward(&g, seed)?, site + 2)?;
        let acts = BlockTrace {
            x: x.clone(),
            h1,
            qkv,
            probs,
            y,
            mid,
            h2,
            f,
            g,
        };
        Ok((out, acts))
    }

    /// x + dropout(h): x takes the gradient as it is, h the gradient times the mask.
    fn branch(&self, g: &Tensor, seed: Option<u64>, site: u64) -> Result<Tensor> {
        match self.dropout(seed, site) {
            Some(d) => Ok(kernels::dropout_backward(&d, g)?),
            None => Ok(g.clone()),
        }
    }

    /// The gradient of block `i`'s input from its output's (`dx`); its parameters' gradients
    /// go to `grads`.
    fn backward_block(
        &self,
        i: usize,
        a: BlockTrace,
        mut dx: Tensor,
        mask: Option<&ops::Mask>,
        grads: &mut Grads,
        seed: Option<u64>,
    ) -> Result<Tensor> {
        let blk = &self.blocks[i];
        let site = 1 + 3 * i as u64;
        let dg = blk
            .mlp_proj
            .backward(&a.g, &self.branch(&dx, seed, site + 2)?, grads, seed)?;
        let df = kernels::gelu_backward(&a.f, &dg)?;
        let dh2 = blk.c_fc.backward(&a.h2, &df, grads, seed)?;
        // The residual branch's gradient first, as candle's backward adds them.
        dx = (dx + self.norm_backward(&blk.ln_2, &a.mid, &dh2, grads)?)?;
        let dy = blk
            .attn_proj
            .backward(&a.y, &self.branch(&dx, seed, site + 1)?, grads, seed)?;
        let dqkv = ops::attention_qkv_backward(
            &a.qkv,
            &a.y,
            &dy,
            self.cfg.n_head,
            mask,
            self.dropout(seed, site).as_ref(),
            a.probs.as_ref(),
        )?;
        let dh1 = blk.c_attn.backward(&a.h1, &dqkv, grads, seed)?;
        Ok((dx + self.norm_backward(&blk.ln_1, &a.x, &dh1, grads)?)?)
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

/// A pass's mask, as the blocks read it.
struct Context(Option<ops::Mask>);

fn mask_of(ctx: &dyn Any) -> Result<Option<&ops::Mask>> {
    match ctx.downcast_ref::<Context>() {
        Some(c) => Ok(c.0.as_ref()),
        None => foreign_trace(),
    }
}

impl Network for Gpt {
    fn lm_head(&self) -> &Weight {
        &self.lm_head
    }

    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn context(
        &self,
        _positions: &Tensor,
        mask: Option<&ops::Mask>,
        _t_k: usize,
    ) -> Result<Box<dyn Any>> {
        Ok(Box::new(Context(mask.cloned())))
    }

    fn owns(&self, ctx: &dyn Any) -> bool {
        ctx.is::<Context>()
    }

    fn embed(&self, ids: &Tensor, positions: &Tensor, seed: Option<u64>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let tok = ops::embedding(&self.wte, ids, self.wpe.dtype())?;
        let pos = self.wpe.index_select(&positions.flatten_all()?, 0)?;
        let x = (tok + pos)?.reshape((b, t, self.cfg.n_embd))?;
        match self.dropout(seed, 0) {
            Some(d) => d.apply(&x),
            None => Ok(x),
        }
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
        let (out, acts) = self.block(i, x, mask_of(ctx)?, cache, seed, keep)?;
        Ok((out, keep.then(|| Box::new(acts) as Box<dyn Any>)))
    }

    fn finish(&self, x: &Tensor) -> Result<Tensor> {
        self.norm(&self.ln_f, x)
    }

    fn finish_backward(&self, x: &Tensor, grad: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        self.norm_backward(&self.ln_f, x, grad, grads)
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
        let Ok(acts) = acts.downcast::<BlockTrace>() else {
            return foreign_trace();
        };
        self.backward_block(i, *acts, grad.clone(), mask_of(ctx)?, grads, seed)
    }

    fn embed_backward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        grad: &Tensor,
        grads: &mut Grads,
        seed: Option<u64>,
    ) -> Result<()> {
        let dx = grad.flatten_to(1)?;
        let dx = match self.dropout(seed, 0) {
            Some(d) => d.apply(&dx)?,
            None => dx,
        };
        if let Weight::Dense(wte) = &self.wte {
            grads.put_rows(wte, &ids.flatten_all()?, &dx)?;
        }
        grads.put_rows(&self.wpe, &positions.flatten_all()?, &dx)?;
        Ok(())
    }

    fn rebuild(&self, w: &Weights) -> Box<dyn Network> {
        Box::new(Gpt::new(&self.cfg, w))
    }
}
