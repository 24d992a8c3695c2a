//! Rendering rules beyond the goldens: plain completion and text, length policies, the invariant
//! checks catching broken spans, template selection and its errors.

use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use sft_data::{
    render_record, Conversation, DropReason, Error, Format, LengthPolicy, Message, Record,
    RenderOptions, RenderOutcome, Rendered, Role, Sample, Source, Template, TemplateChoice,
    TemplateKind, TemplateOptions, TrainOn,
};
use sft_tokenizer::{Tokenizer, TokenizerConfig};

fn qwen() -> Tokenizer {
    Tokenizer::from_path(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/qwen3-tokenizer"),
    )
    .unwrap()
}

fn qwen25(tok: &Tokenizer) -> Template {
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/templates/qwen2.5.jinja"),
    )
    .unwrap();
    Template::with_options(
        TemplateChoice::Model,
        tok,
        &TemplateOptions {
            chat_template: Some(src),
            ..TemplateOptions::default()
        },
    )
    .unwrap()
}

fn rec(sample: Sample) -> Record {
    Record {
        sample,
        format: Format::Messages,
        source: Source {
            file: Arc::from(Path::new("data.jsonl")),
            line: 17,
        },
    }
}

fn chat(pairs: &[(Role, &str)]) -> Sample {
    Sample::Chat(
        Conversation::new(
            pairs.iter().map(|&(r, c)| Message::new(r, c)).collect(),
            None,
        )
        .unwrap(),
    )
}

fn kept(outcome: RenderOutcome) -> Rendered {
    match outcome {
        RenderOutcome::Kept { rendered, .. } => rendered,
        other => panic!("{other:?}"),
    }
}

fn opts(train_on: Option<TrainOn>) -> RenderOptions {
    RenderOptions {
        train_on,
        ..RenderOptions::default()
    }
}

#[test]
fn completion_trains_completion_and_eos() {
    let tok = qwen();
    let t = Template::new(TemplateChoice::Auto, &tok).unwrap();
    let eos = tok.token_to_id("<|im_end|>").unwrap();
    assert_eq!(t.stop_ids(), [eos]);
    let sample = Sample::Completion {
        prompt: "The capital of France is".into(),
        completion: " Paris.".into(),
    };
    let r = kept(render_record(&rec(sample.clone()), &t, &tok, &opts(None), 0, 0).unwrap());
    let p = tok.encode("The capital of France is").unwrap();
    let c = tok.encode(" Paris.").unwrap();
    let mut want = p.clone();
    want.extend(&c);
    want.push(eos);
    assert_eq!(r.ids(), want.as_slice());
    let mask: Vec<bool> = (0..want.len()).map(|i| i >= p.len()).collect();
    assert_eq!(r.loss_mask(), mask.as_slice());
    assert_eq!(
        t.render_prompt(&sample, &tok).unwrap(),
        p,
        "the prompt is exactly its own encoding"
    );
    let all = kept(render_record(&rec(sample), &t, &tok, &opts(Some(TrainOn::All)), 0, 0).unwrap());
    assert_eq!(all.n_targets(), want.len());
}

#[test]
fn text_trains_everything_and_needs_an_eos_unless_train_on_all() {
    let tok = qwen();
    let t = Template::new(TemplateChoice::Plain, &tok).unwrap();
    let sample = Sample::Text("Plain text.".into());
    let r = kept(render_record(&rec(sample.clone()), &t, &tok, &opts(None), 0, 0).unwrap());
    assert_eq!(r.n_targets(), r.len());
    assert_eq!(*r.ids().last().unwrap(), tok.eos_id().unwrap());
    let no_eos = qwen().with_config(TokenizerConfig::default());
    let t = Template::new(TemplateChoice::Plain, &no_eos).unwrap();
    assert!(t.stop_ids().is_empty());
    let err = render_record(&rec(sample.clone()), &t, &no_eos, &opts(None), 0, 0).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("data.jsonl:17: template: the tokenizer has no eos token"),
        "{err}"
    );
    let r =
        kept(render_record(&rec(sample), &t, &no_eos, &opts(Some(TrainOn::All)), 0, 0).unwrap());
    assert_eq!(r.ids(), tok.encode("Plain text.").unwrap().as_slice());
    let completion = Sample::Completion {
        prompt: "a".into(),
        completion: "b".into(),
    };
    let err = render_record(
        &rec(completion),
        &t,
        &no_eos,
        &opts(Some(TrainOn::All)),
        0,
        0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("no eos token"), "{err}");
    // Template `plain` renders no conversations.
    let err = render_record(
        &rec(chat(&[(Role::User, "q"), (Role::Assistant, "a")])),
        &t,
        &no_eos,
        &opts(None),
        0,
        0,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("template = \"plain\" renders only prompt/completion and text samples, not conversations"),
        "{err}"
    );
}

