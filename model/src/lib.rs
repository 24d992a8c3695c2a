//! Trainable causal language models on candle: the Qwen2 family (Qwen2, Qwen3, Llama) with
//! Hugging Face checkpoints, and a small nanoGPT-style model.
//!
//! [`Model`] owns its parameters as [`Var`]s under their Hugging Face names
//! ([`Model::params`], in a fixed order), and runs every op with a backward pass, so a loss built
//! on [`Model::forward`] or [`Model::forward_hidden`] trains all of them. `forward` is `&self`,
//! returns every position, and knows nothing of losses or tokenizers; batching is described by
//! explicit positions and an [`AttentionMask`] (padding and packing are segment ids).
//!
//! Training on the CPU in f32/f64 can skip candle's graph: [`Model::forward_traced`] keeps the
//! activations and [`Model::backward`] returns every parameter's gradient from the hidden
//! states' (the same values as candle's backward, bit for bit).
//!
//! Inference uses [`Model::detached`] (no graph is recorded) and a [`KvCache`]; see [`generate`].

mod attention;
mod backward;
mod chacha;
mod checkpoint;
mod config;
pub mod cpu;
mod dropout;
mod family;
mod gemma;
pub mod generate;
mod gpt;
mod hf;
mod kernels;
mod linear;
pub mod lora;
pub mod manifest;
pub mod math;
mod norm;
mod ops;
mod params;
pub mod presets;
mod qwen2;
#[cfg(test)]
mod testing;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, TensorId, Var};

use crate::backward::Grads;
pub use crate::config::ModelConfig;
use crate::family::Network;
pub use crate::gemma::GemmaConfig;
pub use crate::gpt::{GptConfig, GPT_MODEL_TYPE};
pub use crate::lora::LoraConfig;
pub use crate::ops::RopeScaling;
pub use crate::qwen2::Qwen2Config;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    #[error("{}: tensor {name} is missing", path.display())]
    MissingTensor { name: String, path: PathBuf },
    #[error("{}: unexpected tensor {name} (not a parameter of this model)", path.display())]
    UnexpectedTensor { name: String, path: PathBuf },
    #[error("{}: tensor {name} has shape {found:?}, the config implies {expected:?}", path.display())]
    ShapeMismatch {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A checkpoint whose manifest lists files that are not there (a save or a deletion that
    /// was cut short).
    #[error("{}: incomplete checkpoint: {what}", dir.display())]
    Incomplete { dir: PathBuf, what: String },
    #[error("unsupported dtype {dtype:?} (use f32, f64, bf16 or f16)")]
    UnsupportedDtype { dtype: DType },
    /// Arguments of a forward pass or of generation that the model cannot take.
    #[error("invalid model input: {reason}")]
    Input { reason: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn input_error<T>(reason: impl Into<String>) -> Result<T> {
    Err(Error::Input {
        reason: reason.into(),
    })
}

/// Which key positions each query may attend to.
#[derive(Debug, Clone, Copy)]
pub enum AttentionMask<'a> {
    /// Plain causal, no padding (every row full).
    Causal,
    /// (batch, seq) u32 segment ids: query q may attend key k iff `k <= q && seg[q] == seg[k] &&
    /// seg[q] != 0`. Right padding is segment 0; packed samples are segments 1, 2, 3, ... of a
    /// row, with positions restarting per sample (given by the caller). A padding query attends
    /// nothing; its outputs are finite and meaningless.
    Segments(&'a Tensor),
}

/// Weights by name, for assembling a network from its parameter list.
pub(crate) struct Weights {
    map: HashMap<String, Tensor>,
    /// LoRA's (scale, dropout) when the map holds adapters (`<module>.lora_A.weight`, ...).
    lora: Option<(f64, f64)>,
}

impl Weights {
    /// Every name comes from `params::param_specs`, so a miss is a bug in this crate.
    fn get(&self, name: &str) -> Tensor {
        match self.map.get(name) {
            Some(t) => t.clone(),
            None => panic!("parameter {name} is not in the parameter list"),
        }
    }

    fn maybe(&self, name: &str) -> Option<Tensor> {
        self.map.get(name).cloned()
    }

    /// The adapter of the linear module `name`, when it has one.
    fn adapter(&self, name: &str) -> Option<ops::Adapter> {
        let (scale, dropout) = self.lora?;
        let a = self.maybe(&lora::a_name(name))?;
        let b = self.get(&lora::b_name(name));
        Some(ops::Adapter::new(name, a, b, scale, dropout))
    }
}

/// The keys and values one layer has seen so far, (batch, kv_heads, len, head_dim) each.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerKv {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerKv {
    /// Positions cached so far.
    fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// Appends this step's keys and values; returns the whole sequence's.
    fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let kv = match self.kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        self.kv = Some(kv.clone());
        Ok(kv)
    }
}

/// Keys and values of every layer for incremental decoding ([`Model::forward_cached`]). All rows
/// of a batch share one length.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
}

