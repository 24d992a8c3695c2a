//! `cargo xtask download REPO_ID [--revision R] [--repo-type model|dataset] [--include GLOB ...]
//! [--out DIR] [--refresh]`.
//!
//! Offline first: the local cache (the Python-compatible layout `models--Owner--Name/{refs,
//! snapshots/<sha>/..}` under `HF_HUB_CACHE`, `HF_HOME/hub`, ..., `datasets--` for datasets;
//! `sft::hub` resolves the same layout when `sft` is given a hub id) is checked before the
//! network, and a snapshot counts as present only when every file a model needs is there
//! (config, tokenizer files, every shard the index names), or, for a dataset, at least one data
//! file and every literal `--include`. Network access is the `hub` feature (hf-hub);
//! a build without it re-runs itself with the feature when the cache is not enough, so neither
//! CI nor the `sft` binary compile an HTTP stack.
//!
//! `HF_HUB_OFFLINE=1` forbids the network: a cache miss is an error naming what is missing.
//!
//! The directory printed on stdout is what `sft` takes as `--model` / `model.path`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use globset::{Glob, GlobSet, GlobSetBuilder};

/// The files of a model repository that `sft` reads (what `--include` defaults to).
pub(crate) const DEFAULT_INCLUDE: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "*.safetensors",
    "model.safetensors.index.json",
    "LICENSE",
    "README.md",
];

/// The files of a dataset repository that `sft` reads (what `--include` defaults to for
/// `--repo-type dataset`): the hub's parquet shards, JSON and JSON lines.
pub(crate) const DATASET_INCLUDE: &[&str] = &[
    "*.parquet",
    "**/*.parquet",
    "*.jsonl",
    "**/*.jsonl",
    "*.json",
    "**/*.json",
    "README.md",
    "LICENSE*",
];

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RepoKind {
    Model,
    Dataset,
}

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Args {
    /// `Owner/Name`, e.g. `Qwen/Qwen2.5-0.5B-Instruct` or `HuggingFaceTB/smoltalk`.
    repo_id: String,
    /// Branch, tag or commit (default `main`).
    #[arg(long, default_value = "main")]
    revision: String,
    /// A model (default) or a dataset repository.
    #[arg(long, value_enum, default_value = "model")]
    repo_type: RepoKind,
    /// Only files matching these globs (repeatable, e.g. `--include 'data/all/train-*'`);
    /// default: config, tokenizer and weights of a model, the data files of a dataset.
    #[arg(long = "include", value_name = "GLOB")]
    include: Vec<String>,
    /// Write the files into this plain directory instead of the hub cache.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Ask the hub even when the cache has a complete snapshot (a moved branch).
    #[arg(long)]
    refresh: bool,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let patterns = include_patterns(&args.include, args.repo_type)?;
    let cache = sft::hub::default_cache_dir();
    if !args.refresh {
        let local = match &args.out {
            Some(dir) => check_complete(dir, &patterns).map(|()| dir.clone()),
            None => cached_snapshot(&cache, &args, &patterns),
        };
        match local {
            Ok(dir) => {
                eprintln!("{} is complete locally; no network used", args.repo_id);
                println!("{}", dir.display());
                return Ok(());
            }
            Err(missing) if offline() => bail!(
                "{}: not available offline (HF_HUB_OFFLINE is set): {missing}",
                args.repo_id
            ),
            Err(missing) => {
                eprintln!("{}: {missing}; downloading", args.repo_id);
                return download(&args, &patterns, &cache, missing);
            }
        }
    }
    if offline() {
        bail!("--refresh needs the network, but HF_HUB_OFFLINE is set");
    }
    download(&args, &patterns, &cache, anyhow::anyhow!("--refresh"))
}

/// `huggingface_hub`'s switch: answer from the cache or fail, never touch the network.
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
}

