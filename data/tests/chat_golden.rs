//! Chat templates against `transformers`: rendered text, ids and assistant masks for the Qwen3 and
//! Qwen2.5 templates, from `tests/data/golden/chat_templates.jsonl` (written by
//! `tests/data/scripts/golden_data.py`), and for the Llama 3, Gemma and Mistral formats, from
//! `tests/data/golden/family_chat_templates.jsonl` (`golden_family_chat.py`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use sft_data::{
    render_record, Conversation, Format, Message, Record, RenderOptions, RenderOutcome, Rendered,
    Sample, Source, Template, TemplateChoice, TemplateOptions, TrainOn,
};
use sft_tokenizer::Tokenizer;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

fn qwen() -> Tokenizer {
    Tokenizer::from_path(&data_dir().join("qwen3-tokenizer")).unwrap()
}

fn template(name: &str, variables: &Value, tok: &Tokenizer) -> Template {
    let chat_template = match name {
        "qwen3" => None,
        "qwen2.5" => {
            Some(std::fs::read_to_string(data_dir().join("templates/qwen2.5.jinja")).unwrap())
        }
        other => panic!("unknown template {other}"),
    };
    let opts = TemplateOptions {
        chat_template,
        variables: variables.as_object().cloned().unwrap_or_default(),
    };
    Template::with_options(TemplateChoice::Model, tok, &opts).unwrap()
}

struct Row {
    template: String,
    case: String,
    messages: Vec<Message>,
    tools: Option<Value>,
    variables: Value,
    record: Option<Value>,
    text: String,
    ids: Vec<u32>,
    mask: Option<Vec<bool>>,
    turns: Vec<(usize, usize)>,
    prompt_text: String,
    prompt_ids: Vec<u32>,
    /// Family rows: the special tokens added to the Qwen fixture, its bos/eos and end of turn.
    tokenizer: Value,
}

fn rows() -> Vec<Row> {
    rows_of("golden/chat_templates.jsonl")
}

