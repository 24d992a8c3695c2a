//! The tokenizer of a GGUF file (`tokenizer.ggml.*`, llama.cpp's keys) as plain data, and the
//! conversions between it and a [`Tokenizer`].
//!
//! Two vocabularies are read and written, the ones llama.cpp runs for the architectures `sft`
//! reads:
//! - `gpt2`: byte-level BPE with merges, split by the regexes llama.cpp names by
//!   `tokenizer.ggml.pre` (the table below: llama.cpp's `llm_tokenizer_bpe`, in the form the
//!   original `tokenizer.json` files write them);
//! - `llama`: SentencePiece's BPE (tokens with scores, byte fallback through `<0xXX>` tokens),
//!   the merges ranked by the merged token's score (llama.cpp's SPM tokenizer merges the
//!   adjacent pair whose result scores best; `transformers`' `generate_merges` makes that a
//!   merge list).
//!
//! Reading builds the `tokenizer.json` the vocabulary stands for and loads it through the same
//! path as a checkpoint's. Writing goes the other way from a `tokenizer.json`: its pre-tokenizer
//! names the `tokenizer.ggml.pre` value, or the tokenizer is refused.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::{Backend, Error, Result, Tokenizer, TokenizerConfig};

/// llama.cpp's token types (`llama_token_type`).
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_UNKNOWN: i32 = 2;
pub const TOKEN_CONTROL: i32 = 3;
pub const TOKEN_USER_DEFINED: i32 = 4;
pub const TOKEN_UNUSED: i32 = 5;
pub const TOKEN_BYTE: i32 = 6;

/// A tokenizer as a GGUF file holds it. Empty lists stand for absent keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` or `llama`.
    pub model: String,
    /// `tokenizer.ggml.pre`.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub scores: Vec<f32>,
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
}

/// `tokenizers`' ByteLevel pattern (GPT-2's).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's spelling of the contractions (the same matches as `(?i:...)`).
const CONTRACTIONS_CPP: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])";
const CONTRACTIONS_HF: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)";

/// How text is split before the merges, by llama.cpp's pre-tokenizer types.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Split {
    /// GPT-2's regex (`tokenizers`' ByteLevel with `use_regex`).
    Gpt2,
    /// One regex, then byte-level.
    Regex(&'static str),
    /// Every digit on its own, then GPT-2's regex (SmolLM, StarCoder).
    DigitsThenGpt2,
    /// llama.cpp's `default`: punctuation runs, GPT-2's regex, digit runs, three digits.
    Default,
}

/// `tokenizer.ggml.pre` values and the split each means (llama.cpp's `llm_tokenizer_bpe`).
/// The first name of each row is the one written.
const PRE: [(&[&str], Split); 5] = [
    (
        &[
            "llama-bpe",
            "llama3",
            "llama-v3",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ],
        Split::Regex(LLAMA3),
    ),
    (
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "stablelm2",
            "kormo",
            "f2llmv2",
            "megrez",
        ],
        Split::Regex(QWEN2),
    ),
    (
        &[
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "exaone4",
        ],
        Split::Gpt2,
    ),
    (
        &[
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        Split::DigitsThenGpt2,
    ),
    (&["default"], Split::Default),
];

fn pre_split(pre: &str) -> Option<Split> {
    PRE.iter()
        .find(|(names, _)| names.contains(&pre))
        .map(|(_, s)| *s)
}

