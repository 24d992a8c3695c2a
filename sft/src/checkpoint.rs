//! Checkpoint directories: written atomically, complete or absent, rotated, resumable.
//!
//! A checkpoint is a Hugging Face model directory (`config.json`, `model.safetensors`, tokenizer
//! files) plus `optimizer.safetensors`, `trainer_state.json`, the resolved `train_config.toml`
//! and, written last, `sft_manifest.json` (every file with its size). It is written into a
//! hidden temporary sibling and renamed into place, so a crash mid-save leaves the previous
//! checkpoint untouched; an old checkpoint is renamed to a hidden name before it is deleted, so a
//! crash mid-deletion never leaves a partial directory under a `checkpoint-*` name. Hidden
//! leftovers of a crashed run are cleaned when the next run starts ([`clean_leftovers`]).
//!
//! A checkpoint stands alone: nothing in it refers to the directory the run started or resumed
//! from (the tokenizer's files are written from memory).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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
    /// The dtype exports are written in, resolved when the run started (from the base
    /// checkpoint's `config.json` unless `model.save_dtype` says), so a resumed run needs
    /// nothing from the base directory.
    #[serde(default)]
    pub save_dtype: Option<String>,
    /// Seconds spent in the training loop, over all resumptions (`train.max_time`'s clock).
    #[serde(default)]
    pub train_s: f64,
    /// Evaluations in a row without improvement (`train.early_stopping`).
    #[serde(default)]
    pub evals_without_improvement: u64,
    /// Data-parallel ranks the run trains with (`mpirun -np N`): each optimizer step takes
    /// `ranks x batch_size x grad_accum` rows, so a resume must use the same count. Written
    /// only when it is not 1.
    #[serde(default = "one_rank", skip_serializing_if = "is_one_rank")]
    pub ranks: usize,
}

fn one_rank() -> usize {
    1
}