impl KvCache {
    /// Tokens cached so far: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| l.kv = None);
        self.len = 0;
    }
}

/// A trainable causal LM: config, named parameters, and the network built on them. Not `Clone`:
/// a copy would share the trainable storage; [`Model::detached`] is the explicit way to do that.
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    /// The trainable tensors (all of them without LoRA).
    params: Vec<(String, Var)>,
    /// Base tensors that LoRA training leaves as they are.
    frozen: Vec<(String, Var)>,
    lora: Option<Adapters>,
    net: Box<dyn Network>,
    /// The network over detached copies of the weights (same storage, no graph), for
    /// [`Model::forward_traced`]; `slots` maps each of those tensors to its `params` index, and
    /// a frozen one to `None`.
    plain: Box<dyn Network>,
    slots: HashMap<TensorId, Option<usize>>,
    dtype: DType,
    device: Device,
}

/// A model's tensors, split into trainable and frozen, and its adapters.
pub(crate) struct Parts {
    params: Vec<(String, Var)>,
    frozen: Vec<(String, Var)>,
    lora: Option<Adapters>,
}

impl Parts {
    /// Every tensor trainable, no adapters: full fine-tuning.
    pub(crate) fn full(params: Vec<(String, Var)>) -> Parts {
        Parts {
            params,
            frozen: Vec::new(),
            lora: None,
        }
    }
}

/// A model's LoRA settings and what they adapt.
#[derive(Debug, Clone)]
pub(crate) struct Adapters {
    config: LoraConfig,
    plan: lora::Plan,
}

/// The activations a training forward pass keeps for [`Model::backward`].
pub struct Trace(Box<dyn std::any::Any>);

