//! Parquet files, `.json` arrays and hub dataset directories read as the same records as their
//! JSONL twins. The parquet files are written here with the `parquet` crate itself, in the layout
//! pyarrow (and so `datasets`) writes: optional columns, 3-level lists of structs.

use std::path::{Path, PathBuf};

use parquet::basic::{Compression, GzipLevel, ZstdLevel};
use serde_json::{json, Value};
use sft_data::{
    dataset_files, prepare, read_json_array, read_jsonl, read_parquet, read_records, Error, Format,
    InvalidPolicy, ReadOutcome, RenderOptions, Rendered, Template, TemplateChoice,
};
use sft_tests::parquet::{write_twins, Col};
use sft_tokenizer::Tokenizer;

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sft-data-parquet-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn messages_cols() -> Vec<Col> {
    vec![
        Col::Messages(
            "messages",
            vec![
                Some(vec![
                    (Some("user"), Some("What is 2 + 2?")),
                    (Some("assistant"), Some("4")),
                ]),
                Some(vec![
                    (Some("system"), Some("You are terse.")),
                    (Some("user"), Some("Name a colour.")),
                    (Some("assistant"), Some("Blue.")),
                    (Some("user"), Some("Another?")),
                    (Some("assistant"), Some("Red.")),
                ]),
                Some(vec![
                    (Some("user"), Some("翻译：猫")),
                    (Some("assistant"), Some("cat")),
                ]),
                Some(vec![
                    (Some("user"), Some("Say hi")),
                    (Some("assistant"), Some("Hi!\n\nHow can I help?")),
                ]),
                Some(vec![
                    (Some("user"), Some("Empty system next")),
                    (Some("assistant"), Some("ok")),
                ]),
            ],
        ),
        Col::Str(
            "source",
            vec![Some("a"), None, Some("b"), Some("c"), Some("d")],
        ),
        Col::Int("id", vec![Some(1), Some(2), None, Some(4), Some(5)]),
    ]
}

fn prompt_completion_cols() -> Vec<Col> {
    vec![
        Col::Str(
            "prompt",
            vec![Some("The capital of France is"), Some("2 + 2 ="), Some("")],
        ),
        Col::Str(
            "completion",
            vec![Some(" Paris."), Some(" 4"), Some("Once upon a time")],
        ),
    ]
}

fn alpaca_cols() -> Vec<Col> {
    vec![
        Col::Str(
            "instruction",
            vec![Some("Translate to French"), Some("Add"), Some("Greet")],
        ),
        Col::Str("input", vec![Some("cat"), Some("2 and 3"), None]),
        Col::Str("output", vec![Some("chat"), Some("5"), Some("Hello!")]),
        Col::Str("system", vec![None, Some("Be exact."), None]),
    ]
}

fn qwen() -> Tokenizer {
    Tokenizer::from_path(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/qwen3-tokenizer"),
    )
    .unwrap()
}

/// The records' contents and rows, without their file names.
fn contents(read: &ReadOutcome) -> Vec<(sft_data::Sample, Format, usize)> {
    read.records
        .iter()
        .map(|r| (r.sample.clone(), r.format, r.source.line))
        .collect()
}

fn rendered(read: &ReadOutcome, tok: &Tokenizer) -> Vec<(usize, Rendered)> {
    let template = Template::new(TemplateChoice::Auto, tok).unwrap();
    prepare(read, &template, tok, &RenderOptions::default(), 0)
        .unwrap()
        .samples
}

