//! A run's training data, step by step: [`Feed::next_step`] gives each optimizer step its
//! micro-batches, in one of two forms.
//!
//! - Planned: every record is read and rendered up front (once, or per epoch when poems draw
//!   their metadata anew), optionally through the disk cache (`data.cache`); each epoch (under a
//!   mixture, the samples it draws) is cut into micro-batches by `sft_data::plan_epoch`.
//! - Streamed (`data.streaming`): records are read, rendered and batched as the run goes, through
//!   a seeded shuffle buffer (`stream`).
//!
//! Both are pure functions of `run.seed`, the epoch and the data, so a resumed run continues
//! where the checkpoint stood ([`Feed::seek`]) without replaying any training. Reading the
//! records and holding validation records out is `read`; mixtures `mixture`; rendered epochs and
//! the disk cache `epochs` and `prepcache`.

mod epochs;
mod mixture;
mod prepcache;
mod read;
mod stream;

use std::path::{Path, PathBuf};

use sft_data::{
    collate, plan_epoch, Batch, BatchPlanOptions, Prepared, ReadOutcome, RenderOptions, Rendered,
    Report, Sample, Template,
};
use sft_tokenizer::Tokenizer;

use self::epochs::{prep_cache_key, EpochCache};
use self::mixture::Mixture;
use self::prepcache::PrepCache;
use self::stream::StreamFeed;
use crate::checkpoint;
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::setup;

pub use self::mixture::SourceReport;
pub(crate) use self::read::TrainData;
pub use self::read::{data_files, read_data, selection, source_selection};
pub use self::stream::StreamCounts;

/// Which of each step's micro-batches this process trains on. Under data parallelism a step has
/// `ranks x train.grad_accum` micro-batches, planned as one process would plan them with that
/// accumulation, and rank `r` takes the `r`-th run of `grad_accum` of them: the same samples,
/// rows and dropout seeds as the one process, split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub rank: usize,
    pub ranks: usize,
}

impl Share {
    /// This rank's micro-batches among a step's `n`, at most `accum` of them (empty when the
    /// step, at an epoch's end, has fewer).
    fn range(self, n: usize, accum: usize) -> std::ops::Range<usize> {
        (self.rank * accum).min(n)..((self.rank + 1) * accum).min(n)
    }
}

/// One optimizer step's data, and where the epoch stands after it.
pub(crate) struct Step {
    /// This rank's micro-batches of the step (fewer than `train.grad_accum` at the end of an
    /// epoch; all of the step's in one process).
    pub(crate) batches: Vec<Batch>,
    /// The index of `batches[0]` among the step's micro-batches (what its dropout seed counts).
    pub(crate) first: usize,
    /// Samples in the whole step (every rank's micro-batches).
    pub(crate) samples: usize,
    /// The fractional epoch reached, for the log: the epoch plus the share of it done when its
    /// length is known (planned), the epoch alone when streamed.
    pub(crate) epoch_progress: f64,
    /// The epoch and micro-batch the next step starts at (a planned epoch done moves on to the
    /// next one's first).
    pub(crate) epoch: u64,
    pub(crate) micro_batch: usize,
}

/// A run's training data and validation set, rendered with its tokenizer and template.
pub(crate) struct Feed<'a> {
    /// Epoch 0 rendered is the preflight; a planned run trains on these renderings.
    rendered: EpochCache<'a>,
    validation: Option<ReadOutcome>,
    form: Form<'a>,
    /// Poems whose metadata dropout draws anew each epoch, so each epoch renders anew.
    stochastic: bool,
    /// Micro-batches of this rank per step (`train.grad_accum`).
    accum: usize,
    share: Share,
    pad_id: u32,
    packing: bool,
}

enum Form<'a> {
    Planned(Plan),
    /// Boxed: a stream's state is ten times the size of a plan's.
    Streamed(Box<StreamFeed<'a>>),
}

/// Where a planned run stands, and its epoch's batch plan (made once an epoch).
struct Plan {
    opts: BatchPlanOptions,
    epoch: u64,
    micro_batch: usize,
    /// The plan of an epoch: micro-batches of rows of sample indices.
    cached: Option<(u64, Vec<Vec<Vec<usize>>>)>,
}

/// What the preflight reports: epoch 0 as it will be trained on.
pub(crate) struct Preflight<'f> {
    pub(crate) report: &'f Report,
    /// Per source of a mixture, what epoch 0 draws.
    pub(crate) mixture: Option<Vec<SourceReport>>,
    /// Samples of epoch 0 that survived rendering.
    pub(crate) samples: usize,
    /// The hash of epoch 0's ids, which a resumed run must find unchanged.
    pub(crate) fingerprint: String,
    /// The disk cache's directory, and whether epoch 0 came from it.
    pub(crate) cache: Option<(&'f Path, bool)>,
}

