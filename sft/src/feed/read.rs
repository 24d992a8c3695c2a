//! Reading a run's records: its sources' files, the records in them (all of them, or a streamed
//! run's first look), the selection (`data.filter`, `data.field_map`), and the records held out
//! for validation.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use sft_data::{
    read_records, split_train_val, Format, InvalidPolicy, ReadOutcome, Record, RecordStream,
    Selection,
};

use crate::config::{DataSource, DataSourceTable, FieldMap, TrainConfig};
use crate::error::{Error, Result};
use crate::setup;

/// A run's records as read, before there is a tokenizer to render them with.
pub(crate) struct TrainData {
    /// The training records; a streamed run's first `data.shuffle_buffer` of them.
    pub(crate) records: ReadOutcome,
    /// The files of each source of `data.train`.
    pub(crate) files: Vec<Vec<PathBuf>>,
    /// Each training record's source (an index into `data.train`); empty when streamed.
    pub(crate) source_of: Vec<usize>,
    pub(crate) selection: Selection,
    /// `data.validation`'s records, or those `data.val_ratio` held out ([`TrainData::split`]).
    pub(crate) validation: Option<ReadOutcome>,
}

impl TrainData {
    /// Every source of `data.train`, or with `data.streaming` a first look (the records the
    /// preflight report describes; the rest is read as the run trains).
    pub(crate) fn read(cfg: &TrainConfig) -> Result<TrainData> {
        let selection = selection(cfg)?;
        let (records, files, source_of) = match cfg.data.streaming {
            true => {
                let (read, files) = stream_preview(cfg, &selection)?;
                (read, files, vec![])
            }
            false => read_all("data.train", &cfg.data.train, cfg)?,
        };
        Ok(TrainData {
            records,
            files,
            source_of,
            selection,
            validation: None,
        })
    }

    /// The records a built tokenizer learns its vocabulary from: those read, or for a streamed
    /// run with a char tokenizer, one pass over the whole data.
    pub(crate) fn tokenizer_corpus(&self, cfg: &TrainConfig) -> Result<Cow<'_, [Record]>> {
        Ok(match cfg.data.streaming && cfg.tokenizer.build.is_some() {
            true => Cow::Owned(char_covering_records(cfg, &self.files, &self.selection)?),
            false => Cow::Borrowed(&self.records.records),
        })
    }

    /// The validation records set apart: `data.validation`'s, or `data.val_ratio` of the
    /// training records held out (see [`split_records`]).
    pub(crate) fn split(self, cfg: &TrainConfig) -> Result<TrainData> {
        let (records, source_of, validation) = split_records(cfg, self.records, self.source_of)?;
        Ok(TrainData {
            records,
            source_of,
            validation,
            ..self
        })
    }
}

/// The files a data source reads: a file as it is, or a dataset directory's (or cached hub
/// dataset's) files of the source's split (default `train`) and subset.
pub fn data_files(source: &DataSource) -> Result<Vec<PathBuf>> {
    let (path, split, subset) = source.location();
    let path = crate::hub::resolve_dataset(&path)?;
    if path.is_dir() {
        let split = split.as_deref().unwrap_or("train");
        return Ok(sft_data::dataset_files(&path, subset.as_deref(), split)?);
    }
    if split.is_some() || subset.is_some() {
        return Err(Error::Config(format!(
            "{}: a split or subset names part of a dataset directory or hub dataset, not of a file",
            path.display()
        )));
    }
    if !path.exists() {
        return Err(Error::Config(format!(
            "{}: no such file or directory (nor a hub dataset id in the local cache)",
            path.display()
        )));
    }
    Ok(vec![path])
}

/// Every record of one data source as a user gives it on the command line or in `data.train`:
/// a `.jsonl`, `.json` or `.parquet` file, a dataset directory, or a hub dataset id from the
/// local cache, each with an optional `:SUBSET/SPLIT`.
pub fn read_data(
    spec: &Path,
    format: Option<Format>,
    policy: InvalidPolicy,
) -> Result<ReadOutcome> {
    let source = DataSource::Path(spec.to_path_buf());
    let mut out = ReadOutcome::default();
    for file in data_files(&source)? {
        out.extend(read_records(&file, format, policy)?);
    }
    Ok(out)
}

/// `data.filter` and `data.field_map` as a [`Selection`], its map files read.
pub fn selection(cfg: &TrainConfig) -> Result<Selection> {
    let mut maps = std::collections::BTreeMap::new();
    for (field, map) in &cfg.data.field_map {
        let table = match map {
            FieldMap::Table(t) => t.clone(),
            FieldMap::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                serde_json::from_str(&text).map_err(|e| {
                    Error::Config(format!(
                        "data.field_map.{field}: {}: expected one JSON object of old -> new values: {e}",
                        path.display()
                    ))
                })?
            }
        };
        maps.insert(field.clone(), table);
    }
    Ok(Selection {
        filter: cfg
            .data
            .filter
            .iter()
            .map(|(k, v)| (k.clone(), v.iter().cloned().collect()))
            .collect(),
        any: cfg.data.filter_any,
        maps,
    })
}

/// The selection of one source of `data.train` or `data.validation`: its own `filter` (every
/// listed field must match) in place of `data.filter`, with `data.field_map`.
pub fn source_selection(cfg: &TrainConfig, source: &DataSource) -> Result<Selection> {
    let mut sel = selection(cfg)?;
    if let DataSource::Table(DataSourceTable {
        filter: Some(filter),
        ..
    }) = source
    {
        sel.filter = filter
            .iter()
            .map(|(k, v)| (k.clone(), v.iter().cloned().collect()))
            .collect();
        sel.any = false;
    }
    Ok(sel)
}

