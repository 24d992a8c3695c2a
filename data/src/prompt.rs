//! Prompts for generation: a JSON object naming what the model is given, the answer left out.
//!
//! Any full record works (its answer part is dropped: chats end before the last assistant turn,
//! poems before their content). So do prompt-only forms: `{"messages": [...]}` without an
//! assistant turn, `{"prompt": ...}` without a completion, `{"instruction": ...}` or
//! `{"instruct": ...}` without an answer, and poem metadata without content
//! (`{"style": "七言绝句", "author": "李白"}`; `{}` asks for a poem with no metadata).

use serde_json::{Map, Value};
use sft_tokenizer::Tokenizer;

use crate::record::{parse_message, parse_tools, parse_value};
use crate::{Error, Message, Poem, Result, Role, Sample, Template};

const POEM_KEYS: [&str; 4] = ["author", "style", "title", "content"];

/// What a prompt object asks the model to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Rendered with the chat template and its generation prompt.
    Chat {
        messages: Vec<Message>,
        tools: Option<Value>,
    },
    /// Raw text, encoded as is.
    Plain(String),
    /// Begin marker, the given metadata, content-start marker.
    Poem(Poem),
}

impl Prompt {
    /// Parses a prompt object; errors name the field.
    pub fn from_json(value: &Value) -> Result<Prompt> {
        let Value::Object(obj) = value else {
            return Err(invalid(None, "a prompt must be a JSON object".into()));
        };
        if is_poem(obj) {
            let field = |k: &str| -> Result<String> {
                match obj.get(k) {
                    None | Some(Value::Null) => Ok(String::new()),
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(other) => Err(invalid(
                        Some(k),
                        format!("expected a string, found {other}"),
                    )),
                }
            };
            return Ok(Prompt::Poem(Poem {
                author: field("author")?,
                style: field("style")?,
                title: field("title")?,
                content: String::new(),
            }));
        }
        // A complete record: its own prompt part.
        if let Ok((sample, _)) = parse_value(value.clone(), None) {
            return Ok(match sample {
                Sample::Chat(conv) => {
                    let end = conv.last_assistant();
                    Prompt::Chat {
                        messages: conv.messages()[..end].to_vec(),
                        tools: conv.tools().cloned(),
                    }
                }
                Sample::Completion { prompt, .. } => Prompt::Plain(prompt),
                Sample::Text(text) => Prompt::Plain(text),
                Sample::Poem(p) => Prompt::Poem(Poem {
                    content: String::new(),
                    ..p
                }),
            });
        }
        let text = |k: &str| -> Result<Option<String>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(invalid(
                    Some(k),
                    format!("expected a string, found {other}"),
                )),
            }
        };
        if let Some(items) = obj.get("messages") {
            let Value::Array(items) = items else {
                return Err(invalid(Some("messages"), "expected an array".into()));
            };
            let mut messages = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let m = parse_message(item, &format!("messages[{i}]"))
                    .map_err(|b| invalid(b.field.as_deref(), b.reason))?;
                messages.push(m);
            }
            if messages.is_empty() {
                return Err(invalid(
                    Some("messages"),
                    "no messages to prompt with".into(),
                ));
            }
            let tools = parse_tools(obj).map_err(|b| invalid(b.field.as_deref(), b.reason))?;
            return Ok(Prompt::Chat { messages, tools });
        }
        if let Some(prompt) = text("prompt")? {
            return Ok(Prompt::Plain(prompt));
        }
        let user = |body: String, system: Option<String>| {
            let mut messages = Vec::new();
            if let Some(s) = system {
                messages.push(Message::new(Role::System, s));
            }
            messages.push(Message::new(Role::User, body));
            Prompt::Chat {
                messages,
                tools: None,
            }
        };
        if let Some(instruction) = text("instruction")? {
            // The same join as Alpaca records (see `record`).
            let body = match text("input")?.filter(|i| !i.is_empty()) {
                Some(input) => format!("{instruction}\n{input}"),
                None => instruction,
            };
            return Ok(user(body, text("system")?));
        }
        if let Some(instruct) = text("instruct")? {
            return Ok(user(instruct + &text("input")?.unwrap_or_default(), None));
        }
        if let Some(t) = text("text")? {
            return Ok(Prompt::Plain(t));
        }
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        Err(invalid(
            None,
            format!(
                "not a prompt: expected messages, prompt, instruction, instruct, text or poem fields (found keys {})",
                keys.join(", ")
            ),
        ))
    }

    /// The ids the model is given, rendered with `template`.
    pub fn ids(&self, template: &Template, tok: &Tokenizer) -> Result<Vec<u32>> {
        match self {
            Prompt::Chat { messages, tools } => {
                template.render_chat_prompt(messages, tools.as_ref(), tok)
            }
            Prompt::Plain(text) => Ok(tok.encode(text)?),
            Prompt::Poem(p) => template.render_prompt(&Sample::Poem(p.clone()), tok),
        }
    }
}

/// Parses a prompt object and renders it: the two steps of [`Prompt`] together.
pub fn prompt_ids(value: &Value, template: &Template, tok: &Tokenizer) -> Result<Vec<u32>> {
    Prompt::from_json(value)?.ids(template, tok)
}

fn is_poem(obj: &Map<String, Value>) -> bool {
    obj.keys().all(|k| POEM_KEYS.contains(&k.as_str()))
}

fn invalid(field: Option<&str>, reason: String) -> Error {
    Error::Conversation {
        field: field.map(str::to_owned),
        reason: format!("prompt: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn forms() {
        let p = Prompt::from_json(&json!({"style": "七言绝句", "author": "李白"})).unwrap();
        assert_eq!(
            p,
            Prompt::Poem(Poem {
                author: "李白".into(),
                style: "七言绝句".into(),
                title: String::new(),
                content: String::new()
            })
        );
        assert!(matches!(
            Prompt::from_json(&json!({})).unwrap(),
            Prompt::Poem(_)
        ));
        let p =
            Prompt::from_json(&json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap();
        assert!(matches!(p, Prompt::Chat { ref messages, .. } if messages.len() == 1));
        // A full conversation drops its last assistant turn.
        let p = Prompt::from_json(&json!({"messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
        .unwrap();
        assert!(matches!(p, Prompt::Chat { ref messages, .. } if messages.len() == 1));
        assert_eq!(
            Prompt::from_json(&json!({"prompt": "x"})).unwrap(),
            Prompt::Plain("x".into())
        );
        let p = Prompt::from_json(&json!({"instruction": "Add", "input": "1 2"})).unwrap();
        assert!(
            matches!(p, Prompt::Chat { ref messages, .. } if messages[0].content == "Add\n1 2")
        );
    }

    #[test]
    fn errors_name_the_field() {
        let e =
            Prompt::from_json(&json!({"messages": [{"role": "bot", "content": "x"}]})).unwrap_err();
        assert!(e.to_string().contains("messages[0].role"), "{e}");
        let e = Prompt::from_json(&json!({"style": 3})).unwrap_err();
        assert!(e.to_string().contains("style"), "{e}");
        let e = Prompt::from_json(&json!({"foo": 1})).unwrap_err();
        assert!(e.to_string().contains("not a prompt"), "{e}");
        assert!(Prompt::from_json(&json!([1])).is_err());
    }
}
