//! `.json` files: one JSON array of records (what `datasets`' `to_json(lines=False)`, pandas'
//! `to_json(orient="records")` and many exports write), read element by element through the same
//! parser as a JSONL line ([`Record::from_json`]).
//!
//! A record's [`Source::line`] is its 1-based position in the array (its "row"), so errors read
//! ``data.json:3: field `messages[1].role`: unknown role "bot"`` for the third element. A `.json`
//! file that holds one object per line (JSONL under another name) is read as JSONL, with real line
//! numbers.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::de::{DeserializeSeed, Deserializer, Error as _, SeqAccess, Visitor};
use serde_json::Value;

use crate::{read_jsonl, Error, Format, InvalidPolicy, ReadOutcome, Record, Result, Source};

/// Reads a `.json` file holding a JSON array of record objects. `format: None` detects the format
/// per element. A file whose first character is `{` is JSONL (one object per line) and is read by
/// [`read_jsonl`]; one object spread over several lines is an error saying so. An empty file has
/// no records.
pub fn read_json_array(
    path: &Path,
    format: Option<Format>,
    policy: InvalidPolicy,
) -> Result<ReadOutcome> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    match text.iter().find(|b| !b.is_ascii_whitespace()) {
        None => Ok(ReadOutcome::default()),
        Some(b'[') => read_array(path, text, format, policy),
        Some(b'{') => {
            // One object over several lines is a single record pretty-printed, not JSONL.
            if serde_json::from_slice::<serde::de::IgnoredAny>(text).is_ok()
                && text.trim_ascii().contains(&b'\n')
            {
                return Err(invalid_data(
                    path,
                    "one JSON object spread over several lines: expected a JSON array of records \
                     or one record per line (JSONL)"
                        .into(),
                ));
            }
            read_jsonl(path, format, policy)
        }
        Some(&b) => Err(invalid_data(
            path,
            format!(
                "expected a JSON array of records or one record per line (JSONL), found {}",
                match b {
                    b'"' => "a string".to_owned(),
                    b'0'..=b'9' | b'-' => "a number".to_owned(),
                    b't' | b'f' => "a boolean".to_owned(),
                    b'n' => "null".to_owned(),
                    other => format!("{:?}", char::from(other)),
                }
            ),
        )),
    }
}

fn read_array(
    path: &Path,
    text: &[u8],
    format: Option<Format>,
    policy: InvalidPolicy,
) -> Result<ReadOutcome> {
    let mut reader = Elements {
        file: Arc::from(path),
        format,
        policy,
        out: ReadOutcome::default(),
        rows: 0,
        stop: None,
    };
    let mut de = serde_json::Deserializer::from_slice(text);
    let parsed = (&mut reader).deserialize(&mut de).and_then(|()| de.end());
    if let Some(e) = reader.stop {
        return Err(e);
    }
    match parsed {
        Ok(()) => Ok(reader.out),
        Err(e) => Err(invalid_data(
            path,
            format!(
                "invalid JSON at line {} column {} (in element {} of the array): {}",
                e.line(),
                e.column(),
                reader.rows + 1,
                strip_position(&e)
            ),
        )),
    }
}

/// Parses the array one element at a time, so only one element's `Value` is alive at once.
struct Elements {
    file: Arc<Path>,
    format: Option<Format>,
    policy: InvalidPolicy,
    out: ReadOutcome,
    /// Elements read so far (the 1-based row of the last one).
    rows: usize,
    /// The error that stopped reading under [`InvalidPolicy::Error`].
    stop: Option<Error>,
}

impl<'de> DeserializeSeed<'de> for &mut Elements {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for &mut Elements {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        while let Some(value) = seq.next_element::<Value>()? {
            self.rows += 1;
            let source = Source {
                file: self.file.clone(),
                line: self.rows,
            };
            let record = Record::from_json(value, self.format, source);
            if let Err(e) = self.out.add(self.policy, record) {
                self.stop = Some(e);
                return Err(A::Error::custom("stopped at an invalid record"));
            }
        }
        Ok(())
    }
}

/// A file that is not what its name says (not JSON, not parquet, ...): an I/O error of kind
/// `InvalidData`, displayed as `path: reason`.
pub(crate) fn invalid_data(path: &Path, reason: String) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
    }
}

/// serde_json's message without its " at line L column C" (reported separately).
fn strip_position(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    msg.strip_suffix(&suffix).map(str::to_owned).unwrap_or(msg)
}
