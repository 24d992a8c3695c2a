//! Rendered training data per epoch, kept in memory and, with `data.cache`, on disk.

use std::path::PathBuf;

use sft_data::{prepare, Prepared, ReadOutcome, RenderOptions, Rendered, Template};
use sft_tokenizer::Tokenizer;

use super::mixture::Mixture;
use super::prepcache::PrepCache;
use crate::checkpoint;
use crate::config::{FieldMap, TrainConfig};
use crate::error::{Error, Result};

/// Rendered training data per epoch: computed once when rendering is deterministic, per epoch
/// when poems draw their metadata anew; under a mixture, the samples each epoch draws.
pub(super) struct EpochCache<'a> {
    pub(super) records: ReadOutcome,
    template: &'a Template,
    tok: &'a Tokenizer,
    opts: RenderOptions,
    pub(super) disk: Option<PrepCache>,
    pub(super) mixture: Option<Mixture>,
    /// Renderings read from `disk` instead of made.
    pub(super) hits: usize,
    epoch: Option<u64>,
    data: Option<Prepared>,
    view: Option<(u64, Vec<usize>)>,
}

impl<'a> EpochCache<'a> {
    pub(super) fn new(
        records: ReadOutcome,
        (template, tok): (&'a Template, &'a Tokenizer),
        opts: RenderOptions,
        disk: Option<PrepCache>,
        mixture: Option<Mixture>,
    ) -> EpochCache<'a> {
        EpochCache {
            records,
            template,
            tok,
            opts,
            disk,
            mixture,
            hits: 0,
            epoch: None,
            data: None,
            view: None,
        }
    }

    /// Epoch `epoch`'s samples; rendered anew for each epoch when `per_epoch`, else once.
    pub(super) fn get(&mut self, epoch: u64, per_epoch: bool) -> Result<Epoch<'_>> {
        self.fill(epoch, per_epoch)?;
        Ok(self.current())
    }

    /// Renders (or reads from the disk cache) what epoch `epoch` trains on, unless it is at hand.
    pub(super) fn fill(&mut self, epoch: u64, per_epoch: bool) -> Result<()> {
        let key = if per_epoch { epoch } else { 0 };
        if self.epoch != Some(key) {
            let tag = format!("train-{key}");
            let cached = self.disk.as_ref().and_then(|c| c.load(&tag));
            self.hits += usize::from(cached.is_some());
            self.data = Some(match cached {
                Some(data) => data,
                None => prepare_cached(
                    self.disk.as_ref(),
                    &tag,
                    &self.records,
                    (self.template, self.tok),
                    &self.opts,
                    key,
                )?,
            });
            self.epoch = Some(key);
            self.view = None;
        }
        let data = self.data.as_ref().expect("filled above");
        if let Some(m) = &self.mixture {
            if self.view.as_ref().is_none_or(|(e, _)| *e != epoch) {
                self.view = Some((epoch, m.epoch(data, epoch)?));
            }
        }
        Ok(())
    }

    /// The epoch [`EpochCache::fill`] made ready last.
    pub(super) fn current(&self) -> Epoch<'_> {
        Epoch {
            data: self.data.as_ref().expect("an epoch is filled first"),
            order: self.view.as_ref().map(|(_, v)| v.as_slice()),
        }
    }

    /// Other records (the validation set) rendered as epoch 0 renders, through the same disk
    /// cache under `tag`.
    pub(super) fn prepare_other(&self, tag: &str, records: &ReadOutcome) -> Result<Prepared> {
        prepare_cached(
            self.disk.as_ref(),
            tag,
            records,
            (self.template, self.tok),
            &self.opts,
            0,
        )
    }
}

/// One epoch's training samples.
pub(super) struct Epoch<'a> {
    pub(super) data: &'a Prepared,
    /// Which of `data`'s samples the epoch trains on, in order (a mixture); all of them when
    /// `None`.
    pub(super) order: Option<&'a [usize]>,
}

impl Epoch<'_> {
    pub(super) fn lengths(&self) -> Vec<usize> {
        match self.order {
            Some(order) => order
                .iter()
                .map(|&k| self.data.samples[k].1.len())
                .collect(),
            None => self.data.samples.iter().map(|(_, r)| r.len()).collect(),
        }
    }

    /// The `i`-th sample of the epoch (what `plan_epoch` over [`Epoch::lengths`] indexes).
    pub(super) fn sample(&self, i: usize) -> &Rendered {
        match self.order {
            Some(order) => &self.data.samples[order[i]].1,
            None => &self.data.samples[i].1,
        }
    }
}

/// `prepare`, read from the disk cache when it holds the data, else rendered and stored there.
fn prepare_cached(
    disk: Option<&PrepCache>,
    tag: &str,
    records: &ReadOutcome,
    (template, tok): (&Template, &Tokenizer),
    opts: &RenderOptions,
    epoch: u64,
) -> Result<Prepared> {
    if let Some(data) = disk.and_then(|c| c.load(tag)) {
        return Ok(data);
    }
    let data = prepare(records, template, tok, opts, epoch)?;
    if let Some(c) = disk {
        c.store(tag, &data)?;
    }
    Ok(data)
}

/// The disk cache's key: a hash of everything rendering reads (see `prepcache`).
pub(super) fn prep_cache_key(
    cfg: &TrainConfig,
    tok: &Tokenizer,
    max_len: usize,
    train_files: &[Vec<PathBuf>],
    val_files: &[Vec<PathBuf>],
) -> Result<String> {
    let mut data = cfg.data.clone();
    // Where the cache is, and whether it is used, do not change what is in it.
    data.cache = true;
    data.cache_dir = None;
    let mut parts: Vec<Vec<u8>> = vec![
        concat!("sft-prep-1 ", env!("CARGO_PKG_VERSION")).into(),
        toml::to_string(&data)
            .expect("the config serialises")
            .into_bytes(),
        format!("max_len {max_len} seed {}", cfg.run.seed).into_bytes(),
        tok.canonical_json()?.into_bytes(),
    ];
    if let Some(p) = &cfg.data.chat_template {
        parts.push(std::fs::read(p).map_err(|e| Error::io(p, e))?);
    }
    for map in cfg.data.field_map.values() {
        if let FieldMap::File(p) = map {
            parts.push(std::fs::read(p).map_err(|e| Error::io(p, e))?);
        }
    }
    for (tag, files) in [("train", train_files), ("validation", val_files)] {
        for f in files.iter().flatten() {
            parts.push(format!("{tag} {}", f.display()).into_bytes());
            parts.push(std::fs::read(f).map_err(|e| Error::io(f, e))?);
        }
    }
    Ok(checkpoint::fingerprint(parts))
}
