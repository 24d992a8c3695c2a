//! Data as users have it: one path of any kind ([`read_records`]: `.jsonl`/`.ndjson`, `.json`
//! arrays, `.parquet`, a dataset directory), and a split (and subset) of a dataset directory in
//! the hub's layouts ([`dataset_files`], [`read_dataset`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::{
    read_json_array, read_jsonl, read_parquet, Error, Format, InvalidPolicy, ReadOutcome, Result,
};

/// The file kinds [`read_records`] reads, as the error for any other names them.
const ACCEPTED: &str =
    ".jsonl or .ndjson (one record per line), .json (an array of records), .parquet, or a dataset directory";

/// Extensions of data files, in the order [`dataset_files`] prefers them when a split has several
/// kinds.
const EXTENSIONS: [&str; 4] = ["parquet", "jsonl", "ndjson", "json"];

/// JSON files `datasets`' `save_to_disk` writes beside its data: never records.
const METADATA: [&str; 3] = ["dataset_info.json", "dataset_dict.json", "state.json"];

/// What kind of data file a path is, by its extension (case-insensitive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Jsonl,
    JsonArray,
    Parquet,
}

impl Kind {
    fn of(path: &Path) -> Option<Kind> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "ndjson" => Some(Kind::Jsonl),
            "json" => Some(Kind::JsonArray),
            "parquet" => Some(Kind::Parquet),
            _ => None,
        }
    }

    /// Preference when a split has files of several kinds: parquet, then JSONL, then JSON.
    fn rank(self) -> usize {
        match self {
            Kind::Parquet => 0,
            Kind::Jsonl => 1,
            Kind::JsonArray => 2,
        }
    }
}

/// Reads one data source: a `.jsonl`/`.ndjson` file ([`read_jsonl`]), a `.json` file
/// ([`read_json_array`], which falls back to JSONL), a `.parquet` file ([`read_parquet`]), or a
/// dataset directory, whose `train` split (no subset) is read ([`read_dataset`] reads any other).
/// Any other extension is an error naming the file and the accepted kinds.
pub fn read_records(
    path: &Path,
    format: Option<Format>,
    policy: InvalidPolicy,
) -> Result<ReadOutcome> {
    if path.is_dir() {
        return read_dataset(path, None, "train", format, policy);
    }
    match Kind::of(path) {
        Some(Kind::Jsonl) => read_jsonl(path, format, policy),
        Some(Kind::JsonArray) => read_json_array(path, format, policy),
        Some(Kind::Parquet) => read_parquet(path, format, policy),
        None if !path.exists() => Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        }),
        None => Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("not a data file this reads: expected {ACCEPTED}"),
            ),
        }),
    }
}

/// Reads the files of one split of a dataset directory ([`dataset_files`]), in order, as one
/// outcome (each record keeps its own file and row).
pub fn read_dataset(
    dir: &Path,
    subset: Option<&str>,
    split: &str,
    format: Option<Format>,
    policy: InvalidPolicy,
) -> Result<ReadOutcome> {
    let mut out = ReadOutcome::default();
    for file in dataset_files(dir, subset, split)? {
        out.extend(read_records(&file, format, policy)?);
    }
    Ok(out)
}

/// Where a layout looks for a split's files, relative to the dataset directory.
enum Place {
    /// Files in this directory named `{split}-*` or `{split}.*`.
    Named(PathBuf),
    /// Every data file in this directory (a directory named after the split).
    All(PathBuf),
}

/// The layouts tried, in order; the first that has files wins.
fn places(subset: Option<&str>, split: &str) -> Vec<Place> {
    let mut places = Vec::new();
    if subset.is_none_or(|s| s == "default") {
        // `datasets`' push_to_hub: data/train-00000-of-00002.parquet; plain repos: train.jsonl,
        // train/..., data/train/....
        places.push(Place::Named("data".into()));
        places.push(Place::Named(PathBuf::new()));
        places.push(Place::All(Path::new("data").join(split)));
        places.push(Place::All(split.into()));
    }
    // Multi-config repos: data/all/train-00000-of-00004.parquet (smoltalk), all/train-*; the
    // parquet converter: all/train/0000.parquet (and default/train/0000.parquet).
    let s = subset.unwrap_or("default");
    places.push(Place::Named(Path::new("data").join(s)));
    places.push(Place::Named(s.into()));
    places.push(Place::All(Path::new(s).join(split)));
    places.push(Place::All(Path::new("data").join(s).join(split)));
    places
}

