//! [`Model`]: a model's config, its named parameters (trainable and frozen) and the network
//! built on them; the entry points of forward passes, the own backward pass and decoding.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, TensorId, Var};

use crate::backward::Grads;
use crate::config::ModelConfig;
use crate::error::{input_error, Error, Result};
use crate::family::{foreign_trace, Network};
use crate::kv::KvCache;
use crate::lora::{LoraConfig, Plan};
use crate::quant::{QWeight, Quantize};
use crate::weights::{Weight, Weights};
use crate::{ops, params, passes};

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

/// A trainable causal LM: config, named parameters, and the network built on them. Not `Clone`:
/// a copy would share the trainable storage; [`Model::detached`] is the explicit way to do that.
#[derive(Debug)]
pub struct Model {
    pub(crate) cfg: ModelConfig,
    /// The trainable tensors (all of them without LoRA).
    pub(crate) params: Vec<(String, Var)>,
    /// Base tensors that LoRA training leaves as they are.
    pub(crate) frozen: Vec<(String, Var)>,
    /// Frozen matrices kept as ggml blocks (a quantized base).
    pub(crate) quantized: Vec<(String, QWeight)>,
    pub(crate) lora: Option<Adapters>,
    net: Box<dyn Network>,
    /// The network over detached copies of the weights (same storage, no graph), for
    /// [`Model::forward_traced`]; `slots` maps each of those tensors to its `params` index, and
    /// a frozen one to `None`.
    plain: Box<dyn Network>,
    slots: HashMap<TensorId, Option<usize>>,
    /// Activation checkpointing in training passes.
    checkpointing: bool,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
}

/// A model's tensors, split into trainable and frozen, and its adapters.
pub(crate) struct Parts {
    pub(crate) params: Vec<(String, Var)>,
    pub(crate) frozen: Vec<(String, Var)>,
    pub(crate) quantized: Vec<(String, QWeight)>,
    pub(crate) lora: Option<Adapters>,
}

impl Parts {
    /// Every tensor trainable but those kept as blocks (frozen), no adapters.
    pub(crate) fn full(params: Vec<(String, Var)>, quantized: Vec<(String, QWeight)>) -> Parts {
        Parts {
            params,
            frozen: Vec::new(),
            quantized,
            lora: None,
        }
    }
}

/// A model's LoRA settings and what they adapt.
#[derive(Debug, Clone)]
pub(crate) struct Adapters {
    pub(crate) config: LoraConfig,
    pub(crate) plan: Plan,
}

/// The activations a training forward pass keeps for [`Model::backward`].
pub struct Trace(passes::Trace);

