//! Property tests over random conversations (hand-rolled, seeded): random role sequences and
//! random text (Chinese, newlines, runs of spaces, tabs, emoji). For every conversation the runs
//! of target tokens decode to exactly what each assistant turn should produce: its content and
//! `<|im_end|>` (ChatML, Qwen2.5), plus the think block where Qwen3 renders one.

use std::path::Path;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sft_data::{
    render_record, Conversation, Format, Message, Record, RenderOptions, RenderOutcome, Rendered,
    Role, Sample, Source, Template, TemplateChoice, TemplateOptions, TrainOn,
};
use sft_tokenizer::{CharRoles, CharTokenizer, Tokenizer, CHATML_SPECIALS};

const PIECES: [&str; 18] = [
    "hello",
    " world",
    "床前",
    "明月光",
    "，",
    "\n",
    "\n\n",
    " ",
    "   ",
    "\t",
    "42",
    "!",
    "🎉",
    "é",
    "x = 1;",
    "```",
    "“quoted”",
    "ok",
];

/// Random text that starts with `prefix` (so each message is recognisable) and never starts with
/// whitespace: a leading newline merges with the template's header newline into one BPE token,
/// which the invariants report as an error (tested in render.rs).
fn text(rng: &mut ChaCha8Rng, prefix: &str) -> String {
    let mut s = prefix.to_owned();
    for _ in 0..rng.random_range(0..12) {
        s.push_str(PIECES[rng.random_range(0..PIECES.len())]);
    }
    s
}

fn conversation(rng: &mut ChaCha8Rng, with_reasoning: bool) -> Vec<Message> {
    let mut msgs = Vec::new();
    if rng.random_bool(0.3) {
        msgs.push(Message::new(Role::System, text(rng, "S")));
    }
    let n = rng.random_range(1..8);
    for k in 0..n {
        let role = match rng.random_range(0..10) {
            0..=3 => Role::User,
            4..=8 => Role::Assistant,
            _ => Role::Tool,
        };
        let mut m = Message::new(
            role,
            text(rng, &format!("{}{k}", &role.name()[..1].to_uppercase())),
        );
        if role == Role::Assistant && with_reasoning && rng.random_bool(0.4) {
            m.reasoning_content = Some(format!("\n{}\n", text(rng, "R")));
        }
        msgs.push(m);
    }
    if !msgs.iter().any(|m| m.role == Role::Assistant) {
        msgs.push(Message::new(Role::Assistant, text(rng, "Alast")));
    }
    msgs
}

fn record(msgs: Vec<Message>) -> Record {
    Record {
        sample: Sample::Chat(Conversation::new(msgs, None).unwrap()),
        format: Format::Messages,
        source: Source {
            file: Arc::from(Path::new("random.jsonl")),
            line: 1,
        },
    }
}

fn render(rec: &Record, t: &Template, tok: &Tokenizer, train_on: TrainOn) -> Rendered {
    let opts = RenderOptions {
        train_on: Some(train_on),
        ..RenderOptions::default()
    };
    match render_record(rec, t, tok, &opts, 0, 0) {
        Ok(RenderOutcome::Kept { rendered, .. }) => rendered,
        other => panic!("{other:?}\n{rec:?}"),
    }
}

/// Decoded runs of consecutive targets.
fn target_runs(r: &Rendered, tok: &Tokenizer) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur = Vec::new();
    for (&id, &m) in r.ids().iter().zip(r.loss_mask()).chain([(&0, &false)]) {
        if m {
            cur.push(id);
        } else if !cur.is_empty() {
            runs.push(tok.decode(&std::mem::take(&mut cur)).unwrap());
        }
    }
    runs
}

/// What each assistant turn's targets must decode to, given how the template renders bodies.
fn expected_bodies(msgs: &[Message], body: impl Fn(usize, &Message) -> String) -> Vec<String> {
    msgs.iter()
        .enumerate()
        .filter(|(_, m)| m.role == Role::Assistant)
        .map(|(i, m)| body(i, m) + "<|im_end|>")
        .collect()
}

