//! Hub ids resolved offline from the standard Hugging Face cache: `model.path`, `--model` and
//! `data.train` may name `Owner/Name` (optionally `@revision`) instead of a directory.
//!
//! The cache layout is `huggingface_hub`'s: `<cache>/models--Owner--Name/refs/<revision>` holds
//! a commit hash, `<cache>/models--Owner--Name/snapshots/<commit>/` the files (`datasets--` for
//! datasets). Nothing here touches the network: a snapshot that is missing or incomplete is an
//! error carrying the exact `cargo xtask download` command that fetches it.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The hub cache directory, looked up in the order `huggingface_hub` uses: `HF_HUB_CACHE`
/// (or the older `HUGGINGFACE_HUB_CACHE`), `HF_HOME/hub`, `XDG_CACHE_HOME/huggingface/hub`,
/// `~/.cache/huggingface/hub`.
pub fn cache_dir(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(d) = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")) {
        return PathBuf::from(d);
    }
    if let Some(home) = env("HF_HOME") {
        return Path::new(&home).join("hub");
    }
    let cache = env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

/// [`cache_dir`] from this process's environment.
pub fn default_cache_dir() -> PathBuf {
    cache_dir(&|k| std::env::var(k).ok())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoType {
    Model,
    Dataset,
}

impl RepoType {
    fn folder_prefix(self) -> &'static str {
        match self {
            RepoType::Model => "models",
            RepoType::Dataset => "datasets",
        }
    }
}

/// `Owner/Name[@revision]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub owner: String,
    pub name: String,
    /// Branch, tag or commit; `main` when not given.
    pub revision: String,
}

impl HubId {
    /// Reads `Owner/Name` or `Owner/Name@revision`; `None` for anything else (a path with more
    /// or fewer components, an absolute or relative path, characters the hub does not allow).
    pub fn parse(text: &str) -> Option<HubId> {
        let (id, revision) = match text.split_once('@') {
            Some((id, rev)) if !rev.is_empty() => (id, rev),
            Some(_) => return None,
            None => (text, "main"),
        };
        let (owner, name) = id.split_once('/')?;
        let ok = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (ok(owner) && ok(name)).then(|| HubId {
            owner: owner.into(),
            name: name.into(),
            revision: revision.into(),
        })
    }

    /// The command that puts this repository into the cache.
    pub fn download_command(&self, repo_type: RepoType) -> String {
        let mut cmd = format!("cargo xtask download {}/{}", self.owner, self.name);
        if self.revision != "main" {
            cmd.push_str(&format!(" --revision {}", self.revision));
        }
        if repo_type == RepoType::Dataset {
            cmd.push_str(" --repo-type dataset");
        }
        cmd
    }

    /// The snapshot directory in `cache`, which must exist.
    pub fn snapshot(&self, cache: &Path, repo_type: RepoType) -> Result<PathBuf> {
        let repo = cache.join(format!(
            "{}--{}--{}",
            repo_type.folder_prefix(),
            self.owner,
            self.name
        ));
        let missing = |what: String| {
            Error::Config(format!(
                "{}/{}@{}: {what} in the hub cache {}; fetch it with `{}`",
                self.owner,
                self.name,
                self.revision,
                cache.display(),
                self.download_command(repo_type)
            ))
        };
        if !repo.is_dir() {
            return Err(missing(format!(
                "not found ({} does not exist)",
                repo.display()
            )));
        }
        let is_commit =
            self.revision.len() == 40 && self.revision.bytes().all(|b| b.is_ascii_hexdigit());
        let commit = if is_commit {
            self.revision.clone()
        } else {
            let r = repo.join("refs").join(&self.revision);
            std::fs::read_to_string(&r)
                .map_err(|_| missing(format!("revision not cached ({} is missing)", r.display())))?
                .trim()
                .to_string()
        };
        let snapshot = repo.join("snapshots").join(&commit);
        if !snapshot.is_dir() {
            return Err(missing(format!(
                "snapshot {} is missing",
                snapshot.display()
            )));
        }
        Ok(snapshot)
    }
}

/// A model directory: `path` itself when it exists, else the cached snapshot of the hub id it
/// names, which must hold a config, weights and a tokenizer.
pub fn resolve_model(path: &Path) -> Result<PathBuf> {
    resolve_model_in(path, &default_cache_dir())
}

