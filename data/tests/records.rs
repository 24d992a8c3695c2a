//! Reading JSONL: format detection, and every bad-input case giving its documented error with
//! file, line and field.

use std::path::{Path, PathBuf};

use sft_data::{read_jsonl, Error, Format, InvalidPolicy, Role, Sample};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/jsonl")
        .join(name)
}

#[test]
fn mixed_formats_are_detected_per_line() {
    let out = read_jsonl(&fixture("mixed.jsonl"), None, InvalidPolicy::Error).unwrap();
    let formats: Vec<Format> = out.records.iter().map(|r| r.format).collect();
    assert_eq!(
        formats,
        [
            Format::Messages,
            Format::ShareGpt,
            Format::Alpaca,
            Format::InstructLabel,
            Format::PromptCompletion,
            Format::Text,
            Format::Messages
        ]
    );
    let lines: Vec<usize> = out.records.iter().map(|r| r.source.line).collect();
    assert_eq!(
        lines,
        [1, 2, 4, 5, 6, 7, 8],
        "line numbers count the blank line"
    );
    assert_eq!(out.blank_lines, 1);
    assert!(out.skipped.is_empty());
    assert_eq!(out.per_format[&Format::Messages], 2);
    // The CRLF line lost its carriage return.
    let Sample::Chat(c) = &out.records[6].sample else {
        panic!()
    };
    assert_eq!(c.messages()[1].content, "ok");
    assert_eq!(c.messages()[1].role, Role::Assistant);
    let Sample::Completion { prompt, completion } = &out.records[4].sample else {
        panic!()
    };
    assert_eq!(
        (prompt.as_str(), completion.as_str()),
        ("The capital of France is", " Paris.")
    );
}

#[test]
fn the_first_bad_line_is_an_error_naming_file_line_and_field() {
    let path = fixture("bad.jsonl");
    let err = read_jsonl(&path, None, InvalidPolicy::Error).unwrap_err();
    assert!(matches!(err, Error::Record { line: 3, .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "{}:3: field `messages[2].role`: unknown role \"bot\" (expected system, user, assistant or tool)",
            path.display()
        )
    );
}

#[test]
fn skipping_lists_every_bad_line_with_its_reason() {
    let path = fixture("bad.jsonl");
    let out = read_jsonl(&path, None, InvalidPolicy::Skip).unwrap();
    assert_eq!(out.records.len(), 2);
    assert_eq!(out.blank_lines, 1);
    assert_eq!(out.per_format[&Format::Messages], 1);
    assert_eq!(out.per_format[&Format::Poem], 1);
    let skipped: Vec<(usize, &str)> = out
        .skipped
        .iter()
        .map(|(s, r)| (s.line, r.as_str()))
        .collect();
    let expected: [(usize, &str); 8] = [
        (3, "field `messages[2].role`: unknown role \"bot\""),
        (4, "invalid JSON at column 14: EOF while parsing a list"),
        (5, "field `output`: empty: nothing to train on"),
        (6, "no known record format: expected one of the keys messages, conversations, instruction, instruct, prompt, text, content (found keys foo)"),
        (7, "the conversation has no assistant turn"),
        (8, "field `text`: expected a string, found a number"),
        (9, "invalid UTF-8 at byte 10 of the line"),
        (10, "field `messages[1].content`: empty assistant turn"),
    ];
    assert_eq!(skipped.len(), expected.len(), "{skipped:#?}");
    for ((line, reason), (want_line, want)) in skipped.iter().zip(expected) {
        assert_eq!(*line, want_line);
        assert!(
            reason.starts_with(want),
            "line {line}: {reason:?} does not start with {want:?}"
        );
    }
    for (source, _) in &out.skipped {
        assert_eq!(&*source.file, path.as_path());
    }
}

#[test]
fn a_forced_format_requires_its_fields() {
    let path = fixture("mixed.jsonl");
    let err = read_jsonl(&path, Some(Format::Text), InvalidPolicy::Error).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:1: field `text`: missing (required by format text)",
            path.display()
        )
    );
    let out = read_jsonl(&path, Some(Format::Messages), InvalidPolicy::Skip).unwrap();
    assert_eq!(out.records.len(), 2);
    assert_eq!(out.skipped.len(), 5);
}

#[test]
fn a_missing_file_names_its_path() {
    let err = read_jsonl(Path::new("/no/such/file.jsonl"), None, InvalidPolicy::Error).unwrap_err();
    assert!(
        err.to_string().starts_with("/no/such/file.jsonl: "),
        "{err}"
    );
}

#[test]
fn poems_fixture_reads_as_poems() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/poems/poems-small.jsonl");
    let out = read_jsonl(&path, None, InvalidPolicy::Error).unwrap();
    assert_eq!(out.records.len(), 1524);
    assert_eq!(out.per_format[&Format::Poem], 1524);
    let Sample::Poem(p) = &out.records[0].sample else {
        panic!()
    };
    assert_eq!(p.author, "王維");
    assert_eq!(p.style, "五言律诗");
}