#[cfg(feature = "hub")]
fn download(
    args: &Args,
    patterns: &Include,
    cache: &Path,
    why: anyhow::Error,
) -> anyhow::Result<()> {
    use hf_hub::progress::{DownloadEvent, ProgressEvent, ProgressHandler};
    use indicatif::{ProgressBar, ProgressStyle};

    struct Bar(ProgressBar);
    impl ProgressHandler for Bar {
        fn on_progress(&self, event: &ProgressEvent) {
            match event {
                ProgressEvent::Download(DownloadEvent::Start { total_bytes, .. }) => {
                    self.0.set_length(*total_bytes)
                }
                ProgressEvent::Download(DownloadEvent::AggregateProgress {
                    bytes_completed,
                    ..
                }) => self.0.set_position(*bytes_completed),
                ProgressEvent::Download(DownloadEvent::Progress { files }) => {
                    if let Some(f) = files.last() {
                        self.0.set_message(f.filename.clone());
                    }
                }
                _ => {}
            }
        }
    }

    let (owner, name) = split_repo_id(&args.repo_id)?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bytes}/{total_bytes} [{wide_bar}] {bytes_per_sec} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    // The client finds the token itself (HF_TOKEN, HF_TOKEN_PATH, HF_HOME/token) and we never
    // see or print it.
    let client = hf_hub::HFClientSync::new().context("creating the hub client")?;
    // The same builder either way; written out per kind since the handles may differ in type.
    macro_rules! snapshot {
        ($repo:expr) => {
            $repo
                .snapshot_download()
                .revision(args.revision.clone())
                .allow_patterns(patterns.globs.clone())
                .maybe_local_dir(args.out.clone())
                .force_download(false)
                .progress(hf_hub::progress::Progress::new(Bar(bar.clone())))
                .send()
        };
    }
    let dir = match args.repo_type {
        RepoKind::Model => snapshot!(client.model(owner, name)),
        RepoKind::Dataset => snapshot!(client.dataset(owner, name)),
    };
    bar.finish_and_clear();
    let dir = dir.map_err(|e| {
        anyhow::anyhow!(
            "downloading {} failed: {e}\n(before the download: {why}; cache: {})",
            args.repo_id,
            cache.display()
        )
    })?;
    check_complete(&dir, patterns)
        .with_context(|| format!("the download of {} is incomplete", args.repo_id))?;
    println!("{}", dir.display());
    Ok(())
}

#[cfg(not(feature = "hub"))]
fn download(
    args: &Args,
    _patterns: &Include,
    cache: &Path,
    why: anyhow::Error,
) -> anyhow::Result<()> {
    // Re-run this command from a build with the network feature. The first time compiles hf-hub.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(&cargo)
        .args([
            "run",
            "--quiet",
            "--package",
            "xtask",
            "--features",
            "hub",
            "--",
        ])
        .args(std::env::args_os().skip(1))
        .status()
        .with_context(|| format!("running {cargo} to build xtask with --features hub"))?;
    if !status.success() {
        bail!(
            "{}: not available offline ({why}; cache: {}), and the download failed ({status})",
            args.repo_id,
            cache.display()
        );
    }
    Ok(())
}

fn split_repo_id(id: &str) -> anyhow::Result<(&str, &str)> {
    match id.split_once('/') {
        Some((o, n)) if !o.is_empty() && !n.is_empty() && !n.contains('/') => Ok((o, n)),
        _ => bail!("repo id {id:?} is not of the form Owner/Name"),
    }
}

pub(crate) struct Include {
    globs: Vec<String>,
    set: GlobSet,
    kind: RepoKind,
}

fn include_patterns(user: &[String], kind: RepoKind) -> anyhow::Result<Include> {
    let defaults = match kind {
        RepoKind::Model => DEFAULT_INCLUDE,
        RepoKind::Dataset => DATASET_INCLUDE,
    };
    let globs: Vec<String> = if user.is_empty() {
        defaults.iter().map(|s| s.to_string()).collect()
    } else {
        user.to_vec()
    };
    let mut b = GlobSetBuilder::new();
    for g in &globs {
        b.add(Glob::new(g).with_context(|| format!("--include {g:?}"))?);
    }
    Ok(Include {
        set: b.build()?,
        globs,
        kind,
    })
}