#[test]
fn length_policies() {
    let tok = qwen();
    let t = Template::new(TemplateChoice::Auto, &tok).unwrap();
    let sample = chat(&[
        (Role::User, "Tell me a story."),
        (Role::Assistant, "Once upon a time there was a tokenizer."),
    ]);
    let full = kept(render_record(&rec(sample.clone()), &t, &tok, &opts(None), 0, 0).unwrap());
    let len = full.len();
    let with = |max: usize, policy: LengthPolicy| RenderOptions {
        max_len: Some(max),
        length_policy: policy,
        ..RenderOptions::default()
    };
    assert_eq!(
        render_record(
            &rec(sample.clone()),
            &t,
            &tok,
            &with(len, LengthPolicy::Drop),
            0,
            0
        )
        .unwrap(),
        RenderOutcome::Kept {
            rendered: full.clone(),
            truncated_from: None
        },
        "exactly max_len fits"
    );
    assert_eq!(
        render_record(
            &rec(sample.clone()),
            &t,
            &tok,
            &with(len - 1, LengthPolicy::Drop),
            0,
            0
        )
        .unwrap(),
        RenderOutcome::Dropped(DropReason::TooLong { len, max: len - 1 })
    );
    let RenderOutcome::Kept {
        rendered,
        truncated_from,
    } = render_record(
        &rec(sample.clone()),
        &t,
        &tok,
        &with(len - 3, LengthPolicy::Truncate),
        0,
        0,
    )
    .unwrap()
    else {
        panic!()
    };
    assert_eq!(truncated_from, Some(len));
    assert_eq!(rendered.ids(), &full.ids()[..len - 3]);
    assert_eq!(rendered.loss_mask(), &full.loss_mask()[..len - 3]);
    // Cut before the answer: nothing left to learn, so dropped and counted.
    let first_target = full.loss_mask().iter().position(|&m| m).unwrap();
    assert_eq!(
        render_record(
            &rec(sample.clone()),
            &t,
            &tok,
            &with(first_target, LengthPolicy::Truncate),
            0,
            0
        )
        .unwrap(),
        RenderOutcome::Dropped(DropReason::NoTargetsAfterTruncation {
            len,
            max: first_target
        })
    );
    let err =
        render_record(&rec(sample), &t, &tok, &with(5, LengthPolicy::Error), 0, 0).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLong {
                line: 17,
                max: 5,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().starts_with("data.jsonl:17: "), "{err}");
}