/// The files of one split of a dataset directory as the hub lays them out, sorted by name:
///
/// | layout | example |
/// |---|---|
/// | `data/{split}-*`, `{split}-*`, `{split}.*` | `data/train-00000-of-00002.parquet`, `train.jsonl` |
/// | `data/{split}/*`, `{split}/*` | `train/part-0.parquet` |
/// | `data/{subset}/{split}-*`, `{subset}/{split}-*` | `data/all/train-00000-of-00004.parquet` |
/// | `{subset}/{split}/*`, `data/{subset}/{split}/*` | `all/train/0000.parquet` (parquet converter) |
///
/// Without a subset (or with `"default"`) the subset-less layouts are tried first, then the
/// `default` subset's. Data files are `.parquet`, `.jsonl`, `.ndjson` and `.json`; the first
/// layout with any wins, and if it mixes kinds only the first kind of parquet, JSONL, JSON is
/// taken (the same data is often published in two). Hidden files are ignored. Nothing found is
/// an error listing the patterns tried and the splits and subsets that do exist.
pub fn dataset_files(dir: &Path, subset: Option<&str>, split: &str) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a dataset directory"),
        });
    }
    let places = places(subset, split);
    for place in &places {
        let (rel, named) = match place {
            Place::Named(rel) => (rel, true),
            Place::All(rel) => (rel, false),
        };
        let mut files: Vec<(Kind, PathBuf)> = data_files(&dir.join(rel))?
            .into_iter()
            .filter(|(_, name)| !named || split_of(name) == split)
            .map(|(kind, name)| (kind, dir.join(rel).join(name)))
            .collect();
        if let Some(best) = files.iter().map(|(k, _)| k.rank()).min() {
            files.retain(|(k, _)| k.rank() == best);
            let mut files: Vec<PathBuf> = files.into_iter().map(|(_, p)| p).collect();
            files.sort();
            return Ok(files);
        }
    }
    let tried: Vec<String> = places
        .iter()
        .map(|p| match p {
            Place::Named(rel) => {
                let d = slash(rel);
                format!("{d}{split}-*, {d}{split}.*")
            }
            Place::All(rel) => format!("{}*", slash(rel)),
        })
        .collect();
    let what = match subset {
        Some(s) => format!("split {split:?} of subset {s:?}"),
        None => format!("split {split:?}"),
    };
    Err(Error::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "no data files for {what}: looked for {} ({}); {}",
                tried.join(", "),
                EXTENSIONS.map(|e| format!(".{e}")).join(", "),
                survey(dir)?
            ),
        ),
    })
}

/// `rel` as a prefix for patterns: `""` or `data/all/`.
fn slash(rel: &Path) -> String {
    let s = rel.to_string_lossy().replace('\\', "/");
    if s.is_empty() {
        s
    } else {
        format!("{s}/")
    }
}

/// The split a file name says: `train` for `train-00000-of-00002.parquet` or `train.jsonl`
/// (split names have no `-`).
fn split_of(name: &str) -> &str {
    let end = name.find(['-', '.']).unwrap_or(name.len());
    &name[..end]
}

/// The data files directly in `dir` (none if it does not exist), as (kind, file name), sorted.
fn data_files(dir: &Path) -> Result<Vec<(Kind, String)>> {
    Ok(entries(dir)?
        .into_iter()
        .filter(|(_, is_dir)| !is_dir)
        .filter(|(name, _)| !METADATA.contains(&name.as_str()))
        .filter_map(|(name, _)| Kind::of(Path::new(&name)).map(|k| (k, name)))
        .collect())
}

/// The sub-directories of `dir`.
fn subdirs(dir: &Path) -> Result<Vec<String>> {
    Ok(entries(dir)?
        .into_iter()
        .filter(|(_, is_dir)| *is_dir)
        .map(|(name, _)| name)
        .collect())
}

/// The visible entries of `dir` as (name, is a directory), sorted; none if `dir` does not exist.
fn entries(dir: &Path) -> Result<Vec<(String, bool)>> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let read = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut out = Vec::new();
    for entry in read {
        let entry = entry.map_err(io)?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        // Follows symlinks (the hub cache links snapshot files to blobs).
        let is_dir = entry.path().is_dir();
        out.push((name, is_dir));
    }
    out.sort();
    Ok(out)
}

/// What a dataset directory holds, for the error when a split is not found: its splits by subset.
fn survey(dir: &Path) -> Result<String> {
    // subset ("" for none) -> splits
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut note = |subset: &str, split: &str| {
        let subset = if subset == "default" { "" } else { subset };
        found
            .entry(subset.to_owned())
            .or_default()
            .insert(split.to_owned());
    };
    for base in [Path::new(""), Path::new("data")] {
        for (_, name) in data_files(&dir.join(base))? {
            note("", split_of(&name));
        }
        for sub in subdirs(&dir.join(base))? {
            if base.as_os_str().is_empty() && sub == "data" {
                continue;
            }
            let rel = base.join(&sub);
            // `sub` is a subset (files named by split) or a split (numbered files, as the parquet
            // converter writes them).
            for (_, name) in data_files(&dir.join(&rel))? {
                if name.starts_with(|c: char| c.is_ascii_digit()) {
                    note("", &sub);
                } else {
                    note(&sub, split_of(&name));
                }
            }
            for split in subdirs(&dir.join(&rel))? {
                if !data_files(&dir.join(rel.join(&split)))?.is_empty() {
                    note(&sub, &split);
                }
            }
        }
    }
    if found.is_empty() {
        return Ok(format!(
            "the directory has no {} files",
            EXTENSIONS.map(|e| format!(".{e}")).join(", ")
        ));
    }
    let list = |splits: &BTreeSet<String>| {
        splits
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut parts = Vec::new();
    if let Some(splits) = found.get("") {
        parts.push(format!("splits {} (no subset)", list(splits)));
    }
    for (subset, splits) in found.iter().filter(|(s, _)| !s.is_empty()) {
        parts.push(format!("subset {subset:?} with splits {}", list(splits)));
    }
    Ok(format!("found {}", parts.join("; ")))
}
