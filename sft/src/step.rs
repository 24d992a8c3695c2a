//! One micro-batch: forward, masked loss, backward, gradient accumulation; and the same forward
//! without gradients for evaluation.
//!
//! The loss is `sum over target tokens of -log p / n_step_targets`, where `n_step_targets` counts
//! the targets of every micro-batch of the optimizer step: the caller passes `1 / n_step_targets`
//! as `scale`. Gradients therefore do not depend on how a step's samples are split into
//! micro-batches or packed into rows.

use candle_core::{Device, Tensor};
use sft_data::{Batch, IGNORE_INDEX};
use sft_model::{AttentionMask, Model};

use crate::kernels::accumulate;
use crate::loss::{linear_cross_entropy, DEFAULT_CHUNK_ELEMS};
use crate::Result;

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

/// Runs forward and backward on one micro-batch and adds its gradients (of `scale * loss_sum`)
/// into `acc`, one slot per `model.params()` entry. A micro-batch without targets contributes
/// nothing: no forward, no NaN.
pub fn accumulate_micro_batch(
    model: &Model,
    batch: &Batch,
    scale: f64,
    dropout_seed: Option<u64>,
    acc: &mut [Option<Tensor>],
) -> Result<LossStats> {
    let inp = inputs(batch, model.device())?;
    if inp.targets.is_empty() {
        return Ok(LossStats::default());
    }
    let mask = match &inp.segments {
        Some(s) => AttentionMask::Segments(s),
        None => AttentionMask::Causal,
    };
    let hidden = model.forward_hidden(&inp.ids, &inp.positions, &mask, dropout_seed)?;
    let width = hidden.dim(2)?;
    let selected = hidden
        .reshape((batch.batch_size * batch.seq_len, width))?
        .index_select(&inp.rows, 0)?;
    let ce = linear_cross_entropy(
        &selected,
        model.lm_head_weight(),
        &inp.targets,
        Some(scale),
        DEFAULT_CHUNK_ELEMS,
    )?;
    let grad_hidden = ce
        .grad_hidden
        .expect("asked for gradients")
        .to_dtype(selected.dtype())?;
    // d/dθ sum(selected * g) = g · d selected/dθ: the chain rule through the model body.
    let surrogate = (&selected * grad_hidden)?.sum_all()?;
    let grads = surrogate.backward()?;
    let head_id = model.lm_head_weight().id();
    for ((_, var), slot) in model.params().iter().zip(acc.iter_mut()) {
        let t = var.as_tensor();
        let mut add = |g: &Tensor| -> Result<()> {
            match slot {
                Some(a) => accumulate(a, g)?,
                None => *slot = Some(g.to_dtype(candle_core::DType::F32)?.copy()?),
            }
            Ok(())
        };
        if let Some(g) = grads.get(t) {
            add(g)?;
        }
        if t.id() == head_id {
            add(ce.grad_head.as_ref().expect("asked for gradients"))?;
        }
    }
    Ok(LossStats {
        loss_sum: ce.loss_sum,
        n_targets: ce.n_targets,
        n_correct: ce.n_correct,
    })
}

/// Loss and token accuracy of a batch, without building a gradient graph (`model` should be
/// `Model::detached`).
pub fn evaluate_batch(model: &Model, batch: &Batch) -> Result<LossStats> {
    let inp = inputs(batch, model.device())?;
    if inp.targets.is_empty() {
        return Ok(LossStats::default());
    }
    let mask = match &inp.segments {
        Some(s) => AttentionMask::Segments(s),
        None => AttentionMask::Causal,
    };
    let hidden = model.forward_hidden(&inp.ids, &inp.positions, &mask, None)?;
    let width = hidden.dim(2)?;
    let selected = hidden
        .reshape((batch.batch_size * batch.seq_len, width))?
        .index_select(&inp.rows, 0)?;
    let ce = linear_cross_entropy(
        &selected,
        model.lm_head_weight(),
        &inp.targets,
        None,
        DEFAULT_CHUNK_ELEMS,
    )?;
    Ok(LossStats {
        loss_sum: ce.loss_sum,
        n_targets: ce.n_targets,
        n_correct: ce.n_correct,
    })
}