fn known_pres() -> String {
    PRE.iter()
        .flat_map(|(names, _)| names.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A regex as the same pattern in `tokenizers`' spelling (llama.cpp writes the contractions
/// with character classes).
fn canonical_regex(r: &str) -> String {
    r.replace(CONTRACTIONS_CPP, CONTRACTIONS_HF)
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split_regex(r: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false})
}

fn pre_tokenizer_json(split: Split) -> Value {
    match split {
        Split::Gpt2 => byte_level(true),
        Split::Regex(r) => {
            json!({"type": "Sequence", "pretokenizers": [split_regex(r), byte_level(false)]})
        }
        Split::DigitsThenGpt2 => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        Split::Default => json!({"type": "Sequence", "pretokenizers": [
            split_regex(r"[\p{P}\$\+<=>\^~\|]+"),
            split_regex(GPT2),
            split_regex(r"\p{N}+"),
            split_regex(r"[0-9][0-9][0-9]"),
            byte_level(false),
        ]}),
    }
}

/// The llama.cpp pre-tokenizer type of a `tokenizer.json` pre-tokenizer, when it is one.
fn split_of(pre: &Value) -> Option<Split> {
    let is_byte_level =
        |v: &Value, regex: bool| v["type"] == "ByteLevel" && v["use_regex"] == regex;
    if is_byte_level(pre, true) {
        return Some(Split::Gpt2);
    }
    if pre["type"] != "Sequence" {
        return None;
    }
    let items = pre["pretokenizers"].as_array()?;
    match items.as_slice() {
        [digits, bl] if digits["type"] == "Digits" && digits["individual_digits"] == true => {
            is_byte_level(bl, true).then_some(Split::DigitsThenGpt2)
        }
        [split, bl]
            if split["type"] == "Split"
                && split["behavior"] == "Isolated"
                && split["invert"] == false
                && is_byte_level(bl, false) =>
        {
            let r = canonical_regex(split["pattern"]["Regex"].as_str()?);
            [LLAMA3, QWEN2, GPT2]
                .into_iter()
                .find(|known| *known == r)
                .map(|known| match known {
                    GPT2 => Split::Gpt2,
                    k => Split::Regex(k),
                })
        }
        _ if *pre == pre_tokenizer_json(Split::Default) => Some(Split::Default),
        _ => None,
    }
}

fn pre_name(split: Split) -> &'static str {
    PRE.iter()
        .find(|(_, s)| *s == split)
        .map(|(names, _)| names[0])
        .expect("every split has a row")
}

/// GPT-2's byte -> character table, inverted.
fn char_bytes() -> HashMap<char, u8> {
    crate::fast::byte_chars()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect()
}

/// The BPE merges of a GGUF vocabulary as `tokenizer.json` writes them: `tokenizer.ggml.merges`,
/// or for a SentencePiece vocabulary without them, merges made from the scores.
fn merges_json(
    v: &GgufVocab,
    tokens: &[String],
    spm: bool,
    bad: &dyn Fn(String) -> Error,
) -> Result<Vec<Value>> {
    Ok(match (v.merges.is_empty(), spm) {
        (false, _) => v
            .merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                // llama.cpp splits at the first space after the first character.
                let cut = m
                    .char_indices()
                    .skip(1)
                    .find(|&(_, c)| c == ' ')
                    .map(|(at, _)| at)
                    .ok_or_else(|| bad(format!("tokenizer.ggml.merges[{i}] {m:?} has no space")))?;
                Ok(json!([&m[..cut], &m[cut + 1..]]))
            })
            .collect::<Result<_>>()?,
        (true, false) => {
            return Err(bad(
                "tokenizer.ggml.merges is missing (a gpt2 vocabulary needs its merges)".into(),
            ))
        }
        (true, true) if v.scores.is_empty() => return Err(bad(
            "tokenizer.ggml.scores is missing (a llama vocabulary without merges needs the scores)"
                .into(),
        )),
        (true, true) => merges_from_scores(tokens, &v.scores)
            .into_iter()
            .map(|(l, r)| json!([l, r]))
            .collect(),
    })
}

/// The `tokenizer.json` a GGUF vocabulary stands for: SentencePiece's BPE with byte fallback,
/// or byte-level BPE split as `tokenizer.ggml.pre` names.
fn tokenizer_json(
    v: &GgufVocab,
    tokens: &[String],
    spm: bool,
    added: Vec<Value>,
    vocab: serde_json::Map<String, Value>,
    merges: Vec<Value>,
    bad: &dyn Fn(String) -> Error,
) -> Result<Value> {
    let add_prefix = spm && v.add_space_prefix.unwrap_or(true);
    if spm {
        let mut normalizers = vec![];
        if add_prefix {
            normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
        }
        normalizers
            .push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if add_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        Ok(json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE", "dropout": null,
                "unk_token": v.unk.map(|u| tokens[u as usize].clone()),
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        }))
    } else {
        let pre = v.pre.as_deref().unwrap_or("default");
        let split = pre_split(pre).ok_or_else(|| {
            bad(format!(
                "tokenizer.ggml.pre {pre:?} is not supported (supported: {})",
                known_pres()
            ))
        })?;
        Ok(json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer_json(split),
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false,
                // llama.cpp's Llama 3 tokenizer takes a whole word that is a token as it is.
                "ignore_merges": matches!(split, Split::Regex(LLAMA3)),
                "vocab": vocab, "merges": merges,
            },
        }))
    }
}

