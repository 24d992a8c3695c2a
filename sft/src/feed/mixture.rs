//! `data.train`'s mixture: which samples of each source an epoch trains on.

use serde::Serialize;
use sft_data::{mixture_epoch, Prepared, ReadOutcome, Share};

use crate::config::{DataSource, TrainConfig};
use crate::error::Result;

/// `data.train`'s mixture: each record's source and each source's share. `None` when every
/// source is taken whole (plain concatenation, the epoch is the data itself).
pub(super) struct Mixture {
    shares: Vec<Share>,
    names: Vec<String>,
    /// The source of each training record (by index into the records).
    source_of: Vec<usize>,
    /// `run.seed`: an epoch's draw is a function of it and the epoch.
    seed: u64,
}

impl Mixture {
    /// `source_of`: each training record's source (an index into `data.train`).
    pub(super) fn new(cfg: &TrainConfig, source_of: Vec<usize>) -> Option<Mixture> {
        let shares: Vec<Share> = cfg.data.train.iter().map(DataSource::share).collect();
        if shares.iter().all(|s| *s == Share::All) {
            return None;
        }
        Some(Mixture {
            shares,
            names: cfg.data.train.iter().map(DataSource::name).collect(),
            source_of,
            seed: cfg.run.seed,
        })
    }

    /// The epoch's samples, as indices into `data.samples`.
    pub(super) fn epoch(&self, data: &Prepared, epoch: u64) -> Result<Vec<usize>> {
        let mut per_source: Vec<(Vec<usize>, Share)> =
            self.shares.iter().map(|s| (vec![], *s)).collect();
        for (k, (record, _)) in data.samples.iter().enumerate() {
            per_source[self.source_of[*record]].0.push(k);
        }
        Ok(mixture_epoch(&per_source, self.seed, epoch)?)
    }

    /// Per source: records read, samples kept after rendering, and what epoch 0 draws of it.
    pub(super) fn report(
        &self,
        records: &ReadOutcome,
        data: &Prepared,
        view: &[usize],
    ) -> Vec<SourceReport> {
        let mut out: Vec<SourceReport> = self
            .names
            .iter()
            .zip(&self.shares)
            .map(|(name, share)| SourceReport {
                name: name.clone(),
                share: format!("{share:?}").to_lowercase(),
                records: 0,
                kept: 0,
                drawn: 0,
                tokens: 0,
                targets: 0,
                target_share: 0.0,
            })
            .collect();
        for (i, _) in records.records.iter().enumerate() {
            out[self.source_of[i]].records += 1;
        }
        for (record, _) in &data.samples {
            out[self.source_of[*record]].kept += 1;
        }
        for &k in view {
            let (record, r) = &data.samples[k];
            let s = &mut out[self.source_of[*record]];
            s.drawn += 1;
            s.tokens += r.len();
            s.targets += r.n_targets();
        }
        let total: usize = out.iter().map(|s| s.targets).sum();
        for s in &mut out {
            s.target_share = s.targets as f64 / total.max(1) as f64;
        }
        out
    }
}

/// One source of a mixture in the preflight report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceReport {
    pub name: String,
    /// `all`, `samples(N)` or `weight(w)`.
    pub share: String,
    pub records: usize,
    /// Samples that survived rendering.
    pub kept: usize,
    /// Samples epoch 0 trains on (with repeats).
    pub drawn: usize,
    pub tokens: usize,
    pub targets: usize,
    /// This source's share of epoch 0's target tokens.
    pub target_share: f64,
}
