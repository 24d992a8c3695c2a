//! Rendered samples -> batches: the one-token shift, padding, packing, and the order in which an
//! epoch visits samples.
//!
//! A batch is `batch_size` rows of `seq_len` tokens, row-major. A row holds one sample (padding)
//! or several laid end to end (packing). Packed samples never see each other: `positions` restart
//! at 0 for every sample and `segment_ids` number the samples of a row (1, 2, ...; 0 on padding),
//! so the model can build a block-diagonal causal mask. Labels never cross a sample boundary: the
//! last token of each sample predicts nothing.
//!
//! The epoch plan is a pure function of (lengths, options, epoch): resuming at step `s` of an epoch
//! replays the same plan and skips `s` micro-batches, without touching the data.

use std::collections::BTreeSet;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::render::{mix, Rendered};
use crate::{Error, Result};

/// The label of a position that is not trained (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// A micro-batch, every field row-major with `batch_size * seq_len` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    /// The id to predict at each position, or [`IGNORE_INDEX`]; already shifted.
    pub labels: Vec<i64>,
    /// Position of each token within its own sample (restarts at 0 per packed sample; 0 on
    /// padding).
    pub positions: Vec<u32>,
    /// 1, 2, ... for the samples of a row; 0 on padding. Attention must stay within a segment.
    pub segment_ids: Vec<u32>,
    /// Labels that are not [`IGNORE_INDEX`]: the loss is summed over these and divided by their
    /// count over the whole optimizer step.
    pub n_targets: usize,
    /// Tokens that are not padding.
    pub n_tokens: usize,
}

/// The one place the one-token shift happens: `labels[i] = ids[i + 1]` if `loss_mask[i + 1]`,
/// else [`IGNORE_INDEX`]; the last position predicts nothing.
pub fn shift_labels(r: &Rendered) -> Vec<i64> {
    let ids = r.ids();
    let mask = r.loss_mask();
    let mut labels = Vec::with_capacity(ids.len());
    for i in 0..ids.len() {
        labels.push(match mask.get(i + 1) {
            Some(true) => i64::from(ids[i + 1]),
            _ => IGNORE_INDEX,
        });
    }
    labels
}

/// Lays out rows (each one or more samples end to end) as a batch, padded with `pad_id` to the
/// longest row, or to `pad_to` when that is longer. Labels are [`IGNORE_INDEX`] on padding.
pub fn collate(rows: &[Vec<&Rendered>], pad_id: u32, pad_to: Option<usize>) -> Batch {
    let longest = rows
        .iter()
        .map(|row| row.iter().map(|r| r.len()).sum::<usize>())
        .max()
        .unwrap_or(0);
    let seq_len = longest.max(pad_to.unwrap_or(0));
    let size = rows.len() * seq_len;
    let mut batch = Batch {
        batch_size: rows.len(),
        seq_len,
        input_ids: Vec::with_capacity(size),
        labels: Vec::with_capacity(size),
        positions: Vec::with_capacity(size),
        segment_ids: Vec::with_capacity(size),
        n_targets: 0,
        n_tokens: 0,
    };
    for row in rows {
        let mut used = 0;
        for (seg, r) in row.iter().enumerate() {
            let labels = shift_labels(r);
            batch.n_targets += labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
            batch.input_ids.extend_from_slice(r.ids());
            batch.labels.extend(labels);
            batch.positions.extend(0..r.len() as u32);
            batch
                .segment_ids
                .extend(std::iter::repeat_n(seg as u32 + 1, r.len()));
            used += r.len();
        }
        batch.n_tokens += used;
        let pad = seq_len - used;
        batch.input_ids.extend(std::iter::repeat_n(pad_id, pad));
        batch.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        batch.positions.extend(std::iter::repeat_n(0, pad));
        batch.segment_ids.extend(std::iter::repeat_n(0, pad));
    }
    batch
}

/// Best-fit-decreasing bin packing: items longest first (ties by index), each into the open bin
/// it fills most tightly, else a new bin. Returns item indices per bin, bins in creation order.
/// Deterministic. An item longer than `capacity` is an error: callers drop or truncate first.
pub fn pack_bins(lengths: &[usize], capacity: usize) -> Result<Vec<Vec<usize>>> {
    if capacity == 0 {
        return Err(Error::InvalidOption {
            reason: "pack length 0 holds nothing".into(),
        });
    }
    if let Some((index, &len)) = lengths.iter().enumerate().find(|(_, &l)| l > capacity) {
        return Err(Error::TooLongToPack {
            index,
            len,
            capacity,
        });
    }
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // (space left, bin index): the smallest space that still fits is the best fit.
    let mut open: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut left: Vec<usize> = Vec::new();
    for i in order {
        let len = lengths[i];
        match open.range((len, 0)..).next().copied() {
            Some((space, b)) => {
                open.remove(&(space, b));
                bins[b].push(i);
                left[b] = space - len;
                open.insert((left[b], b));
            }
            None => {
                let b = bins.len();
                bins.push(vec![i]);
                left.push(capacity - len);
                open.insert((capacity - len, b));
            }
        }
    }
    Ok(bins)
}

