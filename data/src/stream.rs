//! Records read as they are needed, for data that does not fit in memory (`data.streaming`):
//! JSONL one line at a time; a `.json` array or a `.parquet` file (which cannot be read a line at
//! a time) whole, one file at a time.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::record::{parse_line, skipped};
use crate::{Error, Format, InvalidPolicy, Record, Result, Source};

/// The records of data files, in file and line (or row) order, read lazily. Invalid lines are
/// errors, or under [`InvalidPolicy::Skip`] counted in [`RecordStream::skipped`]; blank lines are
/// counted.
pub struct RecordStream {
    files: Vec<PathBuf>,
    next_file: usize,
    current: Option<(Arc<Path>, BufReader<std::fs::File>, usize)>,
    /// The records of a file read whole (not JSONL), still to hand out.
    whole: std::collections::VecDeque<Record>,
    format: Option<Format>,
    policy: InvalidPolicy,
    line: Vec<u8>,
    /// Invalid lines skipped so far (under `InvalidPolicy::Skip`), with their reasons.
    pub skipped: Vec<(Source, String)>,
    pub blank_lines: usize,
}

impl RecordStream {
    pub fn new(files: Vec<PathBuf>, format: Option<Format>, policy: InvalidPolicy) -> RecordStream {
        RecordStream {
            files,
            next_file: 0,
            current: None,
            whole: Default::default(),
            format,
            policy,
            line: Vec::new(),
            skipped: Vec::new(),
            blank_lines: 0,
        }
    }

    fn next_record(&mut self) -> Result<Option<Record>> {
        loop {
            if let Some(record) = self.whole.pop_front() {
                return Ok(Some(record));
            }
            if self.current.is_none() {
                let Some(path) = self.files.get(self.next_file) else {
                    return Ok(None);
                };
                self.next_file += 1;
                let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
                if !matches!(ext.to_ascii_lowercase().as_str(), "jsonl" | "ndjson") {
                    let read = crate::read_records(path, self.format, self.policy)?;
                    self.skipped.extend(read.skipped);
                    self.blank_lines += read.blank_lines;
                    self.whole = read.records.into();
                    continue;
                }
                let file = std::fs::File::open(path).map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
                self.current = Some((Arc::from(path.as_path()), BufReader::new(file), 0));
            }
            let (path, reader, line_no) = self.current.as_mut().expect("opened above");
            self.line.clear();
            let n = reader
                .read_until(b'\n', &mut self.line)
                .map_err(|source| Error::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
            if n == 0 {
                self.current = None;
                continue;
            }
            *line_no += 1;
            let raw = self.line.strip_suffix(b"\n").unwrap_or(&self.line);
            match parse_line(path, *line_no, raw, self.format) {
                None => self.blank_lines += 1,
                Some(Ok(record)) => return Ok(Some(record)),
                Some(Err(e)) => self.skipped.push(skipped(self.policy, e)?),
            }
        }
    }
}

impl Iterator for RecordStream {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        self.next_record().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_the_records_read_jsonl_reads() {
        let dir = std::env::temp_dir().join(format!("sft-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.jsonl");
        let b = dir.join("b.jsonl");
        std::fs::write(
            &a,
            "{\"text\": \"one\"}\n\n{\"text\": 3}\r\n{\"prompt\": \"p\", \"completion\": \"c\"}",
        )
        .unwrap();
        std::fs::write(&b, "{\"text\": \"two\"}\n").unwrap();
        let streamed: Vec<Record> =
            RecordStream::new(vec![a.clone(), b.clone()], None, InvalidPolicy::Skip)
                .collect::<Result<_>>()
                .unwrap();
        let mut read = crate::read_jsonl(&a, None, InvalidPolicy::Skip).unwrap();
        read.extend(crate::read_jsonl(&b, None, InvalidPolicy::Skip).unwrap());
        assert_eq!(streamed.len(), 3);
        for (s, r) in streamed.iter().zip(&read.records) {
            assert_eq!((&s.sample, s.source.line), (&r.sample, r.source.line));
        }
        let mut strict = RecordStream::new(vec![a], None, InvalidPolicy::Error);
        assert!(strict.next().unwrap().is_ok());
        let err = strict.next().unwrap().unwrap_err().to_string();
        assert!(err.contains("a.jsonl:3"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