fn is_one_rank(ranks: &usize) -> bool {
    *ranks == 1
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

/// Writes a directory atomically: `fill` writes into a fresh hidden directory next to `target`,
/// a manifest of what it wrote is added last, and the directory then replaces `target` by
/// rename. On error the temporary is removed and `target` is unchanged.
pub fn write_atomically(target: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("checkpoint");
    let tmp = parent.join(hidden_name(name, Leftover::Tmp));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let filled = fill(&tmp).and_then(|()| {
        sync_dir_files(&tmp)?;
        write_manifest(&tmp, concat!("sft ", env!("CARGO_PKG_VERSION")))?;
        Ok(())
    });
    if let Err(e) = filled {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // A directory cannot be renamed over a non-empty one: move the old one aside first, and only
    // delete it once the new one is in place (a crash in between leaves the old one hidden,
    // where `clean_leftovers` puts it back).
    let old = parent.join(hidden_name(name, Leftover::Old));
    let had_old = target.exists();
    if had_old {
        std::fs::rename(target, &old).map_err(|e| Error::io(target, e))?;
    }
    if let Err(e) = std::fs::rename(&tmp, target) {
        if had_old {
            let _ = std::fs::rename(&old, target);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::io(target, e));
    }
    sync_dir(parent)?;
    if had_old {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

fn write_manifest(dir: &Path, written_by: &str) -> Result<()> {
    Ok(sft_model::manifest::write_manifest(dir, written_by)?)
}

/// The hidden names a run gives directories in passing; the process id keeps two runs' apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leftover {
    /// Being written.
    Tmp,
    /// Replaced, about to be deleted.
    Old,
    /// Rotated away, being deleted.
    Deleting,
}

impl Leftover {
    const ALL: [Leftover; 3] = [Leftover::Tmp, Leftover::Old, Leftover::Deleting];

    fn tag(self) -> &'static str {
        match self {
            Leftover::Tmp => "tmp",
            Leftover::Old => "old",
            Leftover::Deleting => "deleting",
        }
    }
}

fn hidden_name(name: &str, kind: Leftover) -> String {
    format!(".{name}.{}-{}", kind.tag(), std::process::id())
}

/// `.NAME.KIND-PID` -> `(NAME, KIND)`.
fn parse_hidden(file_name: &str) -> Option<(&str, Leftover)> {
    let rest = file_name.strip_prefix('.')?;
    let (head, pid) = rest.rsplit_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (name, tag) = head.rsplit_once('.')?;
    let kind = Leftover::ALL.into_iter().find(|k| k.tag() == tag)?;
    (!name.is_empty()).then_some((name, kind))
}

/// What [`clean_leftovers`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Cleaned {
    /// Half-written or half-deleted directories removed.
    pub removed: Vec<PathBuf>,
    /// Directories a crash had moved aside just before their replacement landed, put back.
    pub restored: Vec<PathBuf>,
}

/// Removes the hidden directories a killed run leaves in `out_dir` (a save or a deletion cut
/// short), and puts back a replaced directory (`best/`, `final/`) whose replacement never landed.
/// Call it at the start of a run, before anything reads the checkpoints.
pub fn clean_leftovers(out_dir: &Path) -> Result<Cleaned> {
    let mut cleaned = Cleaned::default();
    let Ok(entries) = std::fs::read_dir(out_dir) else {
        return Ok(cleaned);
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(out_dir, e))?.path();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some((name, kind)) = parse_hidden(file_name) {
            if path.is_dir() {
                found.push((name.to_string(), kind, path.clone()));
            }
        }
    }
    found.sort_by(|a, b| a.2.cmp(&b.2));
    for (name, kind, path) in found {
        let target = out_dir.join(&name);
        if kind == Leftover::Old
            && !target.exists()
            && sft_model::manifest::check_complete(&path).is_ok()
        {
            std::fs::rename(&path, &target).map_err(|e| Error::io(&path, e))?;
            cleaned.restored.push(target);
        } else {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
            cleaned.removed.push(path);
        }
    }
    Ok(cleaned)
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

/// Makes a rename inside `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
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

/// Deletes all but the newest `keep` checkpoints. Each is first renamed to a hidden name, so a
/// crash mid-deletion leaves no partial directory under a `checkpoint-*` name.
pub fn rotate(out_dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let all = list_checkpoints(out_dir)?;
    let n_remove = all.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (_, path) in all.into_iter().take(n_remove) {
        remove_dir(&path)?;
        removed.push(path);
    }
    Ok(removed)
}

/// Deletes a checkpoint (or `best/`, `final/`) directory by first renaming it to a hidden name,
/// so that a crash mid-deletion leaves nothing partial under its own name.
pub fn remove_dir(path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Checkpoint(format!("{}: not a named directory", path.display())))?;
    let doomed = path.with_file_name(hidden_name(name, Leftover::Deleting));
    std::fs::rename(path, &doomed).map_err(|e| Error::io(path, e))?;
    std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))
}

/// Files a checkpoint must hold to resume from, as alternatives (any one of a group will do).
const RESUME_FILES: &[&[&str]] = &[
    &["config.json", sft_model::ADAPTER_CONFIG_FILE],
    &[
        "model.safetensors",
        "model.safetensors.index.json",
        sft_model::ADAPTER_WEIGHTS_FILE,
    ],
    &["tokenizer.json", "char_tokenizer.json"],
    &[OPTIMIZER_FILE],
    &[TRAINER_STATE_FILE],
    &[CONFIG_FILE],
];

/// Checks that `dir` is a complete checkpoint to resume from: its manifest's files are all
/// there, and so is every file resuming reads. The error names what is missing, on one line.
pub fn check_resumable(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::Checkpoint(format!(
            "{}: no such directory",
            dir.display()
        )));
    }
    sft_model::manifest::check_complete(dir)?;
    let missing: Vec<String> = RESUME_FILES
        .iter()
        .filter(|group| !group.iter().any(|f| dir.join(f).is_file()))
        .map(|group| group.join(" or "))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Checkpoint(format!(
            "{}: incomplete checkpoint: {} missing",
            dir.display(),
            missing.join(", ")
        )));
    }
    Ok(())
}