/// The snapshot directory of the repository at its revision when it holds everything needed.
pub(crate) fn cached_snapshot(
    cache: &Path,
    args: &Args,
    include: &Include,
) -> anyhow::Result<PathBuf> {
    split_repo_id(&args.repo_id)?;
    let id = sft::hub::HubId::parse(&format!("{}@{}", args.repo_id, args.revision))
        .with_context(|| format!("{:?} is not a hub id", args.repo_id))?;
    let kind = match args.repo_type {
        RepoKind::Model => sft::hub::RepoType::Model,
        RepoKind::Dataset => sft::hub::RepoType::Dataset,
    };
    let snapshot = id.snapshot(cache, kind)?;
    check_complete(&snapshot, include)?;
    Ok(snapshot)
}

/// A model directory is complete when it has `config.json`, its weights (a single
/// `model.safetensors`, or every shard `model.safetensors.index.json` names) and a tokenizer,
/// as far as the include patterns ask for them.
pub(crate) fn check_complete(dir: &Path, include: &Include) -> anyhow::Result<()> {
    if include.kind == RepoKind::Dataset {
        return check_dataset(dir, include);
    }
    let wanted = |f: &str| include.set.is_match(f);
    let mut missing: Vec<String> = Vec::new();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        if wanted(f) && !dir.join(f).is_file() {
            missing.push(f.into());
        }
    }
    let index = dir.join("model.safetensors.index.json");
    if wanted("model.safetensors.index.json") && index.is_file() {
        let text = std::fs::read_to_string(&index)?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no weight_map", index.display()))?;
        let mut shards: Vec<&str> = map.values().filter_map(|s| s.as_str()).collect();
        shards.sort_unstable();
        shards.dedup();
        for s in shards {
            if !dir.join(s).is_file() {
                missing.push(s.into());
            }
        }
    } else if wanted("model.safetensors") && !dir.join("model.safetensors").is_file() {
        missing.push("model.safetensors (or model.safetensors.index.json)".into());
    }
    // A literal pattern the user asked for must be there too.
    for g in &include.globs {
        let literal = !g.contains(['*', '?', '[', '{']);
        let optional = DEFAULT_INCLUDE.contains(&g.as_str());
        if literal && !optional && !dir.join(g).exists() && !missing.contains(g) {
            missing.push(g.clone());
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        bail!("{} lacks {}", dir.display(), missing.join(", "))
    }
}

/// A dataset snapshot is complete when it holds at least one file the patterns select, and every
/// literal pattern the user gave.
fn check_dataset(dir: &Path, include: &Include) -> anyhow::Result<()> {
    fn walk(dir: &Path, root: &Path, include: &Include, found: &mut usize) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, root, include, found);
            } else if let Ok(rel) = path.strip_prefix(root) {
                let rel = rel.to_string_lossy();
                let doc = rel.ends_with("README.md") || rel.contains("LICENSE");
                if include.set.is_match(rel.as_ref()) && !doc {
                    *found += 1;
                }
            }
        }
    }
    let mut found = 0;
    walk(dir, dir, include, &mut found);
    let mut missing: Vec<String> = include
        .globs
        .iter()
        .filter(|g| !g.contains(['*', '?', '[', '{']) && !dir.join(g).exists())
        .cloned()
        .collect();
    if found == 0 {
        missing.insert(
            0,
            format!("data files matching {}", include.globs.join(", ")),
        );
    }
    if missing.is_empty() {
        Ok(())
    } else {
        bail!("{} lacks {}", dir.display(), missing.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_snapshots_are_complete_with_one_data_file() {
        let dir = std::env::temp_dir().join(format!("xtask-ds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data/all")).unwrap();
        std::fs::write(dir.join("README.md"), "card").unwrap();
        let defaults = include_patterns(&[], RepoKind::Dataset).unwrap();
        let err = check_complete(&dir, &defaults).unwrap_err().to_string();
        assert!(err.contains("lacks data files"), "{err}");
        std::fs::write(dir.join("data/all/train-00000-of-00001.parquet"), "x").unwrap();
        check_complete(&dir, &defaults).unwrap();
        let only_test =
            include_patterns(&["data/all/test-*".to_string()], RepoKind::Dataset).unwrap();
        assert!(check_complete(&dir, &only_test).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn repo_ids_need_an_owner() {
        assert!(split_repo_id("Qwen/Qwen2.5-0.5B").is_ok());
        for bad in ["Qwen2.5", "/x", "a/", "a/b/c"] {
            assert!(split_repo_id(bad).is_err(), "{bad}");
        }
    }
}
