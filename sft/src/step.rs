//! One micro-batch: forward, masked loss, backward, gradient accumulation; and the same forward
//! without gradients for evaluation.
//!
//! The loss is `sum over target tokens of -log p / n_step_targets`, where `n_step_targets` counts
//! the targets of every micro-batch of the optimizer step: the caller passes `1 / n_step_targets`
//! as `scale`. Gradients therefore do not depend on how a step's samples are split into
//! micro-batches or packed into rows.

use candle_core::{Device, Tensor};
use sft_data::{Batch, IGNORE_INDEX};
use sft_model::{AttentionMask, Model, Trace};

use crate::error::Result;
use crate::kernels::accumulate;
use crate::loss::{linear_cross_entropy, CeOutput, DEFAULT_CHUNK_ELEMS};

/// Loss statistics of a micro-batch or an evaluation pass.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossStats {
    pub loss_sum: f64,
    pub n_targets: usize,
    pub n_correct: usize,
}

impl LossStats {
    pub fn add(&mut self, other: LossStats) {
        self.loss_sum += other.loss_sum;
        self.n_targets += other.n_targets;
        self.n_correct += other.n_correct;
    }

    /// Mean loss per target token (NaN when there were no targets).
    pub fn mean(&self) -> f64 {
        self.loss_sum / self.n_targets as f64
    }

    pub fn accuracy(&self) -> f64 {
        self.n_correct as f64 / self.n_targets as f64
    }
}

/// The batch as model inputs, plus the flat indices and ids of its target positions.
struct Inputs {
    ids: Tensor,
    positions: Tensor,
    segments: Option<Tensor>,
    rows: Tensor,
    targets: Vec<u32>,
}

fn inputs(batch: &Batch, device: &Device) -> Result<Inputs> {
    let shape = (batch.batch_size, batch.seq_len);
    let ids = Tensor::from_slice(&batch.input_ids, shape, device)?;
    let positions = Tensor::from_slice(&batch.positions, shape, device)?;
    // Rows that are one full sample each need only the causal mask.
    let segments = if batch.segment_ids.iter().all(|&s| s == 1) {
        None
    } else {
        Some(Tensor::from_slice(&batch.segment_ids, shape, device)?)
    };
    let mut rows = Vec::with_capacity(batch.n_targets);
    let mut targets = Vec::with_capacity(batch.n_targets);
    for (i, &l) in batch.labels.iter().enumerate() {
        if l != IGNORE_INDEX {
            rows.push(i as u32);
            targets.push(l as u32);
        }
    }
    let rows = Tensor::from_vec(rows, targets.len(), device)?;
    Ok(Inputs {
        ids,
        positions,
        segments,
        rows,
        targets,
    })
}

/// Gradients summed over the micro-batches of an optimizer step, one slot per `model.params()`
/// entry. The first gradient of a slot is kept as the backward pass produced it (no copy: with
/// one micro-batch per step nothing is ever copied); it is copied before the first in-place
/// addition, because candle may hand the same gradient tensor to several graph nodes.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    slots: Vec<Option<(Tensor, bool)>>,
}

impl GradAccumulator {
    pub fn new(n_params: usize) -> GradAccumulator {
        GradAccumulator {
            slots: vec![None; n_params],
        }
    }

    fn add(&mut self, i: usize, g: &Tensor) -> Result<()> {
        match &mut self.slots[i] {
            None => self.slots[i] = Some((g.clone(), false)),
            Some((t, owned)) => {
                if !*owned {
                    *t = t.to_dtype(candle_core::DType::F32)?.copy()?;
                    *owned = true;
                }
                accumulate(t, &g.to_dtype(candle_core::DType::F32)?)?;
            }
        }
        Ok(())
    }

    /// Whether slot `i` has no gradient yet this step.
    fn is_vacant(&self, i: usize) -> bool {
        self.slots[i].is_none()
    }

    /// Starts slot `i` with an f32 tensor that nothing else refers to, so later gradients are
    /// added into it in place without a copy.
    fn start_owned(&mut self, i: usize, g: Tensor) {
        debug_assert!(self.is_vacant(i) && g.dtype() == candle_core::DType::F32);
        self.slots[i] = Some((g, true));
    }

    /// The summed gradients, leaving the accumulator empty for the next step.
    pub fn take(&mut self) -> Vec<Option<Tensor>> {
        self.slots
            .iter_mut()
            .map(|s| s.take().map(|(t, _)| t))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }
}

/// The forward half of a micro-batch: hidden states at the target positions and the loss with
/// its gradients at the output layer.
pub struct ForwardLoss {
    selected: Tensor,
    ce: CeOutput,
    /// The model's own backward pass where it runs (CPU f32), else candle's through `selected`.
    own: Option<OwnBackward>,
}

/// What the model's own backward pass needs: its trace, and where the target rows sit among the
/// batch's (b * t) rows of hidden states (b, t, width).
struct OwnBackward {
    trace: Trace,
    rows: Tensor,
    dims: (usize, usize, usize),
}

impl ForwardLoss {
    pub fn stats(&self) -> LossStats {
        LossStats {
            loss_sum: self.ce.loss_sum,
            n_targets: self.ce.n_targets,
            n_correct: self.ce.n_correct,
        }
    }
}

/// Forward pass and masked loss of one micro-batch, with gradients of `scale * loss_sum`.
/// `None` when the batch has no target (nothing to learn, nothing computed).
pub fn forward_loss(
    model: &Model,
    batch: &Batch,
    scale: f64,
    dropout_seed: Option<u64>,
) -> Result<Option<ForwardLoss>> {
    Ok(target_loss(model, batch, Some(scale), dropout_seed)?
        .map(|(selected, ce, own)| ForwardLoss { selected, ce, own }))
}