fn rows_of(file: &str) -> Vec<Row> {
    let text = std::fs::read_to_string(data_dir().join(file)).unwrap();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            Row {
                template: v["template"].as_str().unwrap().into(),
                case: v["case"].as_str().unwrap().into(),
                messages: serde_json::from_value(v["messages"].clone()).unwrap(),
                tools: Some(v["tools"].clone()).filter(|t| !t.is_null()),
                variables: v["variables"].clone(),
                record: Some(v["record"].clone()).filter(|t| !t.is_null()),
                text: v["text"].as_str().unwrap().into(),
                ids: serde_json::from_value(v["ids"].clone()).unwrap(),
                mask: v["assistant_mask"]
                    .as_array()
                    .map(|m| m.iter().map(|x| x.as_u64().unwrap() == 1).collect()),
                turns: v["turns"]
                    .as_array()
                    .map(|t| {
                        t.iter()
                            .map(|r| {
                                (
                                    r[0].as_u64().unwrap() as usize,
                                    r[1].as_u64().unwrap() as usize,
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                prompt_text: v["prompt_text"].as_str().unwrap().into(),
                prompt_ids: serde_json::from_value(v["prompt_ids"].clone()).unwrap(),
                tokenizer: v["tokenizer"].clone(),
            }
        })
        .collect()
}

fn source(case: &str) -> Source {
    Source {
        file: Arc::from(Path::new(&format!("{case}.jsonl"))),
        line: 1,
    }
}

fn render(rec: &Record, t: &Template, tok: &Tokenizer, train_on: TrainOn) -> Rendered {
    let opts = RenderOptions {
        train_on: Some(train_on),
        ..RenderOptions::default()
    };
    match render_record(rec, t, tok, &opts, 0, 0).unwrap() {
        RenderOutcome::Kept { rendered, .. } => rendered,
        other => panic!("dropped: {other:?}"),
    }
}

#[test]
fn golden_file_covers_both_templates_and_all_cases() {
    let rows = rows();
    for t in ["qwen3", "qwen2.5"] {
        assert!(rows.iter().filter(|r| r.template == t).count() >= 14, "{t}");
    }
    assert!(rows.iter().any(|r| r.tools.is_some()));
    assert!(rows.iter().any(|r| r.mask.is_none()));
}

#[test]
fn text_ids_and_prompts_match_transformers() {
    let tok = qwen();
    for row in rows() {
        let t = template(&row.template, &row.variables, &tok);
        let ctx = format!("{} / {}", row.template, row.case);
        let text = t
            .render_chat_text(&row.messages, row.tools.as_ref(), false)
            .unwrap();
        assert_eq!(text, row.text, "{ctx}");
        assert_eq!(tok.encode(&text).unwrap(), row.ids, "{ctx}");
        let conv = Conversation::new(row.messages.clone(), row.tools.clone()).unwrap();
        let sample = Sample::Chat(conv);
        assert_eq!(
            t.render_prompt(&sample, &tok).unwrap(),
            row.prompt_ids,
            "{ctx}"
        );
        let last = row
            .messages
            .iter()
            .rposition(|m| m.role == sft_data::Role::Assistant)
            .unwrap();
        assert_eq!(
            t.render_chat_text(&row.messages[..last], row.tools.as_ref(), true)
                .unwrap(),
            row.prompt_text,
            "{ctx}"
        );
    }
}

#[test]
fn masks_match_transformers_generation_blocks() {
    let tok = qwen();
    let mut checked = 0;
    for row in rows() {
        let Some(golden) = &row.mask else { continue };
        let t = template(&row.template, &row.variables, &tok);
        let ctx = format!("{} / {}", row.template, row.case);
        let rec = Record {
            sample: Sample::Chat(
                Conversation::new(row.messages.clone(), row.tools.clone()).unwrap(),
            ),
            format: Format::Messages,
            source: source(&row.case),
        };
        let r = render(&rec, &t, &tok, TrainOn::Assistant);
        assert_eq!(r.ids(), row.ids.as_slice(), "{ctx}");
        assert_eq!(r.loss_mask(), golden.as_slice(), "{ctx}");
        // Last (and completion, its alias for chats): only the final generation block.
        let (a, b) = *row.turns.last().unwrap();
        let last: Vec<bool> = (0..row.ids.len()).map(|i| i >= a && i < b).collect();
        for mode in [TrainOn::Last, TrainOn::Completion] {
            assert_eq!(
                render(&rec, &t, &tok, mode).loss_mask(),
                last.as_slice(),
                "{ctx} {mode}"
            );
        }
        assert!(
            render(&rec, &t, &tok, TrainOn::All)
                .loss_mask()
                .iter()
                .all(|&m| m),
            "{ctx}"
        );
        // Every target run ends with the end-of-turn token, which is therefore trained.
        for &(_, b) in &row.turns {
            assert_eq!(
                tok.id_to_token(row.ids[b - 1]).unwrap(),
                "<|im_end|>",
                "{ctx}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 25, "{checked}");
}

#[test]
fn records_convert_like_llama_factory() {
    let mut checked = 0;
    for row in rows() {
        let Some(record) = &row.record else { continue };
        let rec = Record::from_json(record.clone(), None, source(&row.case)).unwrap();
        let Sample::Chat(conv) = &rec.sample else {
            panic!("{}", row.case)
        };
        assert_eq!(conv.messages(), row.messages.as_slice(), "{}", row.case);
        assert_eq!(conv.tools(), row.tools.as_ref(), "{}", row.case);
        let format = row.case.split('_').skip(2).collect::<Vec<_>>().join("_");
        assert_eq!(rec.format.name(), format, "{}", row.case);
        checked += 1;
    }
    assert_eq!(checked, 10);
}

#[test]
fn qwen3_thinking_off_puts_the_empty_think_block_in_the_prompt() {
    let tok = qwen();
    let row = rows()
        .into_iter()
        .find(|r| r.case == "qwen3_enable_thinking_false")
        .unwrap();
    let t = template("qwen3", &row.variables, &tok);
    assert_eq!(
        t.chat_markers().unwrap().0,
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    );
    let rec = Record {
        sample: Sample::Chat(Conversation::new(row.messages.clone(), None).unwrap()),
        format: Format::Messages,
        source: source(&row.case),
    };
    let r = render(&rec, &t, &tok, TrainOn::Assistant);
    assert_eq!(r.ids(), row.ids.as_slice());
    assert_eq!(
        targets(&r, &tok),
        ["Hello!<|im_end|>", "Goodbye!<|im_end|>"]
    );
    assert!(row
        .prompt_text
        .ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
}

/// The decoded text of each run of targets.
fn targets(r: &Rendered, tok: &Tokenizer) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    for (&id, &m) in r.ids().iter().zip(r.loss_mask()) {
        if m {
            cur.push(id);
        } else if !cur.is_empty() {
            runs.push(tok.decode(&std::mem::take(&mut cur)).unwrap());
        }
    }
    if !cur.is_empty() {
        runs.push(tok.decode(&cur).unwrap());
    }
    runs
}

/// A family row's tokenizer, as a checkpoint would ship it: the Qwen fixture's `tokenizer.json`
/// with the family's special tokens added, and a `tokenizer_config.json` naming its bos/eos and
/// holding the family's template (tests/data/templates/NAME.jinja), loaded from a directory.
fn family_tokenizer(name: &str, spec: &Value) -> Tokenizer {
    // One directory per call: tests run in parallel in one process.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("sft-family-chat-{}-{name}-{k}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = data_dir().join("qwen3-tokenizer");
    let mut tj: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("tokenizer.json")).unwrap())
            .unwrap();
    let added = tj["added_tokens"].as_array_mut().unwrap();
    for pair in spec["added"].as_array().unwrap() {
        added.push(serde_json::json!({
            "id": pair[1], "content": pair[0], "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true,
        }));
    }
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    let template =
        std::fs::read_to_string(data_dir().join(format!("templates/{name}.jinja"))).unwrap();
    let config = serde_json::json!({
        "bos_token": spec["bos_token"],
        "eos_token": spec["eos_token"],
        "chat_template": template,
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    let tok = Tokenizer::from_path(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    tok
}

/// Llama 3, Gemma and Mistral: text, ids, prompts and assistant masks equal `transformers`'
/// from the checkpoint's own template, which has no `{% generation %}` markers (the spans come
/// from probing: Mistral's template has no generation prompt at all); every assistant span ends
/// with the family's end-of-turn token, which is trained and is what generation stops on.
#[test]
fn llama3_gemma_and_mistral_templates_match_transformers() {
    let rows = rows_of("golden/family_chat_templates.jsonl");
    let mut checked = std::collections::BTreeMap::new();
    let mut toks = std::collections::BTreeMap::new();
    for row in &rows {
        let tok = toks
            .entry(row.template.clone())
            .or_insert_with(|| family_tokenizer(&row.template, &row.tokenizer));
        let ctx = format!("{} / {}", row.template, row.case);
        for pair in row.tokenizer["added"].as_array().unwrap() {
            let id = tok.token_to_id(pair[0].as_str().unwrap()).unwrap();
            assert!(
                tok.is_special(id) && id as u64 == pair[1].as_u64().unwrap(),
                "{ctx}"
            );
        }
        let t =
            Template::with_options(TemplateChoice::Auto, tok, &TemplateOptions::default()).unwrap();
        let text = t.render_chat_text(&row.messages, None, false).unwrap();
        assert_eq!(text, row.text, "{ctx}");
        assert_eq!(tok.encode(&text).unwrap(), row.ids, "{ctx}");
        let sample = Sample::Chat(Conversation::new(row.messages.clone(), None).unwrap());
        assert_eq!(
            t.render_prompt(&sample, tok).unwrap(),
            row.prompt_ids,
            "{ctx}"
        );
        let rec = Record {
            sample,
            format: Format::Messages,
            source: source(&row.case),
        };
        let r = render(&rec, &t, tok, TrainOn::Assistant);
        assert_eq!(r.ids(), row.ids.as_slice(), "{ctx}");
        assert_eq!(
            r.loss_mask(),
            row.mask.as_ref().unwrap().as_slice(),
            "{ctx}"
        );
        let (a, b) = *row.turns.last().unwrap();
        let last: Vec<bool> = (0..row.ids.len()).map(|i| i >= a && i < b).collect();
        assert_eq!(
            render(&rec, &t, tok, TrainOn::Last).loss_mask(),
            last.as_slice(),
            "{ctx}"
        );
        let end = tok
            .token_to_id(row.tokenizer["end"].as_str().unwrap())
            .unwrap();
        for &(_, b) in &row.turns {
            assert_eq!(row.ids[b - 1], end, "{ctx}");
        }
        assert_eq!(
            t.stop_ids().first(),
            Some(&end),
            "{ctx}: generation stops on {end}"
        );
        *checked.entry(row.template.clone()).or_insert(0) += 1;
    }
    assert_eq!(
        checked.into_iter().collect::<Vec<_>>(),
        [
            ("gemma".into(), 5),
            ("llama3".into(), 5),
            ("mistral".into(), 5)
        ]
    );
}

/// Gemma's template has no system role: a system message opens the first user turn, and a
/// conversation that does not alternate is refused by the template itself, with its message.
#[test]
fn gemma_folds_the_system_message_and_refuses_roles_out_of_turn() {
    let rows = rows_of("golden/family_chat_templates.jsonl");
    let row = rows
        .iter()
        .find(|r| r.template == "gemma" && r.case == "system")
        .unwrap();
    assert!(row
        .text
        .starts_with("<bos><start_of_turn>user\nYou are a terse assistant.\n\nWhat is 2+2?"));
    let tok = family_tokenizer("gemma", &row.tokenizer);
    let t = Template::new(TemplateChoice::Auto, &tok).unwrap();
    let twice = [
        Message::new(sft_data::Role::User, "a"),
        Message::new(sft_data::Role::User, "b"),
    ];
    let err = t.render_chat_text(&twice, None, false).unwrap_err();
    assert!(err.to_string().contains("must alternate"), "{err}");
}