/// How an epoch is cut into micro-batches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPlanOptions {
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Pack several samples per row (up to `pack_len` tokens) instead of one per row.
    pub packing: bool,
    pub pack_len: usize,
    /// Without packing: order samples so that micro-batches hold similar lengths (Hugging Face's
    /// megabatches of 50 micro-batches, sorted by length, longest batch first). The megabatch size
    /// depends on `batch_size`, so this gives up the equivalence of batch 8 x accumulation 1 and
    /// batch 1 x accumulation 8. Ignored with packing, whose rows are near-equal already.
    pub group_by_length: bool,
    pub shuffle: bool,
    pub seed: u64,
    /// Leave out a last micro-batch with fewer than `batch_size` rows.
    pub drop_last: bool,
}

/// Stream tags, so the shuffles for order, rows and the split never share random numbers.
const TAG_ORDER: u64 = 1;
const TAG_SPLIT: u64 = 2;

/// The micro-batches of one epoch: micro-batch -> row -> sample indices (into `lengths`).
///
/// Without packing each row is one sample and consecutive micro-batches take consecutive samples
/// of the epoch order, so batch 8 x accumulation 1 and batch 1 x accumulation 8 see the same
/// samples per optimizer step. With packing: the epoch order, best-fit-decreasing into rows of
/// `pack_len`, rows shuffled, consecutive rows grouped. A pure function of its arguments.
pub fn plan_epoch(
    lengths: &[usize],
    opts: &BatchPlanOptions,
    epoch: u64,
) -> Result<Vec<Vec<Vec<usize>>>> {
    if opts.batch_size == 0 {
        return Err(Error::InvalidOption {
            reason: "batch_size = 0".into(),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(mix(&[opts.seed, epoch, TAG_ORDER]));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    if opts.shuffle {
        order.shuffle(&mut rng);
    }
    let rows: Vec<Vec<usize>> = if opts.packing {
        let ordered: Vec<usize> = order.iter().map(|&i| lengths[i]).collect();
        let bins = pack_bins(&ordered, opts.pack_len).map_err(|e| match e {
            Error::TooLongToPack {
                index,
                len,
                capacity,
            } => Error::TooLongToPack {
                index: order[index],
                len,
                capacity,
            },
            other => other,
        })?;
        let mut rows: Vec<Vec<usize>> = bins
            .into_iter()
            .map(|bin| bin.into_iter().map(|j| order[j]).collect())
            .collect();
        if opts.shuffle {
            rows.shuffle(&mut rng);
        }
        rows
    } else {
        if opts.group_by_length {
            order = length_grouped(order, lengths, opts.batch_size);
        }
        order.into_iter().map(|i| vec![i]).collect()
    };
    let mut batches: Vec<Vec<Vec<usize>>> =
        rows.chunks(opts.batch_size).map(<[_]>::to_vec).collect();
    if opts.drop_last && batches.last().is_some_and(|b| b.len() < opts.batch_size) {
        batches.pop();
    }
    Ok(batches)
}

/// Hugging Face's `get_length_grouped_indices`: megabatches of `50 * batch_size` samples of the
/// given order, each sorted longest first; the longest sample overall leads the epoch so an
/// out-of-memory shows at the first step.
fn length_grouped(order: Vec<usize>, lengths: &[usize], batch_size: usize) -> Vec<usize> {
    let mega = 50 * batch_size;
    let mut megabatches: Vec<Vec<usize>> = order
        .chunks(mega)
        .map(|c| {
            let mut c = c.to_vec();
            c.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            c
        })
        .collect();
    if let Some(max_mb) =
        (0..megabatches.len()).max_by_key(|&m| (lengths[megabatches[m][0]], std::cmp::Reverse(m)))
    {
        let first = megabatches[0][0];
        megabatches[0][0] = megabatches[max_mb][0];
        megabatches[max_mb][0] = first;
    }
    megabatches.concat()
}

/// A deterministic train/validation split of `0..n`: `round(n * val_ratio)` validation indices
/// (at least 1 when `val_ratio > 0` and `n >= 2`, and always at least 1 training index when
/// `n >= 1`), chosen by `seed`. Both lists are sorted. A ratio outside `[0, 1]` (or NaN) is
/// clamped into it; configs should reject it first.
pub fn split_train_val(n: usize, val_ratio: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let ratio = if val_ratio.is_nan() {
        0.0
    } else {
        val_ratio.clamp(0.0, 1.0)
    };
    let mut n_val = (n as f64 * ratio).round() as usize;
    if ratio > 0.0 && n >= 2 {
        n_val = n_val.max(1);
    }
    n_val = n_val.min(n.saturating_sub(1));
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(&[seed, TAG_SPLIT])));
    let mut val = perm[..n_val].to_vec();
    let mut train = perm[n_val..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    (train, val)
}
