//! Rendered and tokenized data cached on disk, so a re-run or a resumed run skips rendering.
//!
//! The cache lives in `data.cache_dir` (default `run.out_dir/cache`). Its files are keyed by a
//! hash of everything rendering reads: the bytes of every data file, the tokenizer (its canonical
//! JSON), the `[data]` section (template, chat template and its file's text, train_on, max_len,
//! length policy, metadata dropout, validation split), the context length, the seed and this
//! program's version. A change to any of them gives a new key, and files of other keys are
//! removed when a run starts. A file that cannot be read back whole is a miss, never an error:
//! the data is rendered again.
//!
//! Format (little-endian): `SFTPREP1`, the sample count, then per sample its record index (u64),
//! length (u32), ids (u32 each) and loss mask (one byte each); the preflight report beside it as
//! JSON. Hand-written because it is a flat array of integers that must read back exactly.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sft_data::{Prepared, Rendered, Report};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"SFTPREP1";

/// The cache of one run's rendered data.
pub struct PrepCache {
    dir: PathBuf,
    key: String,
}

impl PrepCache {
    /// Opens the cache at `dir` for inputs hashed to `key`, removing files of other keys.
    pub fn open(dir: &Path, key: String) -> Result<PrepCache> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("prepared-") && !name.starts_with(&format!("prepared-{key}-")) {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
        Ok(PrepCache {
            dir: dir.to_path_buf(),
            key,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn paths(&self, tag: &str) -> (PathBuf, PathBuf) {
        let stem = format!("prepared-{}-{tag}", self.key);
        (
            self.dir.join(format!("{stem}.bin")),
            self.dir.join(format!("{stem}.report.json")),
        )
    }

    /// The data stored under `tag` (`train-0`, `validation`), if it reads back whole.
    pub fn load(&self, tag: &str) -> Option<Prepared> {
        let (bin, report) = self.paths(tag);
        let report: Report = serde_json::from_slice(&std::fs::read(report).ok()?).ok()?;
        let mut bytes = Vec::new();
        std::fs::File::open(bin)
            .ok()?
            .read_to_end(&mut bytes)
            .ok()?;
        let samples = decode(&bytes)?;
        (samples.len() == report.kept).then_some(Prepared { samples, report })
    }

    /// Stores `data` under `tag`, atomically (a temporary file renamed into place).
    pub fn store(&self, tag: &str, data: &Prepared) -> Result<()> {
        let (bin, report) = self.paths(tag);
        let tmp = bin.with_extension("bin.tmp");
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = BufWriter::new(file);
        encode(&data.samples, &mut w).map_err(|e| Error::io(&tmp, e))?;
        w.flush().map_err(|e| Error::io(&tmp, e))?;
        drop(w);
        let text = serde_json::to_vec(&data.report).expect("a report always serialises");
        let report_tmp = report.with_extension("json.tmp");
        std::fs::write(&report_tmp, text).map_err(|e| Error::io(&report_tmp, e))?;
        std::fs::rename(&tmp, &bin).map_err(|e| Error::io(&bin, e))?;
        std::fs::rename(&report_tmp, &report).map_err(|e| Error::io(&report, e))
    }
}

fn encode(samples: &[(usize, Rendered)], w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(MAGIC)?;
    w.write_all(&(samples.len() as u64).to_le_bytes())?;
    for (record, r) in samples {
        w.write_all(&(*record as u64).to_le_bytes())?;
        w.write_all(&(r.len() as u32).to_le_bytes())?;
        for id in r.ids() {
            w.write_all(&id.to_le_bytes())?;
        }
        let mask: Vec<u8> = r.loss_mask().iter().map(|&m| u8::from(m)).collect();
        w.write_all(&mask)?;
    }
    Ok(())
}

fn decode(bytes: &[u8]) -> Option<Vec<(usize, Rendered)>> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let slice = bytes.get(at..at.checked_add(n)?)?;
        at += n;
        Some(slice)
    };
    if take(8)? != MAGIC {
        return None;
    }
    let n = u64::from_le_bytes(take(8)?.try_into().ok()?) as usize;
    let mut samples = Vec::with_capacity(n.min(bytes.len() / 13));
    for _ in 0..n {
        let record = u64::from_le_bytes(take(8)?.try_into().ok()?) as usize;
        let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let ids: Vec<u32> = take(len.checked_mul(4)?)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("chunks of 4")))
            .collect();
        let mask: Vec<bool> = take(len)?.iter().map(|&b| b != 0).collect();
        samples.push((record, Rendered::new(ids, mask).ok()?));
    }
    (at == bytes.len()).then_some(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_read_back_exactly_and_damage_is_a_miss() {
        let samples = vec![
            (
                0,
                Rendered::new(vec![1, 2, 3], vec![false, true, true]).unwrap(),
            ),
            (7, Rendered::new(vec![u32::MAX], vec![true]).unwrap()),
        ];
        let mut bytes = Vec::new();
        encode(&samples, &mut bytes).unwrap();
        assert_eq!(decode(&bytes).unwrap(), samples);
        for cut in [0, 7, 8, 20, bytes.len() - 1] {
            assert_eq!(decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), None);
    }
}