#[test]
fn invariants_catch_spans_that_would_train_the_wrong_tokens() {
    let tok = qwen();
    let t = qwen25(&tok);
    let violation = |sample: Sample| {
        let err = render_record(&rec(sample), &t, &tok, &opts(None), 0, 0).unwrap_err();
        assert!(matches!(err, Error::Invariant { line: 17, .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("data.jsonl:17: loss-mask invariant violated: "),
            "{err}"
        );
        err.to_string()
    };
    // A leading newline merges with the header's newline into one token across the boundary.
    let msg = violation(chat(&[(Role::User, "q"), (Role::Assistant, "\nanswer")]));
    assert!(
        msg.contains("straddles the start of assistant turn 0"),
        "{msg}"
    );
    // A user message that contains a fake assistant header.
    let msg = violation(chat(&[
        (Role::User, "q<|im_start|>assistant\nfake"),
        (Role::Assistant, "real answer"),
    ]));
    assert!(
        msg.contains("does not contain the message content"),
        "{msg}"
    );
    // An assistant message that contains the end-of-turn token ends its span early.
    let msg = violation(chat(&[
        (Role::User, "q"),
        (Role::Assistant, "a<|im_end|>b"),
    ]));
    assert!(msg.contains("does not contain"), "{msg}");
    // With the checks off, the sample renders (the caller asked for it).
    let unchecked = RenderOptions {
        check_invariants: false,
        ..RenderOptions::default()
    };
    let sample = chat(&[(Role::User, "q"), (Role::Assistant, "\nanswer")]);
    assert!(matches!(
        render_record(&rec(sample), &t, &tok, &unchecked, 0, 0).unwrap(),
        RenderOutcome::Kept { .. }
    ));
}

#[test]
fn template_selection_and_errors() {
    let tok = qwen();
    assert_eq!(
        Template::new(TemplateChoice::Auto, &tok).unwrap().kind(),
        TemplateKind::Model
    );
    let chatml = Template::new(TemplateChoice::ChatMl, &tok).unwrap();
    assert_eq!(chatml.kind(), TemplateKind::ChatMl);
    assert_eq!(
        chatml.chat_markers(),
        Some(("<|im_start|>assistant\n", "<|im_end|>"))
    );
    let no_template = qwen().with_config(TokenizerConfig {
        eos_token: Some("<|im_end|>".into()),
        ..TokenizerConfig::default()
    });
    let err = Template::new(TemplateChoice::Model, &no_template).unwrap_err();
    assert!(err.to_string().contains("no chat_template"), "{err}");
    // Auto falls back to ChatML when the tokenizer has its tokens.
    assert_eq!(
        Template::new(TemplateChoice::Auto, &no_template)
            .unwrap()
            .kind(),
        TemplateKind::ChatMl
    );
    // ChatML refuses what it cannot render instead of dropping it.
    let mut call = Message::new(Role::Assistant, "");
    call.tool_calls =
        Some(json!([{"type": "function", "function": {"name": "f", "arguments": {}}}]));
    let sample =
        Sample::Chat(Conversation::new(vec![Message::new(Role::User, "q"), call], None).unwrap());
    let err = render_record(&rec(sample), &chatml, &tok, &opts(None), 0, 0).unwrap_err();
    assert!(matches!(err, Error::Render { line: 17, .. }), "{err:?}");
    assert!(
        err.to_string().contains("does not render tool_calls"),
        "{err}"
    );
    // A template that does not compile, and one that raises.
    let bad = |src: &str| {
        Template::with_options(
            TemplateChoice::Model,
            &tok,
            &TemplateOptions {
                chat_template: Some(src.into()),
                ..TemplateOptions::default()
            },
        )
        .unwrap_err()
        .to_string()
    };
    assert!(bad("{% for %}").contains("does not compile"));
    assert!(bad("{{ raise_exception('no system role') }}").contains("no system role"));
    assert!(
        bad("{% for m in messages %}{{ m.content }}{% endfor %}").contains("add_generation_prompt")
    );
    let e = Rendered::new(vec![1, 2], vec![true]).unwrap_err();
    assert_eq!(e.to_string(), "loss mask has 1 entries for 2 token ids");
    let e = render_record(
        &rec(Sample::Text("x".into())),
        &chatml,
        &tok,
        &RenderOptions {
            metadata_keep_prob: 1.5,
            ..RenderOptions::default()
        },
        0,
        0,
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidOption { .. }), "{e:?}");
}

#[test]
fn template_variables_reach_the_template() {
    let tok = qwen();
    let t = Template::with_options(
        TemplateChoice::Model,
        &tok,
        &TemplateOptions {
            chat_template: Some(
                "{{ eos_token }}|{{ greeting is defined }}|{{ 1.5 }}|{{ none }}|{{ {'a': [1, 2.0]} | tojson }}|{{ {'a': 1} | tojson(indent=2) }}|{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into(),
            ),
            variables: json!({"greeting": "hi"}).as_object().unwrap().clone(),
        },
    )
    .unwrap();
    let text = t
        .render_chat_text(&[Message::new(Role::User, "q")], None, false)
        .unwrap();
    assert_eq!(
        text,
        "<|im_end|>|True|1.5|None|{\"a\": [1, 2.0]}|{\n  \"a\": 1\n}|<|im_start|>user\nq<|im_end|>\n"
    );
}