/// Each format's parquet file reads as the same records as its JSONL twin, and renders to
/// identical ids and masks.
#[test]
fn parquet_and_jsonl_twins_give_identical_records_ids_and_masks() {
    let dir = scratch("twins");
    let tok = qwen();
    let cases = [
        (
            "messages",
            messages_cols(),
            2,
            Compression::SNAPPY,
            Format::Messages,
        ),
        (
            "prompt_completion",
            prompt_completion_cols(),
            2,
            Compression::ZSTD(ZstdLevel::default()),
            Format::PromptCompletion,
        ),
        (
            "alpaca",
            alpaca_cols(),
            10,
            Compression::GZIP(GzipLevel::default()),
            Format::Alpaca,
        ),
        (
            "lz4",
            prompt_completion_cols(),
            1,
            Compression::LZ4_RAW,
            Format::PromptCompletion,
        ),
    ];
    for (name, cols, group_rows, compression, format) in cases {
        let (pq, jsonl) = write_twins(
            &dir.join(format!("{name}.parquet")),
            &cols,
            group_rows,
            compression,
        );
        let from_pq = read_records(&pq, None, InvalidPolicy::Error).unwrap();
        let from_jsonl = read_records(&jsonl, None, InvalidPolicy::Error).unwrap();
        assert_eq!(from_pq.records.len(), cols[0].rows(), "{name}");
        assert_eq!(contents(&from_pq), contents(&from_jsonl), "{name}");
        assert_eq!(from_pq.per_format, from_jsonl.per_format, "{name}");
        assert!(from_pq.records.iter().all(|r| r.format == format), "{name}");
        assert!(from_pq
            .records
            .iter()
            .all(|r| &*r.source.file == pq.as_path()));
        let (a, b) = (rendered(&from_pq, &tok), rendered(&from_jsonl, &tok));
        assert_eq!(a.len(), cols[0].rows(), "{name}");
        assert_eq!(a, b, "{name}: ids and masks differ");
        // A forced format reads the same.
        let forced = read_parquet(&pq, Some(format), InvalidPolicy::Error).unwrap();
        assert_eq!(contents(&forced), contents(&from_pq), "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_rows_name_file_row_and_field() {
    let dir = scratch("bad");
    // Row 3 (the first of the second row group) has an unknown role; row 5 an assistant turn
    // without content.
    let mut cols = messages_cols();
    let Col::Messages(_, rows) = &mut cols[0] else {
        unreachable!()
    };
    rows[2] = Some(vec![(Some("user"), Some("q")), (Some("bot"), Some("a"))]);
    rows[4] = Some(vec![(Some("user"), Some("q")), (Some("assistant"), None)]);
    let (pq, _) = write_twins(&dir.join("bad.parquet"), &cols, 2, Compression::SNAPPY);
    let e = read_records(&pq, None, InvalidPolicy::Error).unwrap_err();
    match &e {
        Error::Record {
            file, line, field, ..
        } => {
            assert_eq!(&**file, pq.as_path());
            assert_eq!(*line, 3);
            assert_eq!(field.as_deref(), Some("messages[1].role"));
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!(
            "{}:3: field `messages[1].role`: unknown role \"bot\"",
            pq.display()
        )),
        "{msg}"
    );

    let out = read_records(&pq, None, InvalidPolicy::Skip).unwrap();
    assert_eq!(out.records.len(), 3);
    let skipped: Vec<(usize, &str)> = out
        .skipped
        .iter()
        .map(|(s, r)| (s.line, r.as_str()))
        .collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[0].0, 3);
    assert!(skipped[0]
        .1
        .starts_with("field `messages[1].role`: unknown role"));
    assert_eq!(skipped[1].0, 5);
    assert!(
        skipped[1].1.starts_with("field `messages[1].content`"),
        "{}",
        skipped[1].1
    );
    assert!(out.skipped.iter().all(|(s, _)| &*s.file == pq.as_path()));
    // Rows keep their numbers over the whole file.
    let lines: Vec<usize> = out.records.iter().map(|r| r.source.line).collect();
    assert_eq!(lines, [1, 2, 4]);

    // A column of the wrong type: `completion` holds numbers.
    let cols = vec![
        Col::Str("prompt", vec![Some("a"), Some("b")]),
        Col::Int("completion", vec![Some(1), Some(2)]),
    ];
    let (pq, _) = write_twins(&dir.join("typed.parquet"), &cols, 10, Compression::SNAPPY);
    let e = read_records(&pq, None, InvalidPolicy::Error).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}:1: field `completion`: expected a string, found a number",
            pq.display()
        )
    );

    // No known column: the error lists the columns found.
    let cols = vec![
        Col::Str("question", vec![Some("a")]),
        Col::Str("answer", vec![Some("b")]),
    ];
    let (pq, _) = write_twins(&dir.join("unknown.parquet"), &cols, 10, Compression::SNAPPY);
    let msg = read_records(&pq, None, InvalidPolicy::Error)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(":1: no known record format") && msg.contains("question, answer"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_parquet_files_are_errors_naming_the_file() {
    let dir = scratch("corrupt");
    let (pq, jsonl) = write_twins(
        &dir.join("good.parquet"),
        &messages_cols(),
        2,
        Compression::SNAPPY,
    );
    let bytes = std::fs::read(&pq).unwrap();

    let truncated = dir.join("truncated.parquet");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let msg = read_records(&truncated, None, InvalidPolicy::Error)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(&format!(
            "{}: not a readable parquet file",
            truncated.display()
        )),
        "{msg}"
    );

    // A JSONL file named .parquet.
    let renamed = dir.join("renamed.parquet");
    std::fs::copy(&jsonl, &renamed).unwrap();
    let msg = read_parquet(&renamed, None, InvalidPolicy::Skip)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(&format!("{}: ", renamed.display())),
        "{msg}"
    );

    let empty = dir.join("empty.parquet");
    std::fs::write(&empty, b"").unwrap();
    let msg = read_parquet(&empty, None, InvalidPolicy::Error)
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with(&format!("{}: ", empty.display())), "{msg}");

    // Every byte flipped in turn (pages, page headers, footer): an error naming the file, or
    // rows, but never a panic escaping (the decoder does panic on some damaged footers).
    let path = dir.join("damaged.parquet");
    let mut errors = 0;
    for at in 4..bytes.len() - 8 {
        let mut damaged = bytes.clone();
        damaged[at] = !damaged[at];
        std::fs::write(&path, &damaged).unwrap();
        if let Err(e) = read_parquet(&path, None, InvalidPolicy::Skip) {
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("{}: not a readable parquet file", path.display())),
                "{msg}"
            );
            errors += 1;
        }
    }
    assert!(errors > 0);

    let missing = dir.join("missing.parquet");
    let msg = read_records(&missing, None, InvalidPolicy::Error)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(&format!("{}: ", missing.display())),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn json_arrays_read_like_jsonl() {
    let dir = scratch("json");
    let (_, jsonl) = write_twins(
        &dir.join("chat.parquet"),
        &messages_cols(),
        10,
        Compression::SNAPPY,
    );
    let from_jsonl = read_jsonl(&jsonl, None, InvalidPolicy::Error).unwrap();
    let values: Vec<Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    // Pretty-printed, as `json.dump(..., indent=2)` writes.
    let array = dir.join("chat.json");
    std::fs::write(&array, serde_json::to_string_pretty(&values).unwrap()).unwrap();
    let from_array = read_records(&array, None, InvalidPolicy::Error).unwrap();
    assert_eq!(contents(&from_array), contents(&from_jsonl));
    assert!(from_array
        .records
        .iter()
        .all(|r| &*r.source.file == array.as_path()));

    // A bad element is named by its 1-based position.
    let mut bad = values.clone();
    bad[1]["messages"][0]["role"] = json!("bot");
    bad[3]["messages"] = json!("not a list");
    let bad_path = dir.join("bad.json");
    std::fs::write(&bad_path, serde_json::to_string(&bad).unwrap()).unwrap();
    let msg = read_json_array(&bad_path, None, InvalidPolicy::Error)
        .unwrap_err()
        .to_string();
    assert_eq!(
        msg,
        format!(
            "{}:2: field `messages[0].role`: unknown role \"bot\" (expected system, user, assistant or tool)",
            bad_path.display()
        )
    );
    let out = read_json_array(&bad_path, None, InvalidPolicy::Skip).unwrap();
    assert_eq!(out.records.len(), 3);
    let rows: Vec<usize> = out.skipped.iter().map(|(s, _)| s.line).collect();
    assert_eq!(rows, [2, 4]);
    assert!(out.skipped[1]
        .1
        .contains("field `messages`: expected an array"));

    // JSONL under a .json name is read as JSONL.
    let lines = dir.join("lines.json");
    std::fs::copy(&jsonl, &lines).unwrap();
    let from_lines = read_records(&lines, None, InvalidPolicy::Error).unwrap();
    assert_eq!(contents(&from_lines), contents(&from_jsonl));

    // One pretty-printed object is neither.
    let single = dir.join("single.json");
    std::fs::write(&single, serde_json::to_string_pretty(&values[0]).unwrap()).unwrap();
    let msg = read_records(&single, None, InvalidPolicy::Error)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("one JSON object spread over several lines"),
        "{msg}"
    );

    // Broken JSON: file, line and column, and the element it was in.
    let broken = dir.join("broken.json");
    std::fs::write(
        &broken,
        "[\n  {\"text\": \"a\"},\n  {\"text\": \"b\",,}\n]\n",
    )
    .unwrap();
    let msg = read_records(&broken, None, InvalidPolicy::Skip)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(&format!(
            "{}: invalid JSON at line 3 column",
            broken.display()
        )) && msg.contains("element 2"),
        "{msg}"
    );

    // Not an array of objects.
    let scalar = dir.join("scalar.json");
    std::fs::write(&scalar, "\"text\"").unwrap();
    let msg = read_records(&scalar, None, InvalidPolicy::Error)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("expected a JSON array of records"), "{msg}");
    let numbers = dir.join("numbers.json");
    std::fs::write(&numbers, "[1]").unwrap();
    let msg = read_records(&numbers, None, InvalidPolicy::Error)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("numbers.json:1: expected a JSON object, found a number"),
        "{msg}"
    );

    let empty = dir.join("empty.json");
    std::fs::write(&empty, "[]").unwrap();
    assert!(read_records(&empty, None, InvalidPolicy::Error)
        .unwrap()
        .records
        .is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn other_extensions_are_rejected_naming_the_file() {
    let dir = scratch("ext");
    let csv = dir.join("data.csv");
    std::fs::write(&csv, "prompt,completion\na,b\n").unwrap();
    let msg = read_records(&csv, None, InvalidPolicy::Error)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(&format!("{}: ", csv.display()))
            && msg.contains(".jsonl")
            && msg.contains(".parquet")
            && msg.contains(".json "),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes a small prompt/completion parquet file whose prompts say where they are.
fn pc_file(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let cols = prompt_completion_cols();
    write_twins(path, &cols, 10, Compression::SNAPPY);
    std::fs::remove_file(path.with_extension("jsonl")).unwrap();
}

fn rel(dir: &Path, files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .map(|f| {
            f.strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect()
}

#[test]
fn dataset_directories_in_the_hub_layouts() {
    let root = scratch("layouts");

    // `datasets`' push_to_hub: data/{split}-*.parquet.
    let ds = root.join("push");
    pc_file(&ds.join("data/train-00001-of-00002.parquet"));
    pc_file(&ds.join("data/train-00000-of-00002.parquet"));
    pc_file(&ds.join("data/test-00000-of-00001.parquet"));
    std::fs::write(ds.join("README.md"), "# card\n").unwrap();
    assert_eq!(
        rel(&ds, &dataset_files(&ds, None, "train").unwrap()),
        [
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet"
        ]
    );
    assert_eq!(
        rel(&ds, &dataset_files(&ds, Some("default"), "test").unwrap()),
        ["data/test-00000-of-00001.parquet"]
    );
    // read_records on the directory reads its train split, rows numbered per file.
    let out = read_records(&ds, None, InvalidPolicy::Error).unwrap();
    assert_eq!(out.records.len(), 6);
    let lines: Vec<usize> = out.records.iter().map(|r| r.source.line).collect();
    assert_eq!(lines, [1, 2, 3, 1, 2, 3]);
    assert!(out.records[0]
        .source
        .file
        .ends_with("train-00000-of-00002.parquet"));
    assert!(out.records[3]
        .source
        .file
        .ends_with("train-00001-of-00002.parquet"));

    // Multi-config (smoltalk): data/{subset}/{split}-*.parquet.
    let ds = root.join("smoltalk");
    pc_file(&ds.join("data/all/train-00000-of-00002.parquet"));
    pc_file(&ds.join("data/all/train-00001-of-00002.parquet"));
    pc_file(&ds.join("data/all/test-00000-of-00001.parquet"));
    pc_file(&ds.join("data/smol-magpie-ultra/train-00000-of-00001.parquet"));
    assert_eq!(
        rel(&ds, &dataset_files(&ds, Some("all"), "train").unwrap()),
        [
            "data/all/train-00000-of-00002.parquet",
            "data/all/train-00001-of-00002.parquet"
        ]
    );
    assert_eq!(
        rel(
            &ds,
            &dataset_files(&ds, Some("smol-magpie-ultra"), "train").unwrap()
        ),
        ["data/smol-magpie-ultra/train-00000-of-00001.parquet"]
    );
    let out = sft_data::read_dataset(&ds, Some("all"), "test", None, InvalidPolicy::Error).unwrap();
    assert_eq!(out.records.len(), 3);

    // Nothing matching: what was looked for, and what exists.
    let msg = dataset_files(&ds, Some("all"), "validation")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("no data files for split \"validation\" of subset \"all\"")
            && msg.contains("data/all/validation-*")
            && msg.contains("all/validation/*")
            && msg.contains("subset \"all\" with splits \"test\", \"train\"")
            && msg.contains("subset \"smol-magpie-ultra\" with splits \"train\""),
        "{msg}"
    );
    let msg = dataset_files(&ds, None, "train").unwrap_err().to_string();
    assert!(
        msg.contains("data/train-*") && msg.contains("subset \"all\""),
        "{msg}"
    );

    // {subset}/{split}-* and the parquet converter's {subset}/{split}/NNNN.parquet.
    let ds = root.join("converter");
    pc_file(&ds.join("all/train/0001.parquet"));
    pc_file(&ds.join("all/train/0000.parquet"));
    pc_file(&ds.join("default/train/0000.parquet"));
    pc_file(&ds.join("other/train-00000-of-00001.parquet"));
    assert_eq!(
        rel(&ds, &dataset_files(&ds, Some("all"), "train").unwrap()),
        ["all/train/0000.parquet", "all/train/0001.parquet"]
    );
    assert_eq!(
        rel(&ds, &dataset_files(&ds, None, "train").unwrap()),
        ["default/train/0000.parquet"]
    );
    assert_eq!(
        rel(&ds, &dataset_files(&ds, Some("other"), "train").unwrap()),
        ["other/train-00000-of-00001.parquet"]
    );
    let msg = dataset_files(&ds, Some("all"), "test")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("splits \"train\" (no subset)")
            && msg.contains("subset \"all\" with splits \"train\"")
            && msg.contains("subset \"other\" with splits \"train\""),
        "{msg}"
    );

    // JSON lines and arrays with the same naming; parquet preferred when both are there.
    let ds = root.join("plain");
    std::fs::create_dir_all(&ds).unwrap();
    std::fs::write(
        ds.join("train.jsonl"),
        "{\"text\": \"a\"}\n{\"text\": \"b\"}\n",
    )
    .unwrap();
    std::fs::write(ds.join("test.json"), "[{\"text\": \"c\"}]").unwrap();
    std::fs::write(ds.join("train_sft.jsonl"), "{\"text\": \"not train\"}\n").unwrap();
    assert_eq!(
        rel(&ds, &dataset_files(&ds, None, "train").unwrap()),
        ["train.jsonl"]
    );
    assert_eq!(
        rel(&ds, &dataset_files(&ds, None, "test").unwrap()),
        ["test.json"]
    );
    assert_eq!(
        read_records(&ds, None, InvalidPolicy::Error)
            .unwrap()
            .records
            .len(),
        2
    );
    pc_file(&ds.join("data/train-00000-of-00001.parquet"));
    std::fs::write(
        ds.join("data/train-00000-of-00001.jsonl"),
        "{\"text\": \"x\"}\n",
    )
    .unwrap();
    assert_eq!(
        rel(&ds, &dataset_files(&ds, None, "train").unwrap()),
        ["data/train-00000-of-00001.parquet"]
    );

    // `save_to_disk` metadata is never data; an empty directory says so.
    let ds = root.join("empty");
    std::fs::create_dir_all(ds.join("train")).unwrap();
    std::fs::write(ds.join("train/state.json"), "{}").unwrap();
    std::fs::write(ds.join("dataset_dict.json"), "{}").unwrap();
    let msg = dataset_files(&ds, None, "train").unwrap_err().to_string();
    assert!(msg.contains("the directory has no .parquet"), "{msg}");

    let msg = dataset_files(&root.join("nope"), None, "train")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("nope: not a dataset directory"), "{msg}");
    let _ = std::fs::remove_dir_all(&root);
}