/// What `--resume PATH` resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct ResumeFrom {
    /// The checkpoint to continue from.
    pub checkpoint: PathBuf,
    /// `PATH` was a run directory; its newest complete checkpoint was chosen.
    pub from_run_dir: bool,
    /// Newer checkpoints of that run directory passed over, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// `--resume PATH`: a checkpoint directory, or a run directory (`run.out_dir`), whose newest
/// complete checkpoint is taken, as `resume_from_checkpoint=True` does in `transformers`.
pub fn resolve_resume(path: &Path) -> Result<ResumeFrom> {
    let is_checkpoint = path.join(TRAINER_STATE_FILE).is_file()
        || sft_model::manifest::has_manifest(path)
        || path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(PREFIX));
    if is_checkpoint {
        check_resumable(path)?;
        return Ok(ResumeFrom {
            checkpoint: path.to_path_buf(),
            from_run_dir: false,
            skipped: vec![],
        });
    }
    let all = list_checkpoints(path)?;
    let mut skipped = Vec::new();
    for (_, dir) in all.into_iter().rev() {
        match check_resumable(&dir) {
            Ok(()) => {
                return Ok(ResumeFrom {
                    checkpoint: dir,
                    from_run_dir: true,
                    skipped,
                })
            }
            Err(e) => skipped.push((dir, e.to_string())),
        }
    }
    Err(Error::Checkpoint(format!(
        "{}: no complete checkpoint to resume from{}",
        path.display(),
        if skipped.is_empty() {
            " (neither a checkpoint nor a run directory with checkpoint-* directories)".to_string()
        } else {
            format!(" ({} incomplete ones passed over)", skipped.len())
        }
    )))
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
    fn leftovers_of_a_crash_are_removed_or_put_back() {
        assert_eq!(
            parse_hidden(".checkpoint-000004.tmp-123"),
            Some(("checkpoint-000004", Leftover::Tmp))
        );
        assert_eq!(parse_hidden(".best.old-9"), Some(("best", Leftover::Old)));
        for not_ours in [
            ".git",
            ".checkpoint-1.tmp-",
            ".x.tmp-12a",
            "checkpoint-1.tmp-1",
            "..old-1",
        ] {
            assert_eq!(parse_hidden(not_ours), None, "{not_ours}");
        }
        let out = tmp("leftovers");
        // A save cut short, a rotation cut short, and a `best/` moved aside whose replacement
        // never landed; plus a hidden directory that is not ours.
        for d in [
            ".checkpoint-000006.tmp-77",
            ".checkpoint-000002.deleting-77",
            ".mine",
        ] {
            std::fs::create_dir_all(out.join(d)).unwrap();
        }
        let old_best = out.join(".best.old-77");
        std::fs::create_dir_all(&old_best).unwrap();
        std::fs::write(old_best.join("config.json"), "{}").unwrap();
        sft_model::manifest::write_manifest(&old_best, "test").unwrap();
        // A moved-aside `final/` that is incomplete is not put back.
        let old_final = out.join(".final.old-77");
        std::fs::create_dir_all(&old_final).unwrap();
        std::fs::write(old_final.join("config.json"), "{}").unwrap();
        sft_model::manifest::write_manifest(&old_final, "test").unwrap();
        std::fs::remove_file(old_final.join("config.json")).unwrap();
        let cleaned = clean_leftovers(&out).unwrap();
        assert_eq!(cleaned.restored, vec![out.join("best")]);
        assert_eq!(cleaned.removed.len(), 3);
        let mut left: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".mine", "best"]);
        assert_eq!(clean_leftovers(&out).unwrap(), Cleaned::default());
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
            save_dtype: Some("bf16".into()),
            train_s: 0.5,
            evals_without_improvement: 1,
            ranks: 2,
        };
        state.write(&dir).unwrap();
        assert_eq!(TrainerState::read(&dir).unwrap(), state);
        assert_ne!(fingerprint(["ab", "c"]), fingerprint(["a", "bc"]));
        assert_eq!(fingerprint(["x"]), fingerprint(["x"]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