impl Model {
    /// A fresh model: Normal(0, initializer_range) Linear and Embedding weights (nanoGPT's
    /// smaller residual projections for GPT), zero biases, unit norm gains. Each tensor's values
    /// depend only on `seed` and its name.
    pub fn init(cfg: &ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Model> {
        check_dtype(dtype)?;
        let specs = cfg.param_specs();
        let params = params::init_params(&specs, seed, dtype, device)?;
        Model::assemble(cfg.clone(), Parts::full(params), dtype, device, false, None)
    }

    /// Builds the network on `parts`; `detached` builds it on graph-free views of them. Frozen
    /// tensors are always detached, so candle's backward does not reach them either.
    fn assemble(
        cfg: ModelConfig,
        parts: Parts,
        dtype: DType,
        device: &Device,
        detached: bool,
        like: Option<&dyn Network>,
    ) -> Result<Model> {
        let Parts {
            params,
            frozen,
            lora,
        } = parts;
        let lora_weights = lora.as_ref().map(|l| (l.config.scale(), l.config.dropout));
        let weights = |detach: bool| Weights {
            map: params
                .iter()
                .map(|(n, v)| {
                    let t = match detach {
                        true => v.as_detached_tensor(),
                        false => v.as_tensor().clone(),
                    };
                    (n.clone(), t)
                })
                .chain(
                    frozen
                        .iter()
                        .map(|(n, v)| (n.clone(), v.as_detached_tensor())),
                )
                .collect(),
            lora: lora_weights,
        };
        // `like`: the same network on other views (its tables are reused); else a fresh one.
        let build = |w: &Weights| match like {
            Some(n) => Ok(n.rebuild(w)),
            None => cfg.family().network(w, device),
        };
        let plain_weights = weights(true);
        let index: HashMap<&str, usize> = params
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.as_str(), i))
            .collect();
        let slots = plain_weights
            .map
            .iter()
            .map(|(n, t)| (t.id(), index.get(n.as_str()).copied()))
            .collect();
        let net = build(&weights(detached))?;
        let plain = net.rebuild(&plain_weights);
        Ok(Model {
            cfg,
            params,
            frozen,
            lora,
            net,
            plain,
            slots,
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Every trainable tensor exactly once, under its Hugging Face name, in construction order:
    /// embeddings, layers in order, final norm, `lm_head.weight` when untied. With LoRA: the
    /// adapters (`<module>.lora_A.weight`, `.lora_B.weight`) and the `modules_to_save` tensors.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The base tensors LoRA training leaves unchanged (empty without LoRA).
    pub fn frozen(&self) -> &[(String, Var)] {
        &self.frozen
    }

    /// The LoRA settings when the model carries adapters.
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.lora.as_ref().map(|l| &l.config)
    }

    /// The index in [`Model::params`] of a trainable tensor (by identity), `None` for a frozen
    /// one or a tensor of another model.
    pub fn param_index(&self, t: &Tensor) -> Option<usize> {
        self.params
            .iter()
            .position(|(_, v)| v.as_tensor().id() == t.id())
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// (vocab, hidden): the embedding when tied, else `lm_head.weight`. The head has no bias.
    pub fn lm_head_weight(&self) -> &Tensor {
        self.net.lm_head()
    }

    /// A copy whose weights share storage with the trainable ones but record no gradient graph:
    /// for evaluation and generation. It sees optimizer updates made in place.
    pub fn detached(&self) -> Model {
        Model::assemble(
            self.cfg.clone(),
            self.parts(),
            self.dtype,
            &self.device,
            true,
            Some(self.net.as_ref()),
        )
        .expect("re-assembling an existing model cannot fail")
    }

    /// The model's tensors (shared storage) and adapters, to re-assemble it.
    fn parts(&self) -> Parts {
        Parts {
            params: self.params.clone(),
            frozen: self.frozen.clone(),
            lora: self.lora.clone(),
        }
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![LayerKv::default(); self.cfg.num_layers()],
            len: 0,
        }
    }

    /// Logits (batch, seq, vocab) in f32 for `input_ids` (batch, seq) u32 at `positions`
    /// (batch, seq) u32. `dropout_seed: None` is evaluation; `Some(seed)` is training mode, with
    /// dropout masks drawn from `seed` (only the GPT has dropout).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &AttentionMask<'_>,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, positions, mask, dropout_seed)?;
        self.logits(&hidden)
    }

