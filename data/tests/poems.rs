//! The nanopoet template: exact ids with markers, metadata dropout (seeded, per epoch, extremes),
//! targets from `<|content|>` through `<|/content|>`, and the preflight report on poems.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sft_data::{
    metadata_keep, prepare, read_jsonl, render_record, InvalidPolicy, Poem, ReadOutcome, Record,
    RenderOptions, RenderOutcome, Rendered, Sample, Source, Template, TemplateChoice, TemplateKind,
    TrainOn,
};
use sft_tokenizer::{CharRoles, CharTokenizer, Tokenizer, POEM_SPECIALS};

fn poems_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/poems/poems-small.jsonl")
}

fn read() -> ReadOutcome {
    read_jsonl(&poems_path(), None, InvalidPolicy::Error).unwrap()
}

/// A char tokenizer over the fixture's characters plus those of the hand-written poems below.
fn poem_tokenizer(read: &ReadOutcome) -> Tokenizer {
    let mut texts: Vec<String> = vec!["李白静夜思床前明月光五言".into()];
    for r in &read.records {
        let Sample::Poem(p) = &r.sample else { panic!() };
        texts.extend([
            p.author.clone(),
            p.style.clone(),
            p.title.clone(),
            p.content.clone(),
        ]);
    }
    let roles = CharRoles {
        bos_token: Some(POEM_SPECIALS.begin.into()),
        eos_token: Some(POEM_SPECIALS.content.1.into()),
        pad_token: Some(POEM_SPECIALS.pad.into()),
        unk_token: POEM_SPECIALS.unk.into(),
    };
    let ct = CharTokenizer::from_corpus(
        texts.iter().map(String::as_str),
        &POEM_SPECIALS.all(),
        roles,
    )
    .unwrap();
    Tokenizer::from_char(ct)
}

fn record(poem: Poem) -> Record {
    Record {
        sample: Sample::Poem(poem),
        format: sft_data::Format::Poem,
        source: Source {
            file: Arc::from(Path::new("poems.jsonl")),
            line: 1,
        },
    }
}

fn jing_ye_si() -> Poem {
    Poem {
        author: "李白".into(),
        style: String::new(),
        title: "静夜思".into(),
        content: "床前明月光".into(),
    }
}

fn render(
    rec: &Record,
    tok: &Tokenizer,
    opts: &RenderOptions,
    epoch: u64,
    index: usize,
) -> Rendered {
    let t = Template::new(TemplateChoice::Auto, tok).unwrap();
    match render_record(rec, &t, tok, opts, epoch, index).unwrap() {
        RenderOutcome::Kept { rendered, .. } => rendered,
        other => panic!("{other:?}"),
    }
}

fn opts(keep: f64) -> RenderOptions {
    RenderOptions {
        metadata_keep_prob: keep,
        ..RenderOptions::default()
    }
}

#[test]
fn exact_ids_with_markers_and_empty_fields_skipped() {
    let read = read();
    let tok = poem_tokenizer(&read);
    let id = |s: &str| tok.token_to_id(s).unwrap();
    let chars = |s: &str| s.chars().map(|c| id(&c.to_string())).collect::<Vec<_>>();
    let r = render(&record(jing_ye_si()), &tok, &opts(1.0), 0, 0);
    let mut want = vec![id("<|begin|>"), id("<|author|>")];
    want.extend(chars("李白"));
    want.extend([id("<|/author|>"), id("<|title|>")]);
    want.extend(chars("静夜思"));
    want.extend([id("<|/title|>"), id("<|content|>")]);
    want.extend(chars("床前明月光"));
    want.push(id("<|/content|>"));
    assert_eq!(r.ids(), want.as_slice(), "the empty style is left out");
    let content_at = want.iter().position(|&x| x == id("<|content|>")).unwrap();
    let mask: Vec<bool> = (0..want.len()).map(|i| i >= content_at).collect();
    assert_eq!(r.loss_mask(), mask.as_slice());
    assert_eq!(
        tok.decode(r.ids()).unwrap(),
        "<|begin|><|author|>李白<|/author|><|title|>静夜思<|/title|><|content|>床前明月光<|/content|>"
    );
    let all = render(
        &record(jing_ye_si()),
        &tok,
        &RenderOptions {
            train_on: Some(TrainOn::All),
            ..opts(1.0)
        },
        0,
        0,
    );
    assert!(all.loss_mask().iter().all(|&m| m));

    // Keep probability 0: no metadata at all.
    let none = render(&record(jing_ye_si()), &tok, &opts(0.0), 0, 0);
    let mut want = vec![id("<|begin|>"), id("<|content|>")];
    want.extend(chars("床前明月光"));
    want.push(id("<|/content|>"));
    assert_eq!(none.ids(), want.as_slice());
    assert_eq!(none.n_targets(), want.len() - 1);
}

#[test]
fn markers_in_poem_text_stay_text() {
    let read = read();
    let tok = poem_tokenizer(&read);
    let mut p = jing_ye_si();
    p.content = "床<|content|>光".into();
    let r = render(&record(p), &tok, &opts(0.0), 0, 0);
    let content = tok.token_to_id("<|content|>").unwrap();
    assert_eq!(r.ids().iter().filter(|&&x| x == content).count(), 1);
}