impl<'a> Feed<'a> {
    /// `data` split ([`TrainData::split`]), rendered with `tok` and `template` into samples of at
    /// most `max_len` tokens, for the rank `share` names. Every rank reads and renders all of
    /// the data (so each knows every step's plan) and collates only its own micro-batches; only
    /// rank 0 uses the disk cache, whose files would otherwise be written by several processes.
    pub(crate) fn new(
        cfg: &TrainConfig,
        data: TrainData,
        (template, tok): (&'a Template, &'a Tokenizer),
        max_len: usize,
        share: Share,
    ) -> Result<Feed<'a>> {
        let render_opts = RenderOptions {
            train_on: cfg.data.train_on,
            max_len: Some(max_len),
            length_policy: cfg.data.length_policy,
            metadata_keep_prob: cfg.data.metadata_keep_prob,
            seed: cfg.run.seed,
            check_invariants: true,
        };
        let stochastic = data
            .records
            .records
            .iter()
            .any(|r| matches!(r.sample, Sample::Poem(_)))
            && cfg.data.metadata_keep_prob < 1.0
            && cfg.data.metadata_keep_prob > 0.0;
        let disk = match cfg.data.cache && !cfg.data.streaming && share.rank == 0 {
            true => {
                let dir = cfg
                    .data
                    .cache_dir
                    .clone()
                    .unwrap_or_else(|| cfg.run.out_dir.join("cache"));
                let val_files: Vec<Vec<PathBuf>> = cfg
                    .data
                    .validation
                    .iter()
                    .map(data_files)
                    .collect::<Result<_>>()?;
                let key = prep_cache_key(cfg, tok, max_len, &data.files, &val_files)?;
                Some(PrepCache::open(&dir, key)?)
            }
            false => None,
        };
        let form = match cfg.data.streaming {
            true => Form::Streamed(Box::new(StreamFeed::new(
                data.files.iter().flatten().cloned().collect(),
                cfg.data.format,
                read::invalid_policy(cfg),
                template,
                tok,
                render_opts.clone(),
                cfg.train.batch_size,
                cfg.data.packing.then_some(max_len),
                cfg.data.shuffle_buffer,
                cfg.run.seed,
                data.selection,
            ))),
            false => Form::Planned(Plan {
                opts: BatchPlanOptions {
                    batch_size: cfg.train.batch_size,
                    packing: cfg.data.packing,
                    pack_len: max_len,
                    group_by_length: cfg.data.group_by_length,
                    shuffle: cfg.data.shuffle,
                    seed: cfg.run.seed,
                    drop_last: false,
                },
                epoch: 0,
                micro_batch: 0,
                cached: None,
            }),
        };
        let mixture = Mixture::new(cfg, data.source_of);
        Ok(Feed {
            rendered: EpochCache::new(data.records, (template, tok), render_opts, disk, mixture),
            validation: data.validation,
            form,
            stochastic,
            accum: cfg.train.grad_accum,
            share,
            pad_id: setup::pad_id(tok),
            packing: cfg.data.packing,
        })
    }

    /// Epoch 0 rendered (for a streamed run, its first look at the data).
    pub(crate) fn preflight(&mut self) -> Result<Preflight<'_>> {
        self.rendered.fill(0, self.stochastic)?;
        let first = self.rendered.current();
        let mixture = match (&self.rendered.mixture, first.order) {
            (Some(m), Some(view)) => Some(m.report(&self.rendered.records, first.data, view)),
            _ => None,
        };
        let first = first.data;
        let fingerprint =
            checkpoint::fingerprint(first.samples.iter().map(|(_, r)| ids_bytes(r.ids())));
        let cache = self
            .rendered
            .disk
            .as_ref()
            .map(|c| (c.dir(), self.rendered.hits > 0));
        Ok(Preflight {
            report: &first.report,
            mixture,
            samples: first.samples.len(),
            fingerprint,
            cache,
        })
    }

    /// The validation set rendered, when there is one.
    pub(crate) fn validation(&self) -> Result<Option<Prepared>> {
        self.validation
            .as_ref()
            .map(|records| self.rendered.prepare_other("validation", records))
            .transpose()
    }

    /// The schedule's length in optimizer steps: `max_steps`, else `epochs` planned. A streamed
    /// run's epochs have no known length: its total is `max_steps`, or unbounded until the time
    /// budget estimates it.
    pub(crate) fn total_steps(&mut self, max_steps: Option<u64>, epochs: u64) -> Result<u64> {
        if let Some(n) = max_steps {
            return Ok(n);
        }
        let Form::Planned(plan) = &self.form else {
            return Ok(u64::MAX);
        };
        let mut total = 0;
        for e in 0..epochs {
            // Without packing an epoch's length does not depend on its renderings.
            let lengths = self
                .rendered
                .get(e, self.stochastic && self.packing)?
                .lengths();
            total += plan_epoch(&lengths, &plan.opts, e)?
                .len()
                .div_ceil(self.accum * self.share.ranks) as u64;
        }
        Ok(total)
    }

    /// Continues at micro-batch `micro_batch` of `epoch` (a streamed epoch is replayed up to it:
    /// rendered, not trained on).
    pub(crate) fn seek(&mut self, epoch: u64, micro_batch: usize) -> Result<()> {
        match &mut self.form {
            Form::Planned(plan) => {
                plan.epoch = epoch;
                plan.micro_batch = micro_batch;
                Ok(())
            }
            Form::Streamed(stream) => stream.seek(epoch, micro_batch),
        }
    }

    /// What a streamed run read and left out so far; `None` for a planned one, whose preflight
    /// report counts it all.
    pub(crate) fn stream_counts(&self) -> Option<StreamCounts> {
        match &self.form {
            Form::Planned(_) => None,
            Form::Streamed(stream) => Some(stream.counts()),
        }
    }

    /// The next optimizer step's micro-batches, moving on to the next epoch when this one is
    /// done.
    pub(crate) fn next_step(&mut self) -> Result<Step> {
        match &mut self.form {
            Form::Planned(plan) => plan.next_step(
                &mut self.rendered,
                self.stochastic,
                (self.accum, self.share),
                self.pad_id,
            ),
            Form::Streamed(stream) => streamed_step(stream, (self.accum, self.share), self.pad_id),
        }
    }
}