    /// Hidden states after the final norm, (batch, seq, hidden) in the model dtype; `forward` is
    /// the head applied to them.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &AttentionMask<'_>,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let mask = self.mask(input_ids, positions, mask)?;
        self.net
            .forward_hidden(input_ids, positions, Some(&mask), None, dropout_seed)
    }

    /// [`Model::forward_hidden`] for training with the model's own backward pass
    /// ([`Model::backward`]): the hidden states (no graph) and the activations backward needs.
    /// `None` where that pass does not run (half precision, other devices: they train through
    /// candle's backward of `forward_hidden`).
    pub fn forward_traced(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &AttentionMask<'_>,
        dropout_seed: Option<u64>,
    ) -> Result<Option<(Tensor, Trace)>> {
        if !self.device.is_cpu() || !matches!(self.dtype, DType::F32 | DType::F64) {
            return Ok(None);
        }
        let mask = self.mask(input_ids, positions, mask)?;
        if !mask.fits_fused() {
            return Ok(None);
        }
        let traced = self
            .plain
            .forward_traced(input_ids, positions, &mask, dropout_seed)?;
        Ok(traced.map(|(h, tr)| (h, Trace(tr))))
    }

    /// The gradients of `sum(hidden * grad_hidden)` for the hidden states (batch, seq, hidden)
    /// of the [`Model::forward_traced`] call that returned `trace`, one entry per
    /// [`Model::params`] entry, each added to its entry of `seeds` where that has one (`seeds`
    /// is empty or one entry per parameter). A seeded embedding table has its looked-up rows
    /// added in place, so a seed must be a tensor nothing else reads: the trainer seeds a tied
    /// output layer with the loss's gradient of it. Unseeded, the gradients equal candle's
    /// backward through `forward_hidden` bit for bit; seeded, `seed + that`.
    pub fn backward(
        &self,
        trace: Trace,
        grad_hidden: &Tensor,
        mut seeds: Vec<Option<Tensor>>,
    ) -> Result<Vec<Option<Tensor>>> {
        if seeds.is_empty() {
            seeds = vec![None; self.params.len()];
        } else if seeds.len() != self.params.len() {
            return input_error(format!(
                "backward: {} seeds for {} parameters",
                seeds.len(),
                self.params.len()
            ));
        }
        let mut grads = Grads::new(&self.slots, seeds);
        self.plain.backward(trace.0, grad_hidden, &mut grads)?;
        Ok(grads.into_vec())
    }

    /// The attention mask for a batch of `input_ids`, after checking the batch's shapes and
    /// ranges.
    fn mask(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &AttentionMask<'_>,
    ) -> Result<ops::Mask> {
        let (b, t) = self.check_ids(input_ids)?;
        if positions.dims() != [b, t] || positions.dtype() != DType::U32 {
            return input_error(format!(
                "positions must be ({b}, {t}) u32 like input_ids, got {:?} {:?}",
                positions.dims(),
                positions.dtype()
            ));
        }
        let max_pos = positions.max_all()?.to_scalar::<u32>()? as usize;
        if max_pos >= self.cfg.max_positions() {
            return input_error(format!(
                "position {max_pos} is beyond the model's {} positions",
                self.cfg.max_positions()
            ));
        }
        let mut mask = match mask {
            AttentionMask::Causal => ops::causal_mask(t, 0, self.dtype, &self.device)?,
            AttentionMask::Segments(seg) => {
                if seg.dims() != [b, t] {
                    return input_error(format!(
                        "segment ids are {:?}, input_ids ({b}, {t})",
                        seg.dims()
                    ));
                }
                ops::segment_mask(seg, self.dtype)?
            }
        };
        if let Some(w) = self.cfg.family().sliding_window() {
            mask = ops::slide(&mask, w, 0)?;
        }
        ops::Mask::new(mask)
    }

    /// Incremental decoding: `input_ids` (batch, t_new) continue the cached sequence at
    /// positions `cache.len()..`; returns their logits (batch, t_new, vocab) in f32 and appends
    /// their keys and values to `cache`. Equal to the matching rows of a full `forward`.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let hidden = self.forward_cached_hidden(input_ids, cache)?;
        self.logits(&hidden)
    }

    /// [`Model::forward_cached`] before the head: generation applies the head to the last
    /// position only (a long prompt's logits would cost seq x vocab floats).
    pub(crate) fn forward_cached_hidden(
        &self,
        input_ids: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t) = self.check_ids(input_ids)?;
        if cache.layers.len() != self.cfg.num_layers() {
            return input_error("the cache belongs to a model with another number of layers");
        }
        let start = cache.len;
        if start + t > self.cfg.max_positions() {
            return input_error(format!(
                "positions {start}..{} are beyond the model's {} positions",
                start + t,
                self.cfg.max_positions()
            ));
        }
        let pos: Vec<u32> = (0..b)
            .flat_map(|_| (start..start + t).map(|p| p as u32))
            .collect();
        let positions = Tensor::from_vec(pos, (b, t), &self.device)?;
        // A single new token may attend every cached key (within a sliding window): no mask
        // needed.
        let window = self.cfg.family().sliding_window();
        let mask = match (t, window) {
            (1, None) => None,
            (1, Some(w)) if start < w => None,
            _ => {
                let mut m = ops::causal_mask(t, start, self.dtype, &self.device)?;
                if let Some(w) = window {
                    m = ops::slide(&m, w, start)?;
                }
                Some(ops::Mask::new(m)?)
            }
        };
        let hidden = self.net.forward_hidden(
            input_ids,
            &positions,
            mask.as_ref(),
            Some(cache.layers.as_mut_slice()),
            None,
        )?;
        cache.len += t;
        Ok(hidden)
    }

    pub(crate) fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = ops::linear(hidden, self.lm_head_weight(), None)?.to_dtype(DType::F32)?;
        Ok(match self.logit_softcap() {
            Some(c) => (logits / c)?.tanh()?.affine(c, 0.0)?,
            None => logits,
        })
    }

    /// The logits are `c tanh(z / c)` of the head's output `z` (Gemma 2's
    /// `final_logit_softcapping`): a loss that applies the head itself must apply this too.
    pub fn logit_softcap(&self) -> Option<f64> {
        self.cfg.family().final_logit_softcap()
    }

    fn check_ids(&self, ids: &Tensor) -> Result<(usize, usize)> {
        let (b, t) = match ids.dims() {
            &[b, t] if b > 0 && t > 0 => (b, t),
            d => {
                return input_error(format!(
                    "input_ids must be (batch, seq) and non-empty, got {d:?}"
                ))
            }
        };
        if ids.dtype() != DType::U32 {
            return input_error(format!("input_ids must be u32, got {:?}", ids.dtype()));
        }
        let max_id = ids.max_all()?.to_scalar::<u32>()? as usize;
        if max_id >= self.cfg.vocab_size() {
            return input_error(format!(
                "token id {max_id} is outside the vocabulary ({})",
                self.cfg.vocab_size()
            ));
        }
        Ok((b, t))
    }
}

