//! Checkpoint directories: written atomically, rotated, and resumable.
//!
//! A checkpoint is a Hugging Face model directory (`config.json`, `model.safetensors`, tokenizer
//! files) plus `optimizer.safetensors`, `trainer_state.json` and the resolved
//! `train_config.toml`. It is written into a temporary sibling and renamed into place, so a crash
//! mid-save leaves the previous checkpoint untouched.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const CONFIG_FILE: &str = "train_config.toml";
const PREFIX: &str = "checkpoint-";

/// Where a run stands. Every random draw of the run is a pure function of `(seed, epoch, step)`,
/// so this is the whole state needed to continue bit-identically: no data loader is replayed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Steps the schedule was laid out for.
    pub total_steps: u64,
    /// Epoch of the next micro-batch.
    pub epoch: u64,
    /// Index of the next micro-batch within that epoch's plan.
    pub micro_batch: usize,
    pub samples_seen: u64,
    pub tokens_seen: u64,
    pub target_tokens_seen: u64,
    pub seed: u64,
    /// How randomness is derived (documentation for readers of the file).
    pub rng: String,
    /// Hash of the training samples; resuming on different data is refused.
    pub data_fingerprint: String,
    pub best_val_loss: Option<f64>,
    pub best_step: Option<u64>,
    /// The metrics of the last logged step.
    pub last_metrics: Option<serde_json::Value>,
    pub elapsed_s: f64,
    pub sft_version: String,
}

impl TrainerState {
    pub fn read(dir: &Path) -> Result<TrainerState> {
        let path = dir.join(TRAINER_STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(TRAINER_STATE_FILE);
        let text = serde_json::to_string_pretty(self).expect("the state always serialises");
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    }
}

/// The directory name of the checkpoint after `step` optimizer steps.
pub fn checkpoint_name(step: u64) -> String {
    format!("{PREFIX}{step:06}")
}

/// Writes a directory atomically: `fill` writes into a fresh temporary directory next to
/// `target`, which then replaces `target` by rename. On error the temporary is removed and
/// `target` is unchanged.
pub fn write_atomically(target: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("checkpoint");
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    sync_dir_files(&tmp)?;
    // A directory cannot be renamed over a non-empty one: move the old one aside first, and only
    // delete it once the new one is in place.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let had_old = target.exists();
    if had_old {
        std::fs::rename(target, &old).map_err(|e| Error::io(target, e))?;
    }
    if let Err(e) = std::fs::rename(&tmp, target) {
        if had_old {
            let _ = std::fs::rename(&old, target);
        }
        return Err(Error::io(target, e));
    }
    if had_old {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// Flushes every file so the rename never publishes a directory whose contents are still in the
/// page cache only.
fn sync_dir_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_file() {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// `checkpoint-*` directories under `out_dir`, oldest first.
pub fn list_checkpoints(out_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(out_dir) else {
        return Ok(found);
    };
    for entry in entries {
        let path = entry.map_err(|e| Error::io(out_dir, e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(step) = name
            .strip_prefix(PREFIX)
            .and_then(|s| s.parse::<u64>().ok())
        {
            if path.is_dir() {
                found.push((step, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Deletes all but the newest `keep` checkpoints.
pub fn rotate(out_dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let all = list_checkpoints(out_dir)?;
    let n_remove = all.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (_, path) in all.into_iter().take(n_remove) {
        std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        removed.push(path);
    }
    Ok(removed)
}

/// A stable 64-bit FNV-1a hash, printed as hex: fingerprints of data and configs.
pub fn fingerprint(parts: impl IntoIterator<Item = impl AsRef<[u8]>>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.as_ref() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate parts so ["ab", "c"] and ["a", "bc"] differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sft-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_failed_write_leaves_the_previous_checkpoint_intact() {
        let out = tmp("atomic");
        let target = out.join(checkpoint_name(5));
        write_atomically(&target, |d| {
            std::fs::write(d.join("a.txt"), "first").map_err(|e| Error::io(d, e))
        })
        .unwrap();
        let err = write_atomically(&target, |d| {
            std::fs::write(d.join("a.txt"), "half-written").map_err(|e| Error::io(d, e))?;
            Err(Error::Checkpoint("simulated crash".into()))
        })
        .unwrap_err();
        assert!(err.to_string().contains("simulated crash"));
        assert_eq!(
            std::fs::read_to_string(target.join("a.txt")).unwrap(),
            "first"
        );
        // No temporary directories are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
        // Overwriting succeeds and replaces the contents.
        write_atomically(&target, |d| {
            std::fs::write(d.join("b.txt"), "second").map_err(|e| Error::io(d, e))
        })
        .unwrap();
        assert!(!target.join("a.txt").exists());
        assert_eq!(
            std::fs::read_to_string(target.join("b.txt")).unwrap(),
            "second"
        );
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn rotation_keeps_the_newest() {
        let out = tmp("rotate");
        for step in [10, 2, 30, 20] {
            std::fs::create_dir_all(out.join(checkpoint_name(step))).unwrap();
        }
        std::fs::create_dir_all(out.join("best")).unwrap();
        rotate(&out, 2).unwrap();
        let left: Vec<u64> = list_checkpoints(&out)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, vec![20, 30]);
        assert!(out.join("best").exists());
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn state_round_trip_and_fingerprints() {
        let dir = tmp("state");
        std::fs::create_dir_all(&dir).unwrap();
        let state = TrainerState {
            step: 3,
            total_steps: 10,
            epoch: 1,
            micro_batch: 4,
            samples_seen: 24,
            tokens_seen: 1000,
            target_tokens_seen: 400,
            seed: 42,
            rng: "derived".into(),
            data_fingerprint: fingerprint(["a", "b"]),
            best_val_loss: Some(1.5),
            best_step: Some(2),
            last_metrics: None,
            elapsed_s: 1.0,
            sft_version: "0".into(),
        };
        state.write(&dir).unwrap();
        assert_eq!(TrainerState::read(&dir).unwrap(), state);
        assert_ne!(fingerprint(["ab", "c"]), fingerprint(["a", "bc"]));
        assert_eq!(fingerprint(["x"]), fingerprint(["x"]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