/// The model body, then the head and cross-entropy at the target rows only: the hidden states
/// of those rows and the loss (with head and hidden gradients of `scale * loss_sum` when `scale`
/// is given, and then the model's own backward pass where it runs). `None` when the batch has no
/// target.
fn target_loss(
    model: &Model,
    batch: &Batch,
    scale: Option<f64>,
    dropout_seed: Option<u64>,
) -> Result<Option<(Tensor, CeOutput, Option<OwnBackward>)>> {
    let inp = inputs(batch, model.device())?;
    if inp.targets.is_empty() {
        return Ok(None);
    }
    let mask = match &inp.segments {
        Some(s) => AttentionMask::Segments(s),
        None => AttentionMask::Causal,
    };
    let traced = match scale {
        Some(_) => model.forward_traced(&inp.ids, &inp.positions, &mask, dropout_seed)?,
        None => None,
    };
    let (hidden, trace) = match traced {
        Some((hidden, trace)) => (hidden, Some(trace)),
        None => (
            model.forward_hidden(&inp.ids, &inp.positions, &mask, dropout_seed)?,
            None,
        ),
    };
    let width = hidden.dim(2)?;
    let selected = hidden
        .reshape((batch.batch_size * batch.seq_len, width))?
        .index_select(&inp.rows, 0)?;
    let head_grad = model.head_index().is_some();
    let ce = linear_cross_entropy(
        &selected,
        model.lm_head_weight(),
        &inp.targets,
        scale,
        head_grad,
        model.logit_softcap(),
        DEFAULT_CHUNK_ELEMS,
    )?;
    let own = trace.map(|trace| OwnBackward {
        trace,
        rows: inp.rows,
        dims: (batch.batch_size, batch.seq_len, width),
    });
    Ok(Some((selected, ce, own)))
}

/// The backward half: gradients of every parameter, added into `acc`.
pub fn backward(model: &Model, f: ForwardLoss, acc: &mut GradAccumulator) -> Result<()> {
    let ForwardLoss {
        selected,
        mut ce,
        own,
    } = f;
    let grad_hidden = ce
        .grad_hidden
        .take()
        .expect("asked for gradients")
        .to_dtype(selected.dtype())?;
    // A frozen output layer (LoRA) has no slot and no gradient.
    let head_i = model.head_index();
    let mut head = ce.grad_head.take();
    let body = match own {
        Some(OwnBackward { trace, rows, dims }) => {
            // The target rows' gradients in place among all rows (zero elsewhere), as candle's
            // backward of the row selection writes them.
            let all = Tensor::zeros(
                (dims.0 * dims.1, dims.2),
                grad_hidden.dtype(),
                model.device(),
            )?
            .index_add(&rows, &grad_hidden, 0)?
            .reshape(dims)?;
            // The loss's gradient of the output layer is an f32 tensor of this step alone: on a
            // step's first micro-batch it seeds the layer's slot, and a tied embedding's rows
            // are added into it in place (no vocab x hidden buffer for the embedding's own).
            let mut seeds = vec![None; model.params().len()];
            if let Some(i) = head_i.filter(|&i| acc.is_vacant(i)) {
                seeds[i] = head.take();
            }
            model.backward(trace, &all, seeds)?
        }
        None => {
            // d/dθ sum(selected * g) = g · d selected/dθ: the chain rule through the model body.
            let grads = (&selected * grad_hidden)?.sum_all()?.backward()?;
            let params = model.params().iter();
            params
                .map(|(_, v)| grads.get(v.as_tensor()).cloned())
                .collect()
        }
    };
    for (i, graph) in body.into_iter().enumerate() {
        if Some(i) != head_i {
            if let Some(g) = graph {
                acc.add(i, &g)?;
            }
            continue;
        }
        match head.take() {
            // The seed came back with the embedding's gradient added: head + embedding.
            None => acc.start_owned(i, graph.expect("a seeded slot has a gradient")),
            // The same sum in the same order where the two come separately: head + embedding
            // on a step's first micro-batch (a + b == b + a, bit for bit), else
            // (acc + embedding) + head.
            Some(head) if acc.is_vacant(i) => {
                acc.start_owned(i, head);
                if let Some(g) = graph {
                    acc.add(i, &g)?;
                }
            }
            Some(head) => {
                if let Some(g) = graph {
                    acc.add(i, &g)?;
                }
                acc.add(i, &head)?;
            }
        }
    }
    Ok(())
}

/// Forward and backward on one micro-batch, adding its gradients (of `scale * loss_sum`) into
/// `acc`. A micro-batch without targets contributes nothing: no forward, no NaN.
pub fn accumulate_micro_batch(
    model: &Model,
    batch: &Batch,
    scale: f64,
    dropout_seed: Option<u64>,
    acc: &mut GradAccumulator,
) -> Result<LossStats> {
    match forward_loss(model, batch, scale, dropout_seed)? {
        None => Ok(LossStats::default()),
        Some(f) => {
            let stats = f.stats();
            backward(model, f, acc)?;
            Ok(stats)
        }
    }
}

/// Loss and token accuracy of a batch, without building a gradient graph (`model` should be
/// `Model::detached`).
pub fn evaluate_batch(model: &Model, batch: &Batch) -> Result<LossStats> {
    let Some((_, ce, _)) = target_loss(model, batch, None, None)? else {
        return Ok(LossStats::default());
    };
    Ok(LossStats {
        loss_sum: ce.loss_sum,
        n_targets: ce.n_targets,
        n_correct: ce.n_correct,
    })
}
