//! Parquet test files written with the `parquet` crate itself (in pyarrow's layout for a
//! `list<struct<role, content>>` column), each with its JSONL twin: for the tests of the parquet
//! reader (`sft-data`) and of hub datasets in training runs (`sft`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The codecs `write_twins` takes, for callers without a `parquet` dependency of their own.
pub use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use serde_json::{json, Map, Value};

pub type Msgs = Option<Vec<(Option<&'static str>, Option<&'static str>)>>;

/// One column of a test file, a value (or null) per row.
pub enum Col {
    Str(&'static str, Vec<Option<&'static str>>),
    Int(&'static str, Vec<Option<i64>>),
    /// `list<struct<role: string, content: string>>`.
    Messages(&'static str, Vec<Msgs>),
}

impl Col {
    pub fn name(&self) -> &'static str {
        match self {
            Col::Str(n, _) | Col::Int(n, _) | Col::Messages(n, _) => n,
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            Col::Str(_, v) => v.len(),
            Col::Int(_, v) => v.len(),
            Col::Messages(_, v) => v.len(),
        }
    }

    pub fn schema(&self) -> String {
        match self {
            Col::Str(n, _) => format!("OPTIONAL BYTE_ARRAY {n} (STRING);"),
            Col::Int(n, _) => format!("OPTIONAL INT64 {n};"),
            Col::Messages(n, _) => format!(
                "OPTIONAL group {n} (LIST) {{ REPEATED group list {{ OPTIONAL group element {{ \
                 OPTIONAL BYTE_ARRAY role (STRING); OPTIONAL BYTE_ARRAY content (STRING); }} }} }}"
            ),
        }
    }

    /// Row `i` as JSONL writes it.
    pub fn json(&self, i: usize) -> Value {
        match self {
            Col::Str(_, v) => v[i].map_or(Value::Null, Value::from),
            Col::Int(_, v) => v[i].map_or(Value::Null, Value::from),
            Col::Messages(_, v) => match &v[i] {
                None => Value::Null,
                Some(msgs) => msgs
                    .iter()
                    .map(|(role, content)| json!({"role": role, "content": content}))
                    .collect(),
            },
        }
    }
}

/// Writes `cols` as a parquet file with row groups of `group_rows` rows, and its JSONL twin
/// (same path, `.jsonl`). Returns both paths.
pub fn write_twins(
    path: &Path,
    cols: &[Col],
    group_rows: usize,
    compression: Compression,
) -> (PathBuf, PathBuf) {
    let n = cols[0].rows();
    let schema: String = cols.iter().map(Col::schema).collect::<Vec<_>>().join(" ");
    let schema = Arc::new(parse_message_type(&format!("message schema {{ {schema} }}")).unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(compression)
            .build(),
    );
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
    for start in (0..n).step_by(group_rows) {
        let rows = start..(start + group_rows).min(n);
        let mut group = writer.next_row_group().unwrap();
        for col in cols {
            match col {
                Col::Str(_, v) => {
                    let mut c = group.next_column().unwrap().unwrap();
                    let (values, defs) = optional(&v[rows.clone()], |s| ByteArray::from(*s));
                    c.typed::<ByteArrayType>()
                        .write_batch(&values, Some(&defs), None)
                        .unwrap();
                    c.close().unwrap();
                }
                Col::Int(_, v) => {
                    let mut c = group.next_column().unwrap().unwrap();
                    let (values, defs) = optional(&v[rows.clone()], |x| *x);
                    c.typed::<Int64Type>()
                        .write_batch(&values, Some(&defs), None)
                        .unwrap();
                    c.close().unwrap();
                }
                Col::Messages(_, v) => {
                    for leaf in 0..2 {
                        // Levels: messages (optional) 1, list (repeated) 2, element (optional)
                        // 3, role/content (optional) 4.
                        let (mut values, mut defs, mut reps) = (Vec::new(), Vec::new(), Vec::new());
                        for msgs in &v[rows.clone()] {
                            match msgs {
                                None => (defs.push(0), reps.push(0)),
                                Some(m) if m.is_empty() => (defs.push(1), reps.push(0)),
                                Some(m) => {
                                    for (j, (role, content)) in m.iter().enumerate() {
                                        reps.push(if j == 0 { 0 } else { 1 });
                                        match if leaf == 0 { role } else { content } {
                                            Some(s) => {
                                                values.push(ByteArray::from(*s));
                                                defs.push(4);
                                            }
                                            None => defs.push(3),
                                        }
                                    }
                                    continue;
                                }
                            };
                        }
                        let mut c = group.next_column().unwrap().unwrap();
                        c.typed::<ByteArrayType>()
                            .write_batch(&values, Some(&defs), Some(&reps))
                            .unwrap();
                        c.close().unwrap();
                    }
                }
            }
        }
        group.close().unwrap();
    }
    writer.close().unwrap();

    let twin = path.with_extension("jsonl");
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let obj: Map<String, Value> = cols
                .iter()
                .map(|c| (c.name().to_owned(), c.json(i)))
                .collect();
            Value::Object(obj).to_string()
        })
        .collect();
    std::fs::write(&twin, lines.join("\n") + "\n").unwrap();
    (path.to_path_buf(), twin)
}

/// The non-null values and the definition levels (1 present, 0 null) of an optional column.
fn optional<T, V>(rows: &[Option<T>], f: impl Fn(&T) -> V) -> (Vec<V>, Vec<i16>) {
    let values = rows.iter().flatten().map(f).collect();
    let defs = rows.iter().map(|r| i16::from(r.is_some())).collect();
    (values, defs)
}
