//! A tokenizer through its GGUF vocabulary and back: the same ids, tokens and texts.

use std::path::{Path, PathBuf};

use sft_tokenizer::{GgufVocab, Tokenizer, TOKEN_CONTROL, TOKEN_UNUSED, TOKEN_USER_DEFINED};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

#[derive(serde::Deserialize)]
struct Golden {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

fn goldens() -> Vec<Golden> {
    let text = std::fs::read_to_string(data_dir().join("golden/tokenizer_ids.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Qwen's vocabulary as its GGUF keys, padded to Qwen3's 151,936 embedding rows.
fn qwen_vocab() -> (Tokenizer, GgufVocab) {
    let tok = Tokenizer::from_path(&data_dir().join("qwen3-tokenizer")).unwrap();
    let v = tok.to_gguf_vocab(151_936).unwrap();
    (tok, v)
}

#[test]
fn qwen_vocabulary_is_written_as_llama_cpp_reads_it() {
    let (tok, v) = qwen_vocab();
    assert_eq!(v.model, "gpt2");
    assert_eq!(v.pre.as_deref(), Some("qwen2"));
    assert_eq!(v.tokens.len(), 151_936);
    assert_eq!(v.token_types.len(), 151_936);
    assert_eq!(v.tokens[151_643], "<|endoftext|>");
    assert_eq!(v.token_types[151_643], TOKEN_CONTROL);
    let think = tok.token_to_id("<think>").unwrap() as usize;
    assert_eq!(v.token_types[think], TOKEN_USER_DEFINED);
    assert_eq!(v.tokens[151_935], "[PAD151935]");
    assert_eq!(v.token_types[151_935], TOKEN_UNUSED);
    // Merges as "left right", in the byte-level spelling.
    assert_eq!(v.merges[0], "Ġ Ġ");
    assert_eq!(v.eos, tok.eos_id());
    assert!(v.chat_template.as_deref().unwrap().contains("<|im_start|>"));
    let unique: std::collections::HashSet<&String> = v.tokens.iter().collect();
    assert_eq!(
        unique.len(),
        v.tokens.len(),
        "llama.cpp refuses a token twice"
    );
}

#[test]
fn qwen_vocabulary_reads_back_with_transformers_ids() {
    let (tok, v) = qwen_vocab();
    let back = Tokenizer::from_gguf_vocab(&v, Path::new("qwen.gguf")).unwrap();
    assert_eq!(back.eos_id(), tok.eos_id());
    assert_eq!(back.config().chat_template, tok.config().chat_template);
    for g in goldens() {
        // llama.cpp does not normalise: text that NFC changes (a combining accent) is split as
        // written, where Qwen's own tokenizer composes it first.
        if g.text.contains('\u{301}') {
            assert_ne!(back.encode(&g.text).unwrap(), g.ids);
            continue;
        }
        assert_eq!(back.encode(&g.text).unwrap(), g.ids, "{:?}", g.text);
        assert_eq!(back.decode(&g.ids).unwrap(), g.decoded, "{:?}", g.text);
    }
    // Written again, the vocabulary is the same.
    let again = back.to_gguf_vocab(151_936).unwrap();
    assert!(again.tokens == v.tokens, "tokens");
    assert!(again.token_types == v.token_types, "token types");
    assert!(again.merges == v.merges, "merges");
    assert_eq!(
        (
            &again.model,
            &again.pre,
            again.bos,
            again.eos,
            again.unk,
            again.pad
        ),
        (&v.model, &v.pre, v.bos, v.eos, v.unk, v.pad)
    );
    assert_eq!(
        (again.add_bos, again.add_eos, again.add_space_prefix),
        (v.add_bos, v.add_eos, v.add_space_prefix)
    );
    assert!(again.chat_template == v.chat_template, "template");
    assert!(again.scores == v.scores, "scores");
}

#[test]
fn what_gguf_cannot_hold_is_refused_by_name() {
    let (_, v) = qwen_vocab();
    let path = Path::new("x.gguf");
    let err = |v: &GgufVocab| Tokenizer::from_gguf_vocab(v, path).unwrap_err().to_string();
    let msg = err(&GgufVocab {
        pre: Some("tekken".into()),
        ..v.clone()
    });
    assert!(
        msg.contains("x.gguf") && msg.contains("\"tekken\""),
        "{msg}"
    );
    let msg = err(&GgufVocab {
        model: "bert".into(),
        ..v.clone()
    });
    assert!(msg.contains("tokenizer.ggml.model \"bert\""), "{msg}");
    let msg = err(&GgufVocab {
        merges: vec![],
        ..v.clone()
    });
    assert!(msg.contains("tokenizer.ggml.merges"), "{msg}");
    let mut twice = v.clone();
    twice.tokens[5] = twice.tokens[4].clone();
    assert!(err(&twice).contains("appears twice"));
    let msg = err(&GgufVocab {
        eos: Some(200_000),
        ..v.clone()
    });
    assert!(msg.contains("tokenizer.ggml.eos_token_id"), "{msg}");
    let msg = err(&GgufVocab {
        token_types: vec![1; 3],
        ..v
    });
    assert!(msg.contains("tokenizer.ggml.token_type"), "{msg}");

    let chars = sft_tokenizer::CharTokenizer::from_corpus(
        ["abc"],
        &sft_tokenizer::CHATML_SPECIALS,
        sft_tokenizer::CharRoles {
            bos_token: None,
            eos_token: Some("<|im_end|>".into()),
            pad_token: None,
            unk_token: "<|unk|>".into(),
        },
    )
    .unwrap();
    let msg = Tokenizer::from_char(chars)
        .to_gguf_vocab(64)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("char-level"), "{msg}");
}