fn check(
    t: &Template,
    tok: &Tokenizer,
    seed: u64,
    n: usize,
    with_reasoning: bool,
    body: impl Fn(&[Message], usize, &Message) -> String,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for case in 0..n {
        let msgs = conversation(&mut rng, with_reasoning);
        let want = expected_bodies(&msgs, |i, m| body(&msgs, i, m));
        let rec = record(msgs);
        let r = render(&rec, t, tok, TrainOn::Assistant);
        assert_eq!(target_runs(&r, tok), want, "case {case}: {rec:?}");
        let last = render(&rec, t, tok, TrainOn::Last);
        assert_eq!(
            target_runs(&last, tok),
            want[want.len() - 1..],
            "case {case}"
        );
        assert_eq!(last.ids(), r.ids());
    }
}

fn qwen() -> Tokenizer {
    Tokenizer::from_path(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/qwen3-tokenizer"),
    )
    .unwrap()
}

#[test]
fn chatml_with_the_qwen_tokenizer() {
    let tok = qwen();
    let t = Template::new(TemplateChoice::ChatMl, &tok).unwrap();
    check(&t, &tok, 1, 300, false, |_, _, m| m.content.clone());
}

#[test]
fn chatml_with_a_char_tokenizer_even_with_leading_newlines() {
    let roles = CharRoles {
        bos_token: None,
        eos_token: Some("<|im_end|>".into()),
        pad_token: Some("<|pad|>".into()),
        unk_token: "<|unk|>".into(),
    };
    let corpus: String = PIECES.concat() + "SUATRlast0123456789";
    let ct = CharTokenizer::from_corpus([corpus.as_str()], &CHATML_SPECIALS, roles).unwrap();
    let tok = Tokenizer::from_char(ct);
    let t = Template::new(TemplateChoice::Auto, &tok).unwrap();
    assert_eq!(t.kind(), sft_data::TemplateKind::ChatMl);
    check(&t, &tok, 2, 300, false, |_, _, m| m.content.clone());
    // One character per token: a body that starts with a newline cannot merge with the header.
    let rec = record(vec![
        Message::new(Role::User, "x"),
        Message::new(Role::Assistant, "\n\nok"),
    ]);
    assert_eq!(
        target_runs(&render(&rec, &t, &tok, TrainOn::Assistant), &tok),
        ["\n\nok<|im_end|>"]
    );
}

#[test]
fn qwen25_template() {
    let tok = qwen();
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/templates/qwen2.5.jinja"),
    )
    .unwrap();
    let opts = TemplateOptions {
        chat_template: Some(src),
        ..TemplateOptions::default()
    };
    let t = Template::with_options(TemplateChoice::Model, &tok, &opts).unwrap();
    check(&t, &tok, 3, 300, true, |_, _, m| m.content.clone());
}

#[test]
fn qwen3_template_renders_think_blocks_after_the_last_query() {
    let tok = qwen();
    let t = Template::new(TemplateChoice::Auto, &tok).unwrap();
    check(&t, &tok, 4, 300, true, |msgs, i, m| {
        // The Qwen3 template's rule, restated: the last user query (or, without one, the last
        // message); assistant turns after it get a think block if they are the last message or
        // have reasoning.
        let last_query = msgs
            .iter()
            .rposition(|m| m.role == Role::User)
            .unwrap_or(msgs.len() - 1);
        let reasoning = m.reasoning_content.clone().unwrap_or_default();
        if i > last_query && (i == msgs.len() - 1 || !reasoning.is_empty()) {
            format!(
                "<think>\n{}\n</think>\n\n{}",
                reasoning.trim_matches('\n'),
                m.content.trim_start_matches('\n')
            )
        } else {
            m.content.clone()
        }
    });
}
