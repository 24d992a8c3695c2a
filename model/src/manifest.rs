//! Whether a checkpoint directory is complete: `sft_manifest.json`, written last into a
//! checkpoint before it is renamed into place, lists every file with its size.
//!
//! Directories without a manifest (hub downloads, `transformers`' own saves) are taken as they
//! are; a directory with one must hold every file it lists, at its listed size. A checkpoint is
//! thereby complete or recognisably not: a kill between two writes can never pass for a
//! finished save.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const MANIFEST_FILE: &str = "sft_manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    /// The program that wrote the directory (for readers of the file).
    written_by: String,
    /// Every regular file of the directory but the manifest, with its size in bytes.
    files: BTreeMap<String, u64>,
}

/// Lists every file of `dir` in its manifest. Call it last, once everything else is written.
pub fn write_manifest(dir: &Path, written_by: &str) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let meta = entry.metadata().map_err(io(&entry.path()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if meta.is_file() && name != MANIFEST_FILE {
            files.insert(name, meta.len());
        }
    }
    let manifest = Manifest {
        written_by: written_by.into(),
        files,
    };
    let path = dir.join(MANIFEST_FILE);
    let text = serde_json::to_string_pretty(&manifest).expect("a manifest always serialises");
    std::fs::write(&path, text).map_err(io(&path))?;
    std::fs::File::open(&path)
        .and_then(|f| f.sync_all())
        .map_err(io(&path))
}

/// Whether `dir` has a manifest at all.
pub fn has_manifest(dir: &Path) -> bool {
    dir.join(MANIFEST_FILE).is_file()
}

/// Checks `dir` against its manifest, if it has one: an error names every listed file that is
/// missing or of another size.
pub fn check_complete(dir: &Path) -> Result<()> {
    let path = dir.join(MANIFEST_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(Error::Io { path, source }),
    };
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: path.clone(),
        reason: format!("unreadable manifest: {e}"),
    })?;
    let mut problems = Vec::new();
    for (name, &size) in &manifest.files {
        match std::fs::metadata(dir.join(name)) {
            Ok(meta) if meta.is_file() && meta.len() == size => {}
            Ok(meta) if meta.is_file() => {
                problems.push(format!("{name} ({} bytes, expected {size})", meta.len()))
            }
            _ => problems.push(format!("{name} missing")),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Incomplete {
            dir: dir.to_path_buf(),
            what: problems.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_names_what_went_missing() {
        let dir = std::env::temp_dir().join(format!("sft-manifest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // No manifest: taken as it is.
        check_complete(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{\"model\": 1}").unwrap();
        std::fs::write(dir.join("model.safetensors"), [0u8; 16]).unwrap();
        write_manifest(&dir, "test").unwrap();
        assert!(has_manifest(&dir));
        check_complete(&dir).unwrap();
        std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
        std::fs::write(dir.join("model.safetensors"), [0u8; 8]).unwrap();
        let err = check_complete(&dir).unwrap_err().to_string();
        assert!(
            err.contains("incomplete checkpoint")
                && err.contains("tokenizer.json missing")
                && err.contains("model.safetensors (8 bytes, expected 16)")
                && !err.contains('\n'),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