impl Plan {
    fn next_step(
        &mut self,
        rendered: &mut EpochCache<'_>,
        stochastic: bool,
        (accum, share): (usize, Share),
        pad_id: u32,
    ) -> Result<Step> {
        let step_len = accum * share.ranks;
        loop {
            let epoch = rendered.get(self.epoch, stochastic)?;
            if self.cached.as_ref().is_none_or(|(e, _)| *e != self.epoch) {
                let plan = plan_epoch(&epoch.lengths(), &self.opts, self.epoch)?;
                self.cached = Some((self.epoch, plan));
            }
            let plan = &self.cached.as_ref().expect("planned above").1;
            if self.micro_batch >= plan.len() {
                self.epoch += 1;
                self.micro_batch = 0;
                continue;
            }
            let end = (self.micro_batch + step_len).min(plan.len());
            let micro_batches = &plan[self.micro_batch..end];
            let mine = share.range(micro_batches.len(), accum);
            let first = mine.start;
            let batches = micro_batches[mine]
                .iter()
                .map(|rows| {
                    let rows: Vec<Vec<&Rendered>> = rows
                        .iter()
                        .map(|row| row.iter().map(|&i| epoch.sample(i)).collect())
                        .collect();
                    collate(&rows, pad_id, None)
                })
                .collect();
            let samples = micro_batches.iter().flatten().map(Vec::len).sum();
            let epoch_progress = self.epoch as f64 + end as f64 / plan.len() as f64;
            self.micro_batch = end;
            if end >= plan.len() {
                self.epoch += 1;
                self.micro_batch = 0;
            }
            return Ok(Step {
                batches,
                first,
                samples,
                epoch_progress,
                epoch: self.epoch,
                micro_batch: self.micro_batch,
            });
        }
    }
}

/// A streamed step: up to `accum x ranks` micro-batches from the stream (this rank's collated),
/// into the next epoch when this one has none left.
fn streamed_step(
    stream: &mut StreamFeed<'_>,
    (accum, share): (usize, Share),
    pad_id: u32,
) -> Result<Step> {
    let step_len = accum * share.ranks;
    loop {
        let mut batches = Vec::with_capacity(accum);
        let (mut taken, mut samples) = (0, 0);
        while taken < step_len {
            let Some((rows, n)) = stream.next_micro_batch()? else {
                break;
            };
            if share.range(step_len, accum).contains(&taken) {
                let rows: Vec<Vec<&Rendered>> = rows.iter().map(|r| r.iter().collect()).collect();
                batches.push(collate(&rows, pad_id, None));
            }
            taken += 1;
            samples += n;
        }
        if taken == 0 {
            if stream.position == 0 {
                return Err(Error::Config(
                    "data.streaming: no training sample survived rendering".into(),
                ));
            }
            stream.next_epoch();
            continue;
        }
        return Ok(Step {
            batches,
            first: share.range(taken, accum).start,
            samples,
            epoch_progress: stream.epoch as f64,
            epoch: stream.epoch,
            micro_batch: stream.position,
        });
    }
}

fn ids_bytes(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|i| i.to_le_bytes()).collect()
}