#[test]
fn dropout_is_a_pure_function_of_seed_epoch_and_index() {
    for index in 0..50 {
        assert_eq!(
            metadata_keep(7, 3, index, 0.5),
            metadata_keep(7, 3, index, 0.5)
        );
    }
    let draws = |seed: u64, epoch: u64| -> Vec<[bool; 3]> {
        (0..200)
            .map(|i| metadata_keep(seed, epoch, i, 0.5))
            .collect()
    };
    assert_ne!(draws(7, 0), draws(7, 1), "another epoch drops other fields");
    assert_ne!(draws(7, 0), draws(8, 0), "another seed drops other fields");
    // Fields are kept about half the time, independently of each other.
    let d = draws(7, 0);
    for field in 0..3 {
        let kept = d.iter().filter(|k| k[field]).count();
        assert!((70..=130).contains(&kept), "field {field}: {kept}/200");
    }
    assert!(d.iter().any(|k| k[0] != k[1]));
    assert!((0..200).all(|i| metadata_keep(1, 2, i, 1.0) == [true; 3]));
    assert!((0..200).all(|i| metadata_keep(1, 2, i, 0.0) == [false; 3]));
}

#[test]
fn rendering_applies_the_dropout_and_repeats_it() {
    let read = read();
    let tok = poem_tokenizer(&read);
    let rec = &read.records[0];
    let author = tok.token_to_id("<|author|>").unwrap();
    let has_author = |epoch: u64| {
        render(rec, &tok, &opts(0.5), epoch, 0)
            .ids()
            .contains(&author)
    };
    let epochs: Vec<bool> = (0..32).map(has_author).collect();
    assert!(
        epochs.iter().any(|&b| b) && epochs.iter().any(|&b| !b),
        "{epochs:?}"
    );
    for (e, &had) in epochs.iter().enumerate() {
        assert_eq!(
            has_author(e as u64),
            had,
            "epoch {e} renders the same again"
        );
        assert_eq!(had, metadata_keep(0, e as u64, 0, 0.5)[0]);
    }
}

#[test]
fn prompts_stop_ids_and_template_errors() {
    let read = read();
    let tok = poem_tokenizer(&read);
    let t = Template::new(TemplateChoice::Auto, &tok).unwrap();
    assert_eq!(t.kind(), TemplateKind::Poem);
    assert_eq!(t.stop_ids(), [tok.token_to_id("<|/content|>").unwrap()]);
    let prompt = t.render_prompt(&Sample::Poem(jing_ye_si()), &tok).unwrap();
    assert_eq!(
        tok.decode(&prompt).unwrap(),
        "<|begin|><|author|>李白<|/author|><|title|>静夜思<|/title|><|content|>"
    );
    // No chat template and no ChatML tokens: conversations get a clear error, at render time.
    let chat = sft_data::Conversation::new(
        vec![
            sft_data::Message::new(sft_data::Role::User, "床"),
            sft_data::Message::new(sft_data::Role::Assistant, "光"),
        ],
        None,
    )
    .unwrap();
    let err = t.render_prompt(&Sample::Chat(chat), &tok).unwrap_err();
    assert!(err.to_string().contains("set `template`"), "{err}");
    // The Qwen tokenizer has no poem markers.
    let qwen = Tokenizer::from_path(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/qwen3-tokenizer"),
    )
    .unwrap();
    let err = Template::new(TemplateChoice::Poem, &qwen).unwrap_err();
    assert!(err.to_string().contains("<|begin|>"), "{err}");
}

#[test]
fn prepare_is_deterministic_and_reports() {
    let mut read = read();
    let tok = poem_tokenizer(&read);
    // One poem with characters the tokenizer has never seen.
    let mut odd = jing_ye_si();
    odd.content = "床前ΩΩ光".into();
    read.records.push(record(odd));
    let t = Template::new(TemplateChoice::Auto, &tok).unwrap();
    let o = RenderOptions {
        seed: 3,
        ..RenderOptions::default()
    };
    let a = prepare(&read, &t, &tok, &o, 1).unwrap();
    let b = prepare(&read, &t, &tok, &o, 1).unwrap();
    assert_eq!(a.samples, b.samples);
    let c = prepare(&read, &t, &tok, &o, 2).unwrap();
    assert_ne!(a.samples, c.samples, "another epoch, other drops");
    let r = &a.report;
    assert_eq!(r.records_read, 1525);
    assert_eq!(r.kept, 1525);
    assert_eq!(r.unknown_tokens, 2);
    assert_eq!(
        r.total_tokens,
        a.samples.iter().map(|(_, s)| s.len()).sum::<usize>()
    );
    assert_eq!(
        r.target_tokens,
        a.samples.iter().map(|(_, s)| s.n_targets()).sum::<usize>()
    );
    assert_eq!(r.example.len(), a.samples[0].1.len());
    assert_eq!(r.template, "poem");
    let text = r.to_string();
    assert!(text.contains("samples kept     1525"), "{text}");
    assert!(text.contains("2 unknown"), "{text}");

    // A length limit drops (and counts) the long poems.
    let lengths: Vec<usize> = a.samples.iter().map(|(_, s)| s.len()).collect();
    let max = lengths.iter().copied().max().unwrap();
    let limit = o.clone();
    let limited = prepare(
        &read,
        &t,
        &tok,
        &RenderOptions {
            max_len: Some(max - 1),
            ..limit
        },
        1,
    )
    .unwrap();
    let too_long = lengths.iter().filter(|&&l| l > max - 1).count();
    assert!(too_long > 0);
    assert_eq!(limited.report.dropped["too_long"], too_long);
    assert_eq!(limited.report.kept + too_long, 1525);
}