/// Reads every source of `data.train` (or `data.validation`) in order. Returns the records and,
/// per source, the files it read (a record's file tells which source it came from).
fn read_all(
    key: &str,
    sources: &[DataSource],
    cfg: &TrainConfig,
) -> Result<(ReadOutcome, Vec<Vec<PathBuf>>, Vec<usize>)> {
    let policy = invalid_policy(cfg);
    let mut all: Option<ReadOutcome> = None;
    let mut files_per_source = Vec::with_capacity(sources.len());
    let mut source_of = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        let files = data_files(source).map_err(|e| Error::Config(format!("{key}[{i}]: {e}")))?;
        let selection = source_selection(cfg, source)?;
        for f in &files {
            let mut r = read_records(f, cfg.data.format, policy)?;
            selection.apply_all(&mut r)?;
            source_of.resize(source_of.len() + r.records.len(), i);
            match all.as_mut() {
                None => all = Some(r),
                Some(a) => a.extend(r),
            }
        }
        files_per_source.push(files);
    }
    let all = all.ok_or_else(|| {
        Error::Config("data.train: at least one training file is required".into())
    })?;
    Ok((all, files_per_source, source_of))
}

pub(super) fn invalid_policy(cfg: &TrainConfig) -> InvalidPolicy {
    if cfg.data.skip_invalid {
        InvalidPolicy::Skip
    } else {
        InvalidPolicy::Error
    }
}

/// A streamed run's first look at its data: the first `data.shuffle_buffer` records (what the
/// preflight report describes), and the files of every source.
fn stream_preview(
    cfg: &TrainConfig,
    selection: &Selection,
) -> Result<(ReadOutcome, Vec<Vec<PathBuf>>)> {
    let files: Vec<Vec<PathBuf>> = cfg
        .data
        .train
        .iter()
        .map(data_files)
        .collect::<Result<_>>()?;
    let mut stream = RecordStream::new(
        files.iter().flatten().cloned().collect(),
        cfg.data.format,
        invalid_policy(cfg),
    );
    let mut out = ReadOutcome::default();
    for record in stream.by_ref() {
        let mut record = record?;
        if !selection.apply(&mut record)? {
            out.filtered_out += 1;
            continue;
        }
        *out.per_format.entry(record.format).or_default() += 1;
        out.records.push(record);
        if out.records.len() == cfg.data.shuffle_buffer {
            break;
        }
    }
    out.skipped = std::mem::take(&mut stream.skipped);
    out.blank_lines = stream.blank_lines;
    Ok((out, files))
}

/// For a char tokenizer built from streamed data: one pass over every record, keeping only
/// those that bring a character not seen before (a char vocabulary is the set of characters, so
/// these give the same one as the whole corpus) and the first of each kind of sample.
fn char_covering_records(
    cfg: &TrainConfig,
    files: &[Vec<PathBuf>],
    selection: &Selection,
) -> Result<Vec<Record>> {
    let mut seen = std::collections::HashSet::new();
    let mut kinds = std::collections::HashSet::new();
    let mut keep = Vec::new();
    let stream = RecordStream::new(
        files.iter().flatten().cloned().collect(),
        cfg.data.format,
        invalid_policy(cfg),
    );
    for record in stream {
        let mut record = record?;
        if !selection.apply(&mut record)? {
            continue;
        }
        let mut new = kinds.insert(std::mem::discriminant(&record.sample));
        for text in setup::record_texts(&record) {
            for c in text.chars() {
                new |= seen.insert(c);
            }
        }
        if new {
            keep.push(record);
        }
    }
    Ok(keep)
}

/// Training and validation records: validation from its own files, or `val_ratio` of the
/// training records held out by seed. The training outcome keeps the read counts (skipped and
/// blank lines) for the report; `source_of` (each training record's source) follows the split.
/// A line read by two sources (one file listed twice) is held out whole: every training copy of
/// a held-out line goes too, so no validation record is also trained on.
fn split_records(
    cfg: &TrainConfig,
    mut train_read: ReadOutcome,
    source_of: Vec<usize>,
) -> Result<(ReadOutcome, Vec<usize>, Option<ReadOutcome>)> {
    if !cfg.data.validation.is_empty() {
        let (val, _, _) = read_all("data.validation", &cfg.data.validation, cfg)?;
        return Ok((train_read, source_of, Some(val)));
    }
    if cfg.data.val_ratio > 0.0 {
        let records = std::mem::take(&mut train_read.records);
        let (tr, va) = split_train_val(records.len(), cfg.data.val_ratio, cfg.run.seed);
        let line = |r: &Record| (r.source.file.clone(), r.source.line);
        let mut held_out = std::collections::HashSet::new();
        let va: Vec<usize> = va
            .into_iter()
            .filter(|&i| held_out.insert(line(&records[i])))
            .collect();
        let tr: Vec<usize> = tr
            .into_iter()
            .filter(|&i| !held_out.contains(&line(&records[i])))
            .collect();
        let train_sources = tr.iter().map(|&i| source_of[i]).collect();
        let mut slots: Vec<Option<Record>> = records.into_iter().map(Some).collect();
        let mut take = |idx: &[usize]| -> Vec<Record> {
            idx.iter()
                .map(|&i| slots[i].take().expect("the split is disjoint"))
                .collect()
        };
        let val_records = take(&va);
        train_read.records = take(&tr);
        train_read.per_format = count_formats(&train_read.records);
        let val = ReadOutcome {
            per_format: count_formats(&val_records),
            records: val_records,
            ..ReadOutcome::default()
        };
        return Ok((train_read, train_sources, Some(val)));
    }
    Ok((train_read, source_of, None))
}

fn count_formats(records: &[Record]) -> std::collections::BTreeMap<Format, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for r in records {
        *counts.entry(r.format).or_insert(0) += 1;
    }
    counts
}
