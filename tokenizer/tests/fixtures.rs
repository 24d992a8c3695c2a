//! Parity with `transformers` on the real Qwen tokenizer, and the char tokenizer on real poems.
//!
//! Golden ids come from `tests/data/scripts/golden_tokenizer.py` (see its docstring).

use std::path::{Path, PathBuf};

use sft_tokenizer::{CharRoles, CharTokenizer, Tokenizer, TokenizerKind, POEM_SPECIALS};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

#[derive(serde::Deserialize)]
struct Golden {
    text: String,
    ids: Vec<u32>,
    tokens: Vec<String>,
    decoded: String,
    decoded_skip_special: String,
}

fn goldens() -> Vec<Golden> {
    let text = std::fs::read_to_string(data_dir().join("golden/tokenizer_ids.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn qwen_ids_match_transformers() {
    let tok = Tokenizer::from_path(&data_dir().join("qwen3-tokenizer")).unwrap();
    assert_eq!(tok.kind(), TokenizerKind::HfBpe);
    let goldens = goldens();
    assert!(goldens.len() >= 20);
    for g in &goldens {
        assert_eq!(tok.encode(&g.text).unwrap(), g.ids, "ids of {:?}", g.text);
        let enc = tok.encode_with_offsets(&g.text).unwrap();
        assert_eq!(enc.ids, g.ids, "ids with offsets of {:?}", g.text);
        let tokens: Vec<String> = g
            .ids
            .iter()
            .map(|&id| tok.id_to_token(id).unwrap())
            .collect();
        assert_eq!(tokens, g.tokens, "tokens of {:?}", g.text);
        assert_eq!(
            tok.decode(&g.ids).unwrap(),
            g.decoded,
            "decode of {:?}",
            g.text
        );
        assert_eq!(
            tok.decode_skip_special(&g.ids).unwrap(),
            g.decoded_skip_special,
            "decode (skip special) of {:?}",
            g.text
        );
    }
}

#[test]
fn qwen_offsets_cover_the_text() {
    let tok = Tokenizer::from_path(&data_dir().join("qwen3-tokenizer")).unwrap();
    for g in goldens() {
        let enc = tok.encode_with_offsets(&g.text).unwrap();
        let mut end = 0;
        for &(s, e) in &enc.offsets {
            assert!(
                s <= e && e <= g.text.len(),
                "{:?}: offsets {s}..{e}",
                g.text
            );
            assert!(s >= end.min(s), "offsets go backwards");
            end = end.max(e);
        }
        if !g.text.is_empty() {
            assert_eq!(end, g.text.len(), "{:?}: offsets stop early", g.text);
        }
    }
}

#[test]
fn qwen_config_and_specials() {
    let tok = Tokenizer::from_path(&data_dir().join("qwen3-tokenizer/tokenizer.json")).unwrap();
    let cfg = tok.config();
    assert_eq!(cfg.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(cfg.pad_token.as_deref(), Some("<|endoftext|>"));
    assert_eq!(cfg.bos_token, None);
    assert!(cfg.chat_template.as_deref().unwrap().contains("<think>"));
    assert_eq!(tok.eos_id(), Some(151645));
    assert_eq!(tok.pad_id(), Some(151643));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(151644));
    assert_eq!(tok.token_to_id("<think>"), Some(151667));
    assert_eq!(tok.vocab_size(), 151669);
    assert!(tok.is_special(151645));
    assert!(!tok.is_special(9707));
    let specials = tok.special_tokens();
    assert!(specials
        .iter()
        .any(|(s, id)| s == "<|im_end|>" && *id == 151645));
    // Special tokens are not matched by encode_ordinary.
    let plain = tok.encode_ordinary("<|im_end|>").unwrap();
    assert!(plain.ids.len() > 1 && !plain.ids.contains(&151645));
}

#[test]
fn missing_and_malformed_files_name_the_path() {
    let err = Tokenizer::from_path(Path::new("/nonexistent/tokenizer.json")).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/tokenizer.json"),
        "{err}"
    );
    let dir = std::env::temp_dir().join(format!("sft-tok-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = Tokenizer::from_path(&dir).unwrap_err();
    assert!(err.to_string().contains("no tokenizer found"), "{err}");
    let bad = dir.join("tokenizer.json");
    std::fs::write(&bad, "{\"model\": 3").unwrap();
    let err = Tokenizer::from_path(&dir).unwrap_err();
    assert!(
        err.to_string().contains("tokenizer.json") && err.to_string().contains("JSON"),
        "{err}"
    );
    std::fs::write(&bad, "{\"something\": 3}").unwrap();
    let err = Tokenizer::from_path(&bad).unwrap_err();
    assert!(err.to_string().contains("neither"), "{err}");
    std::fs::write(&bad, "{\"model\": {\"type\": \"Nope\"}}").unwrap();
    let err = Tokenizer::from_path(&bad).unwrap_err();
    assert!(
        err.to_string().contains("not a Hugging Face tokenizer"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn char_tokenizer_round_trips_the_poems() {
    let text = std::fs::read_to_string(data_dir().join("poems/poems-small.jsonl")).unwrap();
    let poems: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(poems.len(), 1524);
    let fields = |p: &serde_json::Value| -> Vec<String> {
        ["author", "title", "style", "content"]
            .iter()
            .map(|k| p[*k].as_str().unwrap().to_owned())
            .collect()
    };
    let all: Vec<String> = poems.iter().flat_map(fields).collect();
    let roles = CharRoles {
        bos_token: Some(POEM_SPECIALS.begin.into()),
        eos_token: Some(POEM_SPECIALS.content.1.into()),
        pad_token: Some(POEM_SPECIALS.pad.into()),
        unk_token: POEM_SPECIALS.unk.into(),
    };
    let char_tok =
        CharTokenizer::from_corpus(all.iter().map(String::as_str), &POEM_SPECIALS.all(), roles)
            .unwrap();
    // 4,906 distinct characters in the subset (its README) + 11 markers.
    assert_eq!(char_tok.vocab_size(), 4906 + 11);
    let tok = Tokenizer::from_char(char_tok);
    for s in &all {
        let enc = tok.encode_with_offsets(s).unwrap();
        assert_eq!(enc.n_unknown, 0);
        assert_eq!(enc.ids.len(), s.chars().count());
        assert!(
            enc.ids.iter().all(|&id| id >= 11),
            "text never produces a marker"
        );
        assert_eq!(tok.decode(&enc.ids).unwrap(), *s);
    }
    // Save and load through a directory, as checkpoints do.
    let dir = std::env::temp_dir().join(format!("sft-char-{}", std::process::id()));
    tok.save(&dir).unwrap();
    let back = Tokenizer::from_path(&dir).unwrap();
    assert_eq!(back.kind(), TokenizerKind::Char);
    assert_eq!(back.encode(&all[3]).unwrap(), tok.encode(&all[3]).unwrap());
    assert_eq!(back.eos_id(), tok.token_to_id("<|/content|>"));
    // Characters outside the vocabulary are counted, not dropped.
    let enc = back.encode_with_offsets("明月ABC").unwrap();
    assert_eq!(enc.n_unknown, 3);
    assert_eq!(enc.ids.len(), 5);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn saving_needs_nothing_from_where_the_tokenizer_was_loaded() {
    // A resumed run saves after `keep_last` has deleted the checkpoint it loaded from: the
    // tokenizer's files must come from memory, byte for byte as they were read.
    let root = std::env::temp_dir().join(format!("sft-tok-gone-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let src = root.join("loaded-from");
    std::fs::create_dir_all(&src).unwrap();
    let files = ["tokenizer.json", "tokenizer_config.json"];
    for f in files {
        std::fs::copy(data_dir().join("qwen3-tokenizer").join(f), src.join(f)).unwrap();
    }
    std::fs::write(src.join("chat_template.jinja"), "{{ messages }}").unwrap();
    let tok = Tokenizer::from_path(&src).unwrap();
    assert_eq!(tok.source_files().count(), 3);
    std::fs::remove_dir_all(&src).unwrap();
    let dst = root.join("saved");
    tok.save(&dst).unwrap();
    for f in files {
        assert_eq!(
            std::fs::read(dst.join(f)).unwrap(),
            std::fs::read(data_dir().join("qwen3-tokenizer").join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(dst.join("chat_template.jinja")).unwrap(),
        "{{ messages }}"
    );
    let reloaded = Tokenizer::from_path(&dst).unwrap();
    assert_eq!(
        reloaded.encode("Hello, world!").unwrap(),
        vec![9707, 11, 1879, 0]
    );
    std::fs::remove_dir_all(&root).unwrap();
}
