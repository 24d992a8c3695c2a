//! `.parquet` files -> records.
//!
//! - [`read_parquet`]: a parquet file, read row group by row group with the `parquet` crate's
//!   record API (no arrow). Each row becomes a JSON object (strings, numbers, booleans, nulls;
//!   lists become arrays, structs and maps objects, so a
//!   `messages: list<struct<role: string, content: string>>` column is an array of message
//!   objects) and is parsed exactly as a JSONL line is ([`Record::from_json`]): same format
//!   detection from the column names, same validation, same errors. A record's [`Source::line`]
//!   is its 1-based row over the whole file, so ``train.parquet:17: field `messages[1].role`:
//!   unknown role "bot"`` is row 17.
//!
//! Binary columns are read as strings when they are UTF-8; other binary values (images, audio)
//! become `{"non_utf8_bytes": N}`, so using one as a text field is an error, not garbage. NaN and
//! infinite floats become `null`; decimals, dates and timestamps become strings.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

use ::parquet::file::reader::{FileReader, SerializedFileReader};
use ::parquet::record::{Field, Row};
use bytes::Bytes;
use rayon::prelude::*;
use serde_json::{Map, Number, Value};

use crate::json::invalid_data;
use crate::{Error, Format, InvalidPolicy, ReadOutcome, Record, Result, Source};

/// Rows decoded before they are converted and parsed (in parallel): bounds memory whatever the
/// row group size.
const CHUNK_ROWS: usize = 2048;

/// Reads a parquet file. `format: None` detects the format per row from the column names, as for
/// JSONL. Rows are numbered from 1 over the whole file (across row groups). A file that is not
/// parquet, is truncated or cannot be decoded is an error naming the file (never a panic).
///
/// The file is read into memory (compressed, it is smaller than the records made from it; JSONL
/// files are read whole too), so row groups are decoded in parallel; within a row group, rows
/// are decoded [`CHUNK_ROWS`] at a time and parsed in parallel.
pub fn read_parquet(
    path: &Path,
    format: Option<Format>,
    policy: InvalidPolicy,
) -> Result<ReadOutcome> {
    let data = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = guard(path, "reading the parquet footer", || {
        SerializedFileReader::new(Bytes::from(data))
    })?;
    // The first row of each row group, from the footer.
    let mut firsts = Vec::with_capacity(reader.num_row_groups());
    let mut total = 0usize;
    for g in 0..reader.num_row_groups() {
        let rows = usize::try_from(reader.metadata().row_group(g).num_rows()).map_err(|_| {
            invalid_data(
                path,
                format!("not a readable parquet file: row group {g} has a negative row count"),
            )
        })?;
        firsts.push(total);
        total = total.saturating_add(rows);
    }
    firsts.push(total);
    let file: Arc<Path> = Arc::from(path);
    let groups: Vec<Result<Vec<Result<Record>>>> = (0..reader.num_row_groups())
        .into_par_iter()
        .map(|g| {
            read_group(
                &reader,
                &file,
                g,
                firsts[g],
                firsts[g + 1] - firsts[g],
                format,
            )
        })
        .collect();
    let mut out = ReadOutcome::default();
    for group in groups {
        for record in group? {
            out.add(policy, record)?;
        }
    }
    Ok(out)
}

/// Decodes and parses row group `g`, whose rows are `first + 1 ..= first + rows` of the file.
fn read_group(
    reader: &SerializedFileReader<Bytes>,
    file: &Arc<Path>,
    g: usize,
    first: usize,
    rows: usize,
    format: Option<Format>,
) -> Result<Vec<Result<Record>>> {
    let what = format!("reading row group {g}");
    let group = guard(file, &what, || reader.get_row_group(g))?;
    let mut iter = guard(file, &what, || group.get_row_iter(None))?;
    let mut records = Vec::with_capacity(rows);
    let mut chunk: Vec<Row> = Vec::with_capacity(CHUNK_ROWS.min(rows));
    loop {
        let row = guard(file, &what, || iter.next().transpose())?;
        let done = row.is_none();
        chunk.extend(row);
        if done || chunk.len() == CHUNK_ROWS {
            let before = first + records.len();
            records.par_extend(chunk.par_drain(..).enumerate().map(|(i, row)| {
                let source = Source {
                    file: file.clone(),
                    line: before + i + 1,
                };
                Record::from_json(row_json(row), format, source)
            }));
        }
        if done {
            break;
        }
    }
    if records.len() != rows {
        return Err(invalid_data(
            file,
            format!(
                "not a readable parquet file ({what}): {} rows decoded, the footer says {rows}",
                records.len()
            ),
        ));
    }
    Ok(records)
}

/// Runs one step of the parquet decoder, turning its error, or its panic on a malformed file,
/// into an error naming the file.
fn guard<T>(
    path: &Path,
    what: &str,
    step: impl FnOnce() -> ::parquet::errors::Result<T>,
) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(step)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            let e = e.to_string();
            let e = e.strip_prefix("Parquet error: ").unwrap_or(&e);
            Err(invalid_data(
                path,
                format!("not a readable parquet file ({what}): {e}"),
            ))
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(invalid_data(
                path,
                format!("not a readable parquet file ({what}): the decoder failed: {msg}"),
            ))
        }
    }
}

/// One row (or struct) as a JSON object, columns in schema order.
fn row_json(row: Row) -> Value {
    Value::Object(
        row.into_columns()
            .into_iter()
            .map(|(name, field)| (name, owned_json(field)))
            .collect(),
    )
}

/// [`field_json`] without copying top-level strings and structs.
fn owned_json(field: Field) -> Value {
    match field {
        Field::Str(s) => Value::String(s),
        Field::Group(row) => row_json(row),
        other => field_json(&other),
    }
}

fn field_json(field: &Field) -> Value {
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => (*n).into(),
        Field::Short(n) => (*n).into(),
        Field::Int(n) => (*n).into(),
        Field::Long(n) => (*n).into(),
        Field::UByte(n) => (*n).into(),
        Field::UShort(n) => (*n).into(),
        Field::UInt(n) => (*n).into(),
        Field::ULong(n) => (*n).into(),
        Field::Float16(x) => float(f64::from(*x)),
        Field::Float(x) => float(f64::from(*x)),
        Field::Double(x) => float(*x),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_owned()),
            Err(_) => {
                let mut m = Map::new();
                m.insert("non_utf8_bytes".into(), b.len().into());
                Value::Object(m)
            }
        },
        Field::Group(row) => Value::Object(
            row.get_column_iter()
                .map(|(name, f)| (name.clone(), field_json(f)))
                .collect(),
        ),
        Field::ListInternal(list) => Value::Array(list.elements().iter().map(field_json).collect()),
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Field::Str(s) => s.clone(),
                        other => match field_json(other) {
                            Value::String(s) => s,
                            v => v.to_string(),
                        },
                    };
                    (key, field_json(v))
                })
                .collect(),
        ),
        // Decimals, dates, times and timestamps: as parquet's own display writes them.
        other => Value::String(other.to_string()),
    }
}

fn float(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}