impl Model {
    /// A fresh model: Normal(0, initializer_range) Linear and Embedding weights (nanoGPT's
    /// smaller residual projections for GPT), zero biases, unit norm gains. Each tensor's values
    /// depend only on `seed` and its name.
    pub fn init(cfg: &ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Model> {
        check_dtype(dtype)?;
        let specs = cfg.param_specs();
        let params = params::init_params(&specs, seed, dtype, device)?;
        let parts = Parts::full(params, Vec::new());
        Model::assemble(cfg.clone(), parts, dtype, device, false, None)
    }

    /// [`Model::init`] keeping the tensors `quantize` names as ggml blocks, each quantized as
    /// it is drawn, so a model larger than memory in `dtype` never sits there whole (the same
    /// values as `init` then [`Model::quantized_with`]).
    pub fn init_with(
        cfg: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
        quantize: &Quantize,
    ) -> Result<Model> {
        check_dtype(dtype)?;
        let (mut params, mut quantized) = (Vec::new(), Vec::new());
        for spec in cfg.param_specs() {
            if let Some(t) = quantize.type_for(&spec.name, &spec.shape) {
                let (rows, cols) = (spec.shape[0], spec.shape[1]);
                let chunk = params::init_chunk_rows(cols);
                let q = QWeight::quantize_with(rows, cols, t, chunk, &|range, out| {
                    params::init_rows(&spec, seed, range, out);
                    Ok(())
                })?;
                quantized.push((spec.name.clone(), q));
                continue;
            }
            let one = params::init_params(std::slice::from_ref(&spec), seed, dtype, device)?;
            params.extend(one);
        }
        let parts = Parts::full(params, quantized);
        Model::assemble(cfg.clone(), parts, dtype, device, false, None)
    }

    /// Builds the network on `parts`; `detached` builds it on graph-free views of them. Frozen
    /// tensors are always detached, so candle's backward does not reach them either.
    pub(crate) fn assemble(
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
            quantized,
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
            quant: quantized.iter().cloned().collect(),
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
            quantized,
            lora,
            net,
            plain,
            slots,
            checkpointing: false,
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

    /// The base tensors LoRA training leaves unchanged (empty without LoRA), but those kept as
    /// blocks.
    pub fn frozen(&self) -> &[(String, Var)] {
        &self.frozen
    }

    /// The frozen matrices kept as ggml blocks (a quantized base).
    pub fn quantized(&self) -> &[(String, QWeight)] {
        &self.quantized
    }

    /// Scalars that training leaves as they are: [`Model::frozen`] and [`Model::quantized`].
    pub fn frozen_count(&self) -> usize {
        let dense: usize = self.frozen.iter().map(|(_, v)| v.elem_count()).sum();
        let blocks: usize = self.quantized.iter().map(|(_, q)| q.elem_count()).sum();
        dense + blocks
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
    pub fn lm_head_weight(&self) -> &Weight {
        self.net.lm_head()
    }

    /// The index in [`Model::params`] of the output head when it is trained.
    pub fn head_index(&self) -> Option<usize> {
        self.lm_head_weight()
            .dense()
            .and_then(|t| self.param_index(t))
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
            quantized: self.quantized.clone(),
            lora: self.lora.clone(),
        }
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_layers())
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
        let net = self.net.as_ref();
        passes::forward_hidden(net, input_ids, positions, Some(&mask), None, dropout_seed)
    }

    /// [`Model::forward_hidden`] for training with [`Model::backward`]: the hidden states (no
    /// graph) and what backward needs, the activations of every layer or, with activation
    /// checkpointing ([`Model::set_checkpointing`]), every layer's input. `None` where neither
    /// backward applies: the own backward does not run (half precision, other devices, Gemma
    /// 2's soft-capped attention) and nothing is checkpointed; training then goes through
    /// candle's backward of `forward_hidden`.
    pub fn forward_traced(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        mask: &AttentionMask<'_>,
        dropout_seed: Option<u64>,
    ) -> Result<Option<(Tensor, Trace)>> {
        let own = self.device.is_cpu() && matches!(self.dtype, DType::F32 | DType::F64);
        if !own && !self.checkpointing {
            return Ok(None);
        }
        let mask = self.mask(input_ids, positions, mask)?;
        let own = own && mask.fits_fused();
        let traced = passes::forward_traced(
            self.plain.as_ref(),
            input_ids,
            positions,
            &mask,
            dropout_seed,
            own,
            self.checkpointing,
        )?;
        Ok(traced.map(|(h, tr)| (h, Trace(tr))))
    }

    /// Whether [`Model::forward_traced`] keeps only each layer's input and backward recomputes
    /// the layer (activation checkpointing): the same gradients, bit for bit, for a fraction of
    /// the activations' memory and about a third more compute.
    pub fn set_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    pub fn checkpointing(&self) -> bool {
        self.checkpointing
    }

    /// The gradients of `sum(hidden * grad_hidden)` for the hidden states (batch, seq, hidden)
    /// of the [`Model::forward_traced`] call that returned `trace`, one entry per
    /// [`Model::params`] entry, each added to its entry of `seeds` where that has one (`seeds`
    /// is empty or one entry per parameter). A seeded embedding table has its looked-up rows
    /// added in place by the own backward, so a seed must be a tensor nothing else reads: the
    /// trainer seeds a tied output layer with the loss's gradient of it. Unseeded, the
    /// gradients equal candle's backward through `forward_hidden` bit for bit; seeded,
    /// `seed + that`.
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
        let trace = trace.0;
        if !trace.fits(self.plain.as_ref(), self.cfg.hidden_size()) {
            return foreign_trace();
        }
        if trace.through_graph() {
            let mut out = seeds;
            let mut put = |i: usize, g: Tensor| -> Result<()> {
                out[i] = Some(match out[i].take() {
                    None => g,
                    Some(prev) => (&prev + g.to_dtype(prev.dtype())?)?,
                });
                Ok(())
            };
            let net = self.net.as_ref();
            passes::backward_through_graph(net, trace, grad_hidden, &self.params, &mut put)?;
            return Ok(out);
        }
        let mut grads = Grads::new(&self.slots, seeds);
        passes::backward(self.plain.as_ref(), trace, grad_hidden, &mut grads)?;
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
        // A sliding window is the network's business: it narrows this mask on the layers that
        // slide.
        let mask = match mask {
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
        // A single new token may attend every cached key: no mask needed (a sliding window is
        // the network's to add).
        let mask = match t {
            1 => None,
            _ => Some(ops::Mask::new(ops::causal_mask(
                t,
                start,
                self.dtype,
                &self.device,
            )?)?),
        };
        let hidden = passes::forward_hidden(
            self.net.as_ref(),
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
        let logits =
            ops::linear_weight(hidden, self.lm_head_weight(), None)?.to_dtype(DType::F32)?;
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

pub(crate) fn check_dtype(dtype: DType) -> Result<()> {
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