impl Tokenizer {
    /// The tokenizer a GGUF vocabulary stands for; `origin` names the file in errors.
    pub fn from_gguf_vocab(v: &GgufVocab, origin: &Path) -> Result<Tokenizer> {
        let bad = |reason: String| Error::Malformed {
            path: origin.to_path_buf(),
            reason,
        };
        let n = v.tokens.len();
        if n == 0 {
            return Err(bad("tokenizer.ggml.tokens is missing or empty".into()));
        }
        for (key, len) in [
            ("tokenizer.ggml.token_type", v.token_types.len()),
            ("tokenizer.ggml.scores", v.scores.len()),
        ] {
            if len != 0 && len != n {
                return Err(bad(format!("{key} has {len} entries for {n} tokens")));
            }
        }
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", v.bos),
            ("tokenizer.ggml.eos_token_id", v.eos),
            ("tokenizer.ggml.unknown_token_id", v.unk),
            ("tokenizer.ggml.padding_token_id", v.pad),
        ] {
            if id.is_some_and(|id| id as usize >= n) {
                return Err(bad(format!(
                    "{key} {} is outside the {n} tokens",
                    id.unwrap_or_default()
                )));
            }
        }
        let spm = match v.model.as_str() {
            "gpt2" => false,
            "llama" => true,
            other => {
                return Err(bad(format!(
                    "tokenizer.ggml.model {other:?} is not supported (gpt2, llama)"
                )))
            }
        };
        let type_of = |i: usize| v.token_types.get(i).copied().unwrap_or(TOKEN_NORMAL);
        // SentencePiece writes spaces as U+2581; a whitespace token stored with real spaces
        // could never match text whose spaces have become U+2581 (transformers respells them too).
        let tokens: Vec<String> = match spm {
            true => v
                .tokens
                .iter()
                .map(|t| match !t.is_empty() && t.chars().all(|c| c == ' ') {
                    true => "\u{2581}".repeat(t.chars().count()),
                    false => t.clone(),
                })
                .collect(),
            false => v.tokens.clone(),
        };
        let mut vocab = serde_json::Map::new();
        for (i, t) in tokens.iter().enumerate() {
            // The converter's padding up to the embedding's rows is no token of the tokenizer
            // (writing it back pads the same way).
            if type_of(i) == TOKEN_UNUSED && *t == format!("[PAD{i}]") {
                continue;
            }
            if vocab.insert(t.clone(), json!(i)).is_some() {
                return Err(bad(format!(
                    "tokenizer.ggml.tokens: token {t:?} appears twice (again at id {i})"
                )));
            }
        }
        let decode_bytes = char_bytes();
        // Added tokens are matched in the raw text: a byte-level spelling becomes its text.
        let raw_text = |t: &str| -> String {
            if spm {
                return t.to_string();
            }
            let bytes: Option<Vec<u8>> = t.chars().map(|c| decode_bytes.get(&c).copied()).collect();
            bytes
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_else(|| t.to_string())
        };
        let mut added = vec![];
        for (i, t) in tokens.iter().enumerate() {
            let special = match type_of(i) {
                TOKEN_CONTROL | TOKEN_UNKNOWN => true,
                TOKEN_USER_DEFINED => false,
                _ => continue,
            };
            added.push(json!({
                "id": i, "content": raw_text(t), "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": special,
            }));
        }
        let merges = merges_json(v, &tokens, spm, &bad)?;
        let json = tokenizer_json(v, &tokens, spm, added, vocab, merges, &bad)?;
        let tok = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).map_err(|e| {
            bad(format!(
                "the tokenizer its tokenizer.ggml keys describe: {e}"
            ))
        })?;
        let name = |id: Option<u32>| id.map(|i| tokens[i as usize].clone());
        let config = TokenizerConfig {
            bos_token: name(v.bos),
            eos_token: name(v.eos),
            pad_token: name(v.pad),
            unk_token: name(v.unk),
            chat_template: v.chat_template.clone(),
            // llama.cpp's defaults: a SentencePiece vocabulary gets a BOS unless it says not.
            add_bos_token: v.add_bos.unwrap_or(spm),
            ..TokenizerConfig::default()
        };
        let mut tok = Tokenizer::from_hf(tok, config);
        tok.origin = Some(origin.to_path_buf());
        Ok(tok)
    }

    /// The GGUF vocabulary of this tokenizer for a model of `vocab_size` rows: ids the tokenizer
    /// lacks become `[PAD<id>]` tokens of type unused, as llama.cpp's converter writes them.
    pub fn to_gguf_vocab(&self, vocab_size: usize) -> Result<GgufVocab> {
        let refuse = |reason: String| Error::InvalidVocab { reason };
        let tok = match &self.backend {
            Backend::Hf { tok, .. } => tok,
            Backend::Char(_) => {
                return Err(refuse(
                    "a char-level tokenizer has no GGUF form llama.cpp reads (gpt2 or llama \
                     vocabularies): train a BPE tokenizer instead"
                        .into(),
                ))
            }
        };
        let json: Value = serde_json::from_str(&tok.to_string(false).map_err(Error::Tokenizers)?)
            .map_err(|e| refuse(format!("the tokenizer as JSON: {e}")))?;
        let model = &json["model"];
        if model["type"] != "BPE" {
            return Err(refuse(format!(
                "a tokenizer of model type {} has no GGUF form sft writes (BPE only)",
                model["type"]
            )));
        }
        let n = self.vocab_size();
        if n > vocab_size {
            return Err(refuse(format!(
                "the tokenizer has {n} tokens, the model {vocab_size} rows"
            )));
        }
        let spm = model["byte_fallback"] == true;
        let mut tokens = Vec::with_capacity(vocab_size);
        let mut types = Vec::with_capacity(vocab_size);
        let added = tok.get_added_tokens_decoder();
        let encode = crate::fast::byte_chars();
        for id in 0..vocab_size as u32 {
            let (token, t) = match (added.get(&id), tok.id_to_token(id)) {
                (Some(a), _) => {
                    // An added token is stored as the model's vocabulary spells its text.
                    let spelled = match spm {
                        true => a.content.clone(),
                        false => a.content.bytes().map(|b| encode[b as usize]).collect(),
                    };
                    // SentencePiece types its unknown token apart; a byte-level vocabulary's
                    // unknown id (SmolLM's <|endoftext|>) is a control token to llama.cpp.
                    let t = match (a.special, spm && Some(id) == self.unk_id()) {
                        (_, true) => TOKEN_UNKNOWN,
                        (true, _) => TOKEN_CONTROL,
                        (false, _) => TOKEN_USER_DEFINED,
                    };
                    (spelled, t)
                }
                (None, Some(s)) if spm && is_byte_token(&s) => (s, TOKEN_BYTE),
                (None, Some(s)) => (s, TOKEN_NORMAL),
                (None, None) => (format!("[PAD{id}]"), TOKEN_UNUSED),
            };
            tokens.push(token);
            types.push(t);
        }
        let merges: Vec<String> = match model["merges"].as_array() {
            Some(m) => m
                .iter()
                .map(|m| match m {
                    Value::String(s) => Ok(s.clone()),
                    Value::Array(pair) => match pair.as_slice() {
                        [Value::String(a), Value::String(b)] => Ok(format!("{a} {b}")),
                        _ => Err(refuse(format!("a merge {m} that is not a pair of strings"))),
                    },
                    _ => Err(refuse(format!("a merge {m} that is not a pair of strings"))),
                })
                .collect::<Result<_>>()?,
            None => vec![],
        };
        let cfg = self.config();
        let id_of = |t: &Option<String>| t.as_deref().and_then(|t| self.token_to_id(t));
        let mut v = GgufVocab {
            tokens,
            token_types: types,
            bos: id_of(&cfg.bos_token),
            eos: id_of(&cfg.eos_token),
            unk: self.unk_id(),
            pad: id_of(&cfg.pad_token),
            add_bos: Some(cfg.add_bos_token),
            add_eos: Some(false),
            chat_template: cfg.chat_template.clone(),
            ..GgufVocab::default()
        };
        if spm {
            let normalizer = &json["normalizer"];
            let pre = &json["pre_tokenizer"];
            let add_prefix = has_prepend(normalizer) || metaspace_prepends(pre);
            let replaces_spaces = has_space_replace(normalizer) || pre["type"] == "Metaspace";
            if !replaces_spaces {
                return Err(refuse(
                    "a byte-fallback BPE tokenizer that does not write spaces as U+2581 is not \
                     SentencePiece's: it has no GGUF form"
                        .into(),
                ));
            }
            v.model = "llama".into();
            v.pre = Some("default".into());
            v.add_space_prefix = Some(add_prefix);
            v.scores = scores_from_merges(&v.tokens, &merges);
            v.merges = merges;
        } else {
            let pre = &json["pre_tokenizer"];
            let split = split_of(pre).ok_or_else(|| {
                refuse(format!(
                    "the pre-tokenizer {pre} is not one llama.cpp names in tokenizer.ggml.pre \
                     (byte-level BPE split like GPT-2, Llama 3, Qwen2 or SmolLM)"
                ))
            })?;
            match &json["normalizer"] {
                Value::Null => {}
                // llama.cpp does not normalise; NFC changes only text that is not NFC already.
                n if n["type"] == "NFC" => {}
                n => {
                    return Err(refuse(format!(
                        "the normalizer {n} has no llama.cpp equivalent"
                    )))
                }
            }
            v.model = "gpt2".into();
            v.pre = Some(pre_name(split).into());
            v.merges = merges;
        }
        Ok(v)
    }
}

