//! Chat templates against `transformers`: rendered text, ids and assistant masks for the Qwen3 and
//! Qwen2.5 templates, from `tests/data/golden/chat_templates.jsonl` (written by
//! `tests/data/scripts/golden_data.py`).

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
}

fn rows() -> Vec<Row> {
    let text = std::fs::read_to_string(data_dir().join("golden/chat_templates.jsonl")).unwrap();
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