/// The gradients of `y = x w^T` (an output layer over rows `x`) from `grad` = dL/dy: the input's
/// `grad w`, and the weight's `grad^T x`, which is added in place into `into` when given (the
/// weight's gradient from earlier chunks of rows: a tensor nothing else reads) and returned as
/// that tensor, else written into a buffer of its own. Through the dense layer's backward and
/// `gemm`; `None` where that does not run (not CPU f32/f64, mixed dtypes or shapes): the caller
/// takes candle's matmul then.
pub fn linear_grads(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    into: Option<&Tensor>,
) -> Result<Option<(Tensor, Tensor)>> {
    let same = |t: &Tensor| t.dtype() == x.dtype();
    let dims = match (x.dims(), w.dims(), grad.dims()) {
        (&[n, h], &[v, h2], &[n2, v2]) => {
            h == h2 && n == n2 && v == v2 && into.is_none_or(|a| a.dims() == [v, h])
        }
        _ => false,
    };
    if !kernels::fusable(x) || !same(w) || !same(grad) || !into.is_none_or(same) || !dims {
        return Ok(None);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match into {
        None => {
            let (dx, dw, _) = linear::dense_backward(&x, &w, None, grad)?;
            Ok(Some((dx, dw)))
        }
        Some(acc) => {
            let dx = linear::dense_input_grad(&w, grad)?;
            linear::add_weight_grad(acc, grad, &x)?;
            Ok(Some((dx, acc.clone())))
        }
    }
}

/// The input gradient `grad w` of `y = x w^T` alone (a frozen output layer), through `gemm`;
/// `None` where that does not run (not CPU f32/f64, mixed dtypes or shapes).
pub fn linear_input_grad(w: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
    let fits = matches!((w.dims(), grad.dims()), (&[v, _], &[_, v2]) if v == v2);
    if !kernels::fusable(grad) || w.dtype() != grad.dtype() || !fits {
        return Ok(None);
    }
    Ok(Some(linear::dense_input_grad(&w.contiguous()?, grad)?))
}

fn check_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F64 | DType::BF16 | DType::F16 => Ok(()),
        other => Err(Error::UnsupportedDtype { dtype: other }),
    }
}

/// The dtype name `transformers` writes in `config.json`.
pub(crate) fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::F64 => "float64",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "unsupported",
    }
}