pub fn resolve_model_in(path: &Path, cache: &Path) -> Result<PathBuf> {
    let Some(id) = hub_id_of(path) else {
        return Ok(path.to_path_buf());
    };
    let dir = id.snapshot(cache, RepoType::Model)?;
    let has = |f: &str| dir.join(f).is_file();
    let mut lacks = vec![];
    if !has("config.json") {
        lacks.push("config.json");
    }
    if !has("model.safetensors") && !has("model.safetensors.index.json") {
        lacks.push("model.safetensors");
    }
    if !has("tokenizer.json") && !has("char_tokenizer.json") {
        lacks.push("tokenizer.json");
    }
    if !lacks.is_empty() {
        return Err(Error::Config(format!(
            "{}/{}@{}: the cached snapshot {} lacks {}; fetch it with `{}`",
            id.owner,
            id.name,
            id.revision,
            dir.display(),
            lacks.join(", "),
            id.download_command(RepoType::Model)
        )));
    }
    Ok(dir)
}

/// A tokenizer path (a file or a directory): itself when it exists, else the snapshot of the
/// hub model it names, when there is one; otherwise the path as given, for the loader to report.
pub fn resolve_model_or_tokenizer(path: &Path) -> PathBuf {
    match hub_id_of(path) {
        Some(id) => id
            .snapshot(&default_cache_dir(), RepoType::Model)
            .unwrap_or_else(|_| path.to_path_buf()),
        None => path.to_path_buf(),
    }
}

/// A data path: `path` itself when it exists, else the cached snapshot directory of the hub
/// dataset it names (`Owner/Name[@revision]`).
pub fn resolve_dataset(path: &Path) -> Result<PathBuf> {
    resolve_dataset_in(path, &default_cache_dir())
}

pub fn resolve_dataset_in(path: &Path, cache: &Path) -> Result<PathBuf> {
    match hub_id_of(path) {
        Some(id) => id.snapshot(cache, RepoType::Dataset),
        None => Ok(path.to_path_buf()),
    }
}

/// The hub id a path names, when it is not an existing file or directory.
fn hub_id_of(path: &Path) -> Option<HubId> {
    if path.exists() {
        return None;
    }
    HubId::parse(path.to_str()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_follows_the_hub_order() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            cache_dir(&env(&[("HF_HUB_CACHE", "/a"), ("HF_HOME", "/b")])),
            PathBuf::from("/a")
        );
        assert_eq!(
            cache_dir(&env(&[("HF_HOME", "/b"), ("HOME", "/h")])),
            PathBuf::from("/b/hub")
        );
        assert_eq!(
            cache_dir(&env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")])),
            PathBuf::from("/x/huggingface/hub")
        );
        assert_eq!(
            cache_dir(&env(&[("HOME", "/h")])),
            PathBuf::from("/h/.cache/huggingface/hub")
        );
    }

    #[test]
    fn hub_ids_need_an_owner_and_a_name() {
        let id = HubId::parse("Qwen/Qwen2.5-0.5B-Instruct@v1.0").unwrap();
        assert_eq!(
            (id.owner.as_str(), id.name.as_str(), id.revision.as_str()),
            ("Qwen", "Qwen2.5-0.5B-Instruct", "v1.0")
        );
        assert_eq!(HubId::parse("a/b").unwrap().revision, "main");
        for bad in [
            "Qwen2.5", "/x", "a/", "a/b/c", "./a", "../a/b", "a/b@", "runs/x y", "C:/x",
        ] {
            assert_eq!(HubId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn snapshots_resolve_through_refs_or_commits_and_misses_say_how_to_fetch() {
        let cache = std::env::temp_dir().join(format!("sft-hub-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = cache.join("models--Owner--Tiny");
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{commit}\n")).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();

        // Incomplete: the error names what is missing and the command.
        let err = resolve_model_in(Path::new("Owner/Tiny"), &cache)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lacks model.safetensors, tokenizer.json")
                && err.contains("`cargo xtask download Owner/Tiny`"),
            "{err}"
        );
        std::fs::write(snap.join("model.safetensors"), "").unwrap();
        std::fs::write(snap.join("tokenizer.json"), "{}").unwrap();
        assert_eq!(
            resolve_model_in(Path::new("Owner/Tiny"), &cache).unwrap(),
            snap
        );
        let by_commit = format!("Owner/Tiny@{commit}");
        assert_eq!(
            resolve_model_in(Path::new(&by_commit), &cache).unwrap(),
            snap
        );
        let err = resolve_model_in(Path::new("Owner/Tiny@dev"), &cache)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("revision not cached")
                && err.contains("`cargo xtask download Owner/Tiny --revision dev`"),
            "{err}"
        );
        let err = resolve_dataset_in(Path::new("HuggingFaceTB/smoltalk"), &cache)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`cargo xtask download HuggingFaceTB/smoltalk --repo-type dataset`"),
            "{err}"
        );
        // A path that exists is a path, whatever it looks like.
        assert_eq!(resolve_model_in(&cache, &cache).unwrap(), cache);
        std::fs::remove_dir_all(&cache).unwrap();
    }
}
