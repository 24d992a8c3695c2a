//! Run metrics: the records written to `metrics.jsonl` and reported to the caller as events.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

/// One optimizer step, as logged (`kind = "train"`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    /// Fractional epoch: epochs completed plus the share of the current one.
    pub epoch: f64,
    /// Mean loss per target token over the step's micro-batches.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Non-padding tokens processed per second since the previous logged step.
    pub tokens_per_s: f64,
    /// Target tokens of this step.
    pub target_tokens: usize,
    /// Non-padding tokens of this step.
    pub tokens: usize,
    /// Positions the model ran on this step, padding included (rows x row length, summed over
    /// micro-batches): `tokens / positions` is how full the rows were.
    pub positions: usize,
    pub elapsed_s: f64,
    /// f16's loss scaling: the scale this step's gradients carried (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// The step's gradients overflowed under loss scaling: no update, the scale halved.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// Data-parallel runs: seconds this step spent summing gradients and counts over the ranks
    /// (absent in one process).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allreduce_s: Option<f64>,
}

/// One evaluation on the validation set (`kind = "eval"`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalMetrics {
    pub step: u64,
    pub epoch: f64,
    pub val_loss: f64,
    pub val_token_accuracy: f64,
    pub val_targets: usize,
    pub elapsed_s: f64,
}

/// Appends JSON lines to `metrics.jsonl`, flushing each so a crashed run keeps its log.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens for appending (a resumed run continues the same file).
    pub fn open(path: &Path) -> Result<MetricsLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, kind: &str, record: &impl Serialize) -> Result<()> {
        let mut value = serde_json::to_value(record).expect("metrics always serialise");
        value
            .as_object_mut()
            .expect("metrics are structs")
            .insert("kind".into(), kind.into());
        writeln!(self.file, "{value}").map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// Rewrites a run's JSON-lines log (`metrics.jsonl`, `samples.jsonl`) for a run resumed at
/// `step`: lines of later steps, which the interrupted run logged after its last checkpoint and
/// the resumed run logs again, are dropped, and so is a line cut short by a kill. Returns how
/// many lines were dropped; a missing file is left missing.
pub fn drop_after(path: &Path, step: u64) -> Result<usize> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0;
    for line in text.split_inclusive('\n') {
        let keep = line.ends_with('\n')
            && serde_json::from_str::<serde_json::Value>(line)
                .is_ok_and(|v| v["step"].as_u64().is_some_and(|s| s <= step));
        if keep {
            kept.push_str(line);
        } else if !line.trim().is_empty() {
            dropped += 1;
        }
    }
    if dropped > 0 {
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, kept).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    }
    Ok(dropped)
}

/// `(step, loss)` points.
pub type Series = Vec<(u64, f64)>;

/// Reads the `(step, loss)` series of a `metrics.jsonl`: train losses and validation losses.
pub fn read_loss_series(path: &Path) -> Result<(Series, Series)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let (mut train, mut val) = (vec![], vec![]);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))?;
        let step = v["step"].as_u64().unwrap_or(0);
        match v["kind"].as_str() {
            Some("train") => train.extend(v["loss"].as_f64().map(|l| (step, l))),
            Some("eval") => val.extend(v["val_loss"].as_f64().map(|l| (step, l))),
            _ => {}
        }
    }
    Ok((train, val))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_read_back_as_series() {
        let dir = std::env::temp_dir().join(format!("sft-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let _ = std::fs::remove_file(&path);
        let mut log = MetricsLog::open(&path).unwrap();
        for step in 1..=3 {
            let m = StepMetrics {
                step,
                epoch: step as f64 / 3.0,
                loss: 4.0 - step as f64,
                lr: 1e-3,
                grad_norm: 1.0,
                tokens_per_s: 100.0,
                target_tokens: 10,
                tokens: 20,
                positions: 32,
                elapsed_s: step as f64,
                loss_scale: None,
                skipped: false,
                allreduce_s: None,
            };
            log.write("train", &m).unwrap();
        }
        let e = EvalMetrics {
            step: 3,
            epoch: 1.0,
            val_loss: 1.25,
            val_token_accuracy: 0.5,
            val_targets: 7,
            elapsed_s: 3.0,
        };
        log.write("eval", &e).unwrap();
        let (train, val) = read_loss_series(&path).unwrap();
        assert_eq!(train, vec![(1, 3.0), (2, 2.0), (3, 1.0)]);
        assert_eq!(val, vec![(3, 1.25)]);
        let first = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .to_owned();
        assert!(first.contains("\"kind\":\"train\"") && first.contains("\"tokens_per_s\""));
        // Resumed at step 2: step 3's lines go, and so does a line a kill cut short.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"step\": 1, \"kind\": \"tr"))
            .unwrap();
        assert_eq!(drop_after(&path, 2).unwrap(), 3);
        let (train, val) = read_loss_series(&path).unwrap();
        assert_eq!(train, vec![(1, 3.0), (2, 2.0)]);
        assert!(val.is_empty());
        assert_eq!(drop_after(&path, 2).unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