fn is_byte_token(s: &str) -> bool {
    s.len() == 6
        && s.starts_with("<0x")
        && s.ends_with('>')
        && s[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

fn has_prepend(n: &Value) -> bool {
    match n["type"].as_str() {
        Some("Prepend") => n["prepend"] == "\u{2581}",
        Some("Sequence") => n["normalizers"]
            .as_array()
            .is_some_and(|a| a.iter().any(has_prepend)),
        _ => false,
    }
}

fn has_space_replace(n: &Value) -> bool {
    match n["type"].as_str() {
        Some("Replace") => n["pattern"]["String"] == " " && n["content"] == "\u{2581}",
        Some("Sequence") => n["normalizers"]
            .as_array()
            .is_some_and(|a| a.iter().any(has_space_replace)),
        _ => false,
    }
}

fn metaspace_prepends(p: &Value) -> bool {
    p["type"] == "Metaspace" && matches!(p["prepend_scheme"].as_str(), Some("first" | "always"))
}

/// SentencePiece merges from token scores (`transformers`' `generate_merges`): every split of a
/// token into two tokens is a merge, best score first, longer left then right parts first among
/// equals, then in the order found (tokens by id, splits by the ids of their parts).
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(usize, usize, f32, String, String)> = vec![];
    for (t, &score) in tokens.iter().zip(scores) {
        let mut local = vec![];
        for (at, _) in t.char_indices().skip(1) {
            let (l, r) = (&t[..at], &t[at..]);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                local.push((li, ri, score, l.to_string(), r.to_string()));
            }
        }
        local.sort_by_key(|&(li, ri, ..)| (li, ri));
        merges.extend(local);
    }
    // Python's sort is stable: sort descending on (score, len(left), len(right)).
    merges.sort_by(|a, b| {
        let key = |m: &(usize, usize, f32, String, String)| {
            (m.2, m.3.chars().count(), m.4.chars().count())
        };
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges.into_iter().map(|(_, _, _, l, r)| (l, r)).collect()
}

/// Scores that make llama.cpp's SentencePiece tokenizer (best-scoring merge first) follow a
/// merge list: the token a merge makes scores minus its rank; single characters and bytes 0;
/// a longer token no merge makes is never preferred.
fn scores_from_merges(tokens: &[String], merges: &[String]) -> Vec<f32> {
    let mut rank: HashMap<String, usize> = HashMap::new();
    for (r, m) in merges.iter().enumerate() {
        if let Some((a, b)) = m.split_once(' ') {
            rank.entry(format!("{a}{b}")).or_insert(r);
        }
    }
    tokens
        .iter()
        .map(|t| match rank.get(t) {
            Some(&r) => -(r as f32),
            None if t.chars().count() <= 1 || is_byte_token(t) => 0.0,
            None => -1e9,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pre_tokenizer_reads_back_as_its_name() {
        for (names, split) in PRE {
            let json = pre_tokenizer_json(split);
            assert_eq!(split_of(&json), Some(split), "{names:?}");
            assert_eq!(pre_name(split), names[0]);
        }
        // llama.cpp's spelling of Llama 3's regex is the same pattern.
        let cpp = LLAMA3.replace(CONTRACTIONS_HF, CONTRACTIONS_CPP);
        assert_ne!(cpp, LLAMA3);
        let pre =
            json!({"type": "Sequence", "pretokenizers": [split_regex(&cpp), byte_level(false)]});
        assert_eq!(split_of(&pre), Some(Split::Regex(LLAMA3)));
    }

    #[test]
    fn merges_from_scores_follow_generate_merges() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -0.5];
        let m = merges_from_scores(&tokens, &scores);
        // abc (-0.5): "ab"+"c" (left longer first), "a"+"bc"; then ab (-1), bc (-2).
        let want = [("ab", "c"), ("a", "bc"), ("a", "b"), ("b", "c")];
        let got: Vec<(&str, &str)> = m.iter().map(|(l, r)| (l.as_str(), r.as_str())).collect();
        assert_eq!(got, want);
    }
}
