//! JSONL lines -> validated [`Record`]s.
//!
//! One JSON object a line. The format is forced by the caller or detected per line from the first
//! of these keys that the object has (the order is the contract):
//!
//! | key             | format                                  | becomes                    |
//! |-----------------|-----------------------------------------|----------------------------|
//! | `messages`      | [`Format::Messages`] (OpenAI / TRL)     | [`Sample::Chat`]           |
//! | `conversations` | [`Format::ShareGpt`] (`from`/`value`)   | [`Sample::Chat`]           |
//! | `instruction`   | [`Format::Alpaca`]                      | [`Sample::Chat`]           |
//! | `instruct`      | [`Format::InstructLabel`] (`label`)     | [`Sample::Chat`]           |
//! | `prompt`        | [`Format::PromptCompletion`]            | [`Sample::Completion`]     |
//! | `text`          | [`Format::Text`]                        | [`Sample::Text`]           |
//! | `content`       | [`Format::Poem`] (`author/style/title`) | [`Sample::Poem`]           |
//!
//! Detecting on one key, then requiring the rest, gives precise errors: `{"prompt": "x"}` is a
//! prompt/completion record with a missing `completion`, not an "unknown format".
//!
//! Nothing is dropped silently. A bad line is an [`Error::Record`] naming file, line and field
//! (``data.jsonl:17: field `messages[2].role`: unknown role "bot"``); under
//! [`InvalidPolicy::Skip`] it is listed in [`ReadOutcome::skipped`] instead. Blank lines are
//! counted in [`ReadOutcome::blank_lines`].
//!
//! Message keys other than `role`, `content`, `reasoning_content` (or its aliases `thinking` and
//! `reasoning`, as `transformers` accepts) and `tool_calls` are accepted and not passed on: the
//! templates we render (Qwen2.5, Qwen3, ChatML) read no others.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// The record formats `read_jsonl` understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Messages,
    #[serde(rename = "sharegpt", alias = "share_gpt")]
    ShareGpt,
    Alpaca,
    PromptCompletion,
    InstructLabel,
    Text,
    Poem,
}

/// Detection order: the first key an object has decides its format.
const DETECTION: [(&str, Format); 7] = [
    ("messages", Format::Messages),
    ("conversations", Format::ShareGpt),
    ("instruction", Format::Alpaca),
    ("instruct", Format::InstructLabel),
    ("prompt", Format::PromptCompletion),
    ("text", Format::Text),
    ("content", Format::Poem),
];

impl Format {
    pub const ALL: [Format; 7] = [
        Format::Messages,
        Format::ShareGpt,
        Format::Alpaca,
        Format::PromptCompletion,
        Format::InstructLabel,
        Format::Text,
        Format::Poem,
    ];

    /// The name used in configs, on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Format::Messages => "messages",
            Format::ShareGpt => "sharegpt",
            Format::Alpaca => "alpaca",
            Format::PromptCompletion => "prompt_completion",
            Format::InstructLabel => "instruct_label",
            Format::Text => "text",
            Format::Poem => "poem",
        }
    }

    /// Detects the format of one record from its keys (see the module doc for the order).
    pub fn detect(obj: &Map<String, Value>) -> Option<Format> {
        DETECTION
            .iter()
            .find(|(key, _)| obj.contains_key(*key))
            .map(|&(_, f)| f)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        let s = if s == "share_gpt" { "sharegpt" } else { s };
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| Error::InvalidOption {
                reason: format!(
                    "unknown format {s:?} (expected one of {})",
                    Format::ALL.map(Format::name).join(", ")
                ),
            })
    }
}

/// Who speaks a message. Other names found in data (`human`, `gpt`, `observation`, ...) are mapped
/// onto these four by the readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Role> {
        match s {
            "system" => Ok(Role::System),
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            "tool" => Ok(Role::Tool),
            _ => Err(Error::InvalidOption {
                reason: format!("unknown role {s:?} (expected system, user, assistant or tool)"),
            }),
        }
    }
}

/// One message of a conversation. `content` is `""` for an assistant turn that only calls tools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// The thinking of a reasoning model; the Qwen3 template renders it inside `<think>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// OpenAI-style tool calls, passed to the template as they are (a JSON array).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
            reasoning_content: None,
            tool_calls: None,
        }
    }

    /// Whether the message has tool calls (a non-empty array).
    pub fn has_tool_calls(&self) -> bool {
        self.tool_calls
            .as_ref()
            .is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()))
    }
}

/// A validated conversation: at least one message, at least one assistant turn, no empty
/// assistant turn. Built only through [`Conversation::new`], so every `Conversation` is trainable.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    messages: Vec<Message>,
    tools: Option<Value>,
}

/// Why a list of messages is not a conversation: the message index, the sub-field and the reason.
struct Invalid {
    index: Option<usize>,
    sub: &'static str,
    reason: String,
}

impl Conversation {
    /// Validates and wraps `messages`. `tools` must be a JSON array of tool schemas when given.
    pub fn new(messages: Vec<Message>, tools: Option<Value>) -> Result<Conversation> {
        let tools = tools.filter(|t| !t.is_null());
        if let Err(bad) = validate(&messages, tools.as_ref()) {
            return Err(Error::Conversation {
                field: Some(match bad.index {
                    Some(i) => format!("messages[{i}]{}", bad.sub),
                    None => bad.sub.trim_start_matches('.').to_owned(),
                })
                .filter(|f| !f.is_empty()),
                reason: bad.reason,
            });
        }
        Ok(Conversation { messages, tools })
    }

    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Tool schemas offered to the model, rendered by templates that support tools.
    pub fn tools(&self) -> Option<&Value> {
        self.tools.as_ref()
    }

    /// Index of the last assistant message (every conversation has one).
    pub fn last_assistant(&self) -> usize {
        self.messages
            .iter()
            .rposition(|m| m.role == Role::Assistant)
            .expect("a Conversation has an assistant turn by construction")
    }
}

fn validate(messages: &[Message], tools: Option<&Value>) -> std::result::Result<(), Invalid> {
    if messages.is_empty() {
        return Err(Invalid {
            index: None,
            sub: "",
            reason: "the conversation has no messages".into(),
        });
    }
    if let Some(t) = tools {
        if !t.is_array() {
            return Err(Invalid {
                index: None,
                sub: ".tools",
                reason: format!("expected an array of tool schemas, found {}", kind(t)),
            });
        }
    }
    for (i, m) in messages.iter().enumerate() {
        if let Some(calls) = &m.tool_calls {
            if !calls.is_array() && !calls.is_null() {
                return Err(Invalid {
                    index: Some(i),
                    sub: ".tool_calls",
                    reason: format!("expected an array, found {}", kind(calls)),
                });
            }
        }
        let no_reasoning = m
            .reasoning_content
            .as_deref()
            .is_none_or(|r| r.trim().is_empty());
        if m.role == Role::Assistant
            && m.content.trim().is_empty()
            && !m.has_tool_calls()
            && no_reasoning
        {
            return Err(Invalid {
                index: Some(i),
                sub: ".content",
                reason: "empty assistant turn (no content, reasoning or tool calls): nothing to train on".into(),
            });
        }
    }
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err(Invalid {
            index: None,
            sub: "",
            reason: "the conversation has no assistant turn, so nothing to train on".into(),
        });
    }
    Ok(())
}

/// A nanopoet poem. An empty string means the field is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Poem {
    pub author: String,
    pub style: String,
    pub title: String,
    pub content: String,
}

/// What one record asks the model to learn.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    Chat(Conversation),
    /// Plain prompt and completion: the completion is trained, the prompt is context.
    Completion {
        prompt: String,
        completion: String,
    },
    /// Plain text, every token trained (language modelling).
    Text(String),
    Poem(Poem),
}

impl Sample {
    /// `chat`, `completion`, `text` or `poem`: for reports.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Sample::Chat(_) => "chat",
            Sample::Completion { .. } => "completion",
            Sample::Text(_) => "text",
            Sample::Poem(_) => "poem",
        }
    }
}

/// Where a record came from: file and 1-based line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    pub file: Arc<Path>,
    pub line: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

impl Serialize for Source {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub sample: Sample,
    pub format: Format,
    pub source: Source,
}

impl Record {
    /// Parses one JSON value (one line's worth) as `read_jsonl` does, for records that come from
    /// somewhere other than a file; errors name `source`.
    pub fn from_json(value: Value, format: Option<Format>, source: Source) -> Result<Record> {
        match parse_value(value, format) {
            Ok((sample, format)) => Ok(Record {
                sample,
                format,
                source,
            }),
            Err(bad) => Err(Error::Record {
                file: source.file,
                line: source.line,
                field: bad.field,
                reason: bad.reason,
            }),
        }
    }
}

/// What to do with a line that cannot become a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvalidPolicy {
    /// Stop at the first bad line (the default: bad data is found before training, not after).
    #[default]
    Error,
    /// Skip bad lines, listing each with its reason in [`ReadOutcome::skipped`].
    Skip,
}

/// The records of one or more files, with everything that did not become a record.
#[derive(Debug, Clone, Default)]
pub struct ReadOutcome {
    pub records: Vec<Record>,
    /// Lines skipped under [`InvalidPolicy::Skip`], in file order, with the full reason.
    pub skipped: Vec<(Source, String)>,
    pub per_format: BTreeMap<Format, usize>,
    /// Empty or whitespace-only lines (not errors, but counted so line counts add up).
    pub blank_lines: usize,
    /// Records read but left out by a selection (`data.filter`, [`crate::Selection`]).
    pub filtered_out: usize,
}

impl ReadOutcome {
    /// Appends another file's outcome (records keep their own sources).
    pub fn extend(&mut self, other: ReadOutcome) {
        self.records.extend(other.records);
        self.skipped.extend(other.skipped);
        for (f, n) in other.per_format {
            *self.per_format.entry(f).or_default() += n;
        }
        self.blank_lines += other.blank_lines;
        self.filtered_out += other.filtered_out;
    }

    /// Takes one record as read: counted and kept, or, when it is invalid and `policy` skips,
    /// listed with its reason; any other error is returned.
    pub fn add(&mut self, policy: InvalidPolicy, record: Result<Record>) -> Result<()> {
        match record {
            Ok(rec) => {
                *self.per_format.entry(rec.format).or_default() += 1;
                self.records.push(rec);
                Ok(())
            }
            Err(e) => {
                self.skipped.push(skipped(policy, e)?);
                Ok(())
            }
        }
    }
}

/// An invalid record's place and reason when `policy` skips it (`field `x`: reason`); the error
/// itself otherwise, or when it is not about one record.
pub(crate) fn skipped(policy: InvalidPolicy, e: Error) -> Result<(Source, String)> {
    match e {
        Error::Record {
            file,
            line,
            field,
            reason,
        } if policy == InvalidPolicy::Skip => {
            let reason = match field {
                Some(f) => format!("field `{f}`: {reason}"),
                None => reason,
            };
            Ok((Source { file, line }, reason))
        }
        e => Err(e),
    }
}

/// Reads a JSONL file. `format: None` detects the format per line. Lines are parsed in parallel;
/// the outcome (and the first error reported under [`InvalidPolicy::Error`]) is in line order.
pub fn read_jsonl(
    path: &Path,
    format: Option<Format>,
    policy: InvalidPolicy,
) -> Result<ReadOutcome> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file: Arc<Path> = Arc::from(path);
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        // The newline that ends the last line does not start another one.
        lines.pop();
    }
    let parsed: Vec<Option<std::result::Result<Record, Error>>> = lines
        .par_iter()
        .enumerate()
        .map(|(i, raw)| parse_line(&file, i + 1, raw, format))
        .collect();
    let mut out = ReadOutcome::default();
    for item in parsed {
        match item {
            None => out.blank_lines += 1,
            Some(record) => out.add(policy, record)?,
        }
    }
    Ok(out)
}

/// Parses one line; `None` for a blank line.
pub(crate) fn parse_line(
    file: &Arc<Path>,
    line: usize,
    raw: &[u8],
    format: Option<Format>,
) -> Option<std::result::Result<Record, Error>> {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    if raw.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let err = |field: Option<String>, reason: String| Error::Record {
        file: file.clone(),
        line,
        field,
        reason,
    };
    let text = match std::str::from_utf8(raw) {
        Ok(t) => t,
        Err(e) => {
            return Some(Err(err(
                None,
                format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()),
            )))
        }
    };
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Some(Err(err(None, json_error(&e)))),
    };
    Some(
        parse_value(value, format)
            .map(|(sample, format)| Record {
                sample,
                format,
                source: Source {
                    file: file.clone(),
                    line,
                },
            })
            .map_err(|bad| err(bad.field, bad.reason)),
    )
}

/// serde_json's message without its " at line 1 column N" (the line is always 1 here; the
/// column is kept).
fn json_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match msg.strip_suffix(&suffix) {
        Some(m) => format!("invalid JSON at column {}: {m}", e.column()),
        None => format!("invalid JSON: {msg}"),
    }
}

/// A field-level problem, before file and line are attached.
#[derive(Debug)]
pub(crate) struct Bad {
    pub(crate) field: Option<String>,
    pub(crate) reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> Bad {
    Bad {
        field: Some(field.into()),
        reason: reason.into(),
    }
}

type Parsed<T> = std::result::Result<T, Bad>;

/// Parses one JSON value (a line) into a sample, detecting the format unless it is given.
pub(crate) fn parse_value(value: Value, format: Option<Format>) -> Parsed<(Sample, Format)> {
    let Value::Object(obj) = value else {
        return Err(Bad {
            field: None,
            reason: format!("expected a JSON object, found {}", kind(&value)),
        });
    };
    let format = match format.or_else(|| Format::detect(&obj)) {
        Some(f) => f,
        None => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            return Err(Bad {
                field: None,
                reason: format!(
                    "no known record format: expected one of the keys {} (found {})",
                    DETECTION.map(|(k, _)| k).join(", "),
                    if keys.is_empty() {
                        "an empty object".to_owned()
                    } else {
                        format!("keys {}", keys.join(", "))
                    }
                ),
            });
        }
    };
    let sample = match format {
        Format::Messages => parse_messages(&obj)?,
        Format::ShareGpt => parse_sharegpt(&obj)?,
        Format::Alpaca => parse_alpaca(&obj)?,
        Format::InstructLabel => {
            let instruct = req_str(&obj, "instruct", format)?;
            let input = opt_str(&obj, "input")?.unwrap_or_default();
            let label = req_str(&obj, "label", format)?;
            nonempty(&label, "label")?;
            // The Qwen2.5 tutorial concatenates instruct and input without a separator.
            let messages = vec![
                Message::new(Role::User, instruct + &input),
                Message::new(Role::Assistant, label),
            ];
            conversation(messages, None, "")?
        }
        Format::PromptCompletion => {
            for key in ["prompt", "completion"] {
                if obj.get(key).is_some_and(Value::is_array) {
                    return Err(bad(
                        key,
                        "conversational prompt/completion (lists of messages) is not supported; write it as `messages`",
                    ));
                }
            }
            let prompt = req_str(&obj, "prompt", format)?;
            let completion = req_str(&obj, "completion", format)?;
            nonempty(&completion, "completion")?;
            Sample::Completion { prompt, completion }
        }
        Format::Text => {
            let text = req_str(&obj, "text", format)?;
            nonempty(&text, "text")?;
            Sample::Text(text)
        }
        Format::Poem => {
            let content = req_str(&obj, "content", format)?;
            nonempty(&content, "content")?;
            Sample::Poem(Poem {
                author: opt_str(&obj, "author")?.unwrap_or_default(),
                style: opt_str(&obj, "style")?.unwrap_or_default(),
                title: opt_str(&obj, "title")?.unwrap_or_default(),
                content,
            })
        }
    };
    Ok((sample, format))
}

fn parse_messages(obj: &Map<String, Value>) -> Parsed<Sample> {
    let items = req_array(obj, "messages", Format::Messages)?;
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        messages.push(parse_message(item, &format!("messages[{i}]"))?);
    }
    let tools = parse_tools(obj)?;
    conversation(messages, tools, "messages")
}

/// One `{role, content, ...}` object.
pub(crate) fn parse_message(item: &Value, at: &str) -> Parsed<Message> {
    let Value::Object(m) = item else {
        return Err(bad(at, format!("expected an object, found {}", kind(item))));
    };
    let role = match m.get("role") {
        Some(Value::String(r)) => r.parse::<Role>().map_err(|_| {
            bad(
                format!("{at}.role"),
                format!("unknown role {r:?} (expected system, user, assistant or tool)"),
            )
        })?,
        Some(other) => {
            return Err(bad(
                format!("{at}.role"),
                format!("expected a string, found {}", kind(other)),
            ))
        }
        None => return Err(bad(format!("{at}.role"), "missing")),
    };
    let tool_calls = match m.get("tool_calls") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Array(_)) => Some(v.clone()),
        Some(other) => {
            return Err(bad(
                format!("{at}.tool_calls"),
                format!("expected an array, found {}", kind(other)),
            ))
        }
    };
    let has_calls = tool_calls
        .as_ref()
        .is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()));
    let content =
        match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) if has_calls => String::new(),
            None => return Err(bad(format!("{at}.content"), "missing")),
            Some(Value::Null) => {
                return Err(bad(
                    format!("{at}.content"),
                    "null is allowed only in a message with tool calls",
                ))
            }
            Some(Value::Array(_)) => return Err(bad(
                format!("{at}.content"),
                "expected a string, found an array (multimodal content parts are not supported)",
            )),
            Some(other) => {
                return Err(bad(
                    format!("{at}.content"),
                    format!("expected a string, found {}", kind(other)),
                ))
            }
        };
    // transformers reads reasoning under any of these names; the first non-null one wins.
    let mut reasoning_content = None;
    for key in ["reasoning_content", "thinking", "reasoning"] {
        match m.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                reasoning_content = Some(s.clone());
                break;
            }
            Some(other) => {
                return Err(bad(
                    format!("{at}.{key}"),
                    format!("expected a string, found {}", kind(other)),
                ))
            }
        }
    }
    Ok(Message {
        role,
        content,
        reasoning_content,
        tool_calls,
    })
}

pub(crate) fn parse_tools(obj: &Map<String, Value>) -> Parsed<Option<Value>> {
    match obj.get("tools") {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Array(_)) => Ok(Some(v.clone())),
        // LLaMA-Factory stores tools as a JSON string.
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Array(_)) => Ok(Some(v)),
            Ok(other) => Err(bad(
                "tools",
                format!(
                    "expected a JSON array of tool schemas, found {}",
                    kind(&other)
                ),
            )),
            Err(e) => Err(bad(
                "tools",
                format!("a string that is not JSON: {}", json_error(&e)),
            )),
        },
        Some(other) => Err(bad(
            "tools",
            format!("expected an array of tool schemas, found {}", kind(other)),
        )),
    }
}

/// ShareGPT `from` names and the role each becomes. `function_call` is an assistant turn whose
/// value is the JSON of the call(s).
fn sharegpt_role(from: &str) -> Option<(Role, bool)> {
    match from {
        "human" | "user" => Some((Role::User, false)),
        "gpt" | "assistant" => Some((Role::Assistant, false)),
        "system" => Some((Role::System, false)),
        "function_call" => Some((Role::Assistant, true)),
        "observation" | "tool" | "function_response" => Some((Role::Tool, false)),
        _ => None,
    }
}

fn parse_sharegpt(obj: &Map<String, Value>) -> Parsed<Sample> {
    let items = req_array(obj, "conversations", Format::ShareGpt)?;
    let mut messages = Vec::with_capacity(items.len() + 1);
    // LLaMA-Factory keeps the system prompt in a top-level column.
    if let Some(system) = opt_str(obj, "system")? {
        if !system.is_empty() {
            messages.push(Message::new(Role::System, system));
        }
    }
    let offset = messages.len();
    for (i, item) in items.iter().enumerate() {
        let at = format!("conversations[{i}]");
        let Value::Object(m) = item else {
            return Err(bad(at, format!("expected an object, found {}", kind(item))));
        };
        if !m.contains_key("from") && m.contains_key("role") {
            // Some ShareGPT dumps use OpenAI keys inside `conversations`.
            messages.push(parse_message(item, &at)?);
            continue;
        }
        let from = match m.get("from") {
            Some(Value::String(s)) => s,
            Some(other) => {
                return Err(bad(
                    format!("{at}.from"),
                    format!("expected a string, found {}", kind(other)),
                ))
            }
            None => return Err(bad(format!("{at}.from"), "missing")),
        };
        let (role, is_call) = sharegpt_role(from).ok_or_else(|| {
            bad(
                format!("{at}.from"),
                format!("unknown role {from:?} (expected human, gpt, system, function_call, observation, user, assistant or tool)"),
            )
        })?;
        let value = match m.get("value") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(bad(
                    format!("{at}.value"),
                    format!("expected a string, found {}", kind(other)),
                ))
            }
            None => return Err(bad(format!("{at}.value"), "missing")),
        };
        if is_call {
            let calls = function_calls(&value).map_err(|r| bad(format!("{at}.value"), r))?;
            messages.push(Message {
                role,
                content: String::new(),
                reasoning_content: None,
                tool_calls: Some(calls),
            });
        } else {
            messages.push(Message::new(role, value));
        }
    }
    let tools = parse_tools(obj)?;
    Conversation::new(messages, tools)
        .map(Sample::Chat)
        .map_err(|e| match e {
            Error::Conversation { field, reason } => Bad {
                // Point at the `conversations[i]` entry the user wrote (a top-level system
                // prompt shifts message indices by one).
                field: field.map(|f| rename_index(&f, "conversations", offset)),
                reason,
            },
            other => Bad {
                field: None,
                reason: other.to_string(),
            },
        })
}

/// `messages[3].content` -> `conversations[2].value` when one message was prepended.
fn rename_index(field: &str, key: &str, offset: usize) -> String {
    let Some(rest) = field.strip_prefix("messages[") else {
        return field.to_owned();
    };
    let Some((num, tail)) = rest.split_once(']') else {
        return field.to_owned();
    };
    let Ok(i) = num.parse::<usize>() else {
        return field.to_owned();
    };
    let tail = if key == "conversations" && tail == ".content" {
        ".value"
    } else {
        tail
    };
    match i.checked_sub(offset) {
        Some(j) => format!("{key}[{j}]{tail}"),
        None => "system".to_owned(),
    }
}

/// A ShareGPT `function_call` value: one `{"name", "arguments"}` object or a list of them, as
/// JSON text. Becomes OpenAI `tool_calls`.
fn function_calls(value: &str) -> std::result::Result<Value, String> {
    let parsed: Value = serde_json::from_str(value)
        .map_err(|e| format!("a function_call value must be JSON: {}", json_error(&e)))?;
    let calls = match parsed {
        Value::Array(a) => a,
        obj @ Value::Object(_) => vec![obj],
        other => {
            return Err(format!(
                "expected a JSON object or array, found {}",
                kind(&other)
            ))
        }
    };
    calls
        .into_iter()
        .map(|c| match c {
            Value::Object(o) if o.get("name").is_some_and(Value::is_string) => {
                let mut function = Map::new();
                function.insert("name".into(), o["name"].clone());
                function.insert(
                    "arguments".into(),
                    o.get("arguments")
                        .cloned()
                        .unwrap_or(Value::Object(Map::new())),
                );
                let mut call = Map::new();
                call.insert("type".into(), "function".into());
                call.insert("function".into(), Value::Object(function));
                Ok(Value::Object(call))
            }
            other => Err(format!(
                "each function call needs a string `name`, found {other}"
            )),
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Value::Array)
}

fn parse_alpaca(obj: &Map<String, Value>) -> Parsed<Sample> {
    let instruction = req_str(obj, "instruction", Format::Alpaca)?;
    let input = opt_str(obj, "input")?.unwrap_or_default();
    let output = req_str(obj, "output", Format::Alpaca)?;
    nonempty(&output, "output")?;
    let mut messages = Vec::new();
    if let Some(system) = opt_str(obj, "system")? {
        if !system.is_empty() {
            messages.push(Message::new(Role::System, system));
        }
    }
    // LLaMA-Factory's `history`: earlier [instruction, response] pairs.
    match obj.get("history") {
        None | Some(Value::Null) => {}
        Some(Value::Array(pairs)) => {
            for (i, pair) in pairs.iter().enumerate() {
                match pair.as_array().map(Vec::as_slice) {
                    Some([Value::String(q), Value::String(a)]) => {
                        if a.trim().is_empty() {
                            return Err(bad(format!("history[{i}][1]"), "empty response"));
                        }
                        messages.push(Message::new(Role::User, q.clone()));
                        messages.push(Message::new(Role::Assistant, a.clone()));
                    }
                    _ => {
                        return Err(bad(
                            format!("history[{i}]"),
                            "expected a [instruction, response] pair of strings",
                        ))
                    }
                }
            }
        }
        Some(other) => {
            return Err(bad(
                "history",
                format!("expected an array of pairs, found {}", kind(other)),
            ))
        }
    }
    // LLaMA-Factory joins instruction and input with one newline.
    let user = if input.is_empty() {
        instruction
    } else {
        format!("{instruction}\n{input}")
    };
    messages.push(Message::new(Role::User, user));
    messages.push(Message::new(Role::Assistant, output));
    conversation(messages, None, "")
}

/// Wraps `Conversation::new` for the readers, naming fields under `key`.
fn conversation(messages: Vec<Message>, tools: Option<Value>, key: &str) -> Parsed<Sample> {
    Conversation::new(messages, tools)
        .map(Sample::Chat)
        .map_err(|e| match e {
            Error::Conversation { field, reason } => Bad {
                field: if key.is_empty() {
                    None
                } else {
                    field.map(|f| rename_index(&f, key, 0))
                },
                reason,
            },
            other => Bad {
                field: None,
                reason: other.to_string(),
            },
        })
}

fn req_str(obj: &Map<String, Value>, key: &str, format: Format) -> Parsed<String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(bad(
            key,
            format!("expected a string, found {}", kind(other)),
        )),
        None => Err(bad(key, format!("missing (required by format {format})"))),
    }
}

fn opt_str(obj: &Map<String, Value>, key: &str) -> Parsed<Option<String>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad(
            key,
            format!("expected a string, found {}", kind(other)),
        )),
    }
}

fn req_array<'a>(obj: &'a Map<String, Value>, key: &str, format: Format) -> Parsed<&'a [Value]> {
    match obj.get(key) {
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(bad(
            key,
            format!("expected an array, found {}", kind(other)),
        )),
        None => Err(bad(key, format!("missing (required by format {format})"))),
    }
}

fn nonempty(s: &str, key: &str) -> Parsed<()> {
    if s.trim().is_empty() {
        Err(bad(key, "empty: nothing to train on"))
    } else {
        Ok(())
    }
}

/// A JSON value's type, as error messages name it.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Parsed<(Sample, Format)> {
        parse_value(serde_json::from_str(line).unwrap(), None)
    }

    fn chat(line: &str) -> Vec<Message> {
        match parse(line).unwrap().0 {
            Sample::Chat(c) => c.messages().to_vec(),
            other => panic!("not a chat: {other:?}"),
        }
    }

    fn err(line: &str) -> (Option<String>, String) {
        let e = parse(line).unwrap_err();
        (e.field, e.reason)
    }

    #[test]
    fn detects_each_format() {
        let cases = [
            (
                r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#,
                Format::Messages,
            ),
            (
                r#"{"conversations":[{"from":"human","value":"a"},{"from":"gpt","value":"b"}]}"#,
                Format::ShareGpt,
            ),
            (
                r#"{"instruction":"a","input":"","output":"b"}"#,
                Format::Alpaca,
            ),
            (
                r#"{"instruct":"a","input":"x","label":"b"}"#,
                Format::InstructLabel,
            ),
            (
                r#"{"prompt":"a","completion":"b"}"#,
                Format::PromptCompletion,
            ),
            (r#"{"text":"abc"}"#, Format::Text),
            (r#"{"author":"李白","content":"床前明月光"}"#, Format::Poem),
        ];
        for (line, format) in cases {
            assert_eq!(parse(line).unwrap().1, format, "{line}");
        }
    }

    #[test]
    fn sharegpt_alpaca_and_instruct_map_to_messages() {
        let m = chat(
            r#"{"system":"S","conversations":[{"from":"human","value":"q"},{"from":"function_call","value":"{\"name\":\"f\",\"arguments\":{\"x\":1}}"},{"from":"observation","value":"r"},{"from":"gpt","value":"a"}]}"#,
        );
        let roles: Vec<Role> = m.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::System,
                Role::User,
                Role::Assistant,
                Role::Tool,
                Role::Assistant
            ]
        );
        assert_eq!(
            m[2].tool_calls.as_ref().unwrap()[0]["function"]["arguments"]["x"],
            1
        );
        let m = chat(r#"{"instruction":"Translate","input":"chat","output":"猫","system":"S"}"#);
        assert_eq!(m[1].content, "Translate\nchat");
        assert_eq!(m.len(), 3);
        let m = chat(r#"{"instruction":"Hi","output":"Hello","history":[["q1","a1"]]}"#);
        assert_eq!(
            m.iter().map(|m| m.content.as_str()).collect::<Vec<_>>(),
            ["q1", "a1", "Hi", "Hello"]
        );
        let m = chat(r#"{"instruct":"Extract: ","input":"text","label":"x"}"#);
        assert_eq!(m[0].content, "Extract: text");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"{"messages":[{"role":"user","content":"a"},{"role":"bot","content":"b"}]}"#,
                "messages[1].role",
                "unknown role \"bot\"",
            ),
            (
                r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"  "}]}"#,
                "messages[1].content",
                "empty assistant turn",
            ),
            (
                r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant"}]}"#,
                "messages[1].content",
                "missing",
            ),
            (
                r#"{"messages":[{"role":"user","content":1},{"role":"assistant","content":"b"}]}"#,
                "messages[0].content",
                "expected a string, found a number",
            ),
            (
                r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":null}]}"#,
                "messages[1].content",
                "null is allowed only",
            ),
            (r#"{"messages":"x"}"#, "messages", "expected an array"),
            (
                r#"{"messages":[{"role":"user","content":"a"}],"tools":3}"#,
                "tools",
                "expected an array",
            ),
            (
                r#"{"conversations":[{"from":"human","value":"a"},{"from":"bot","value":"b"}]}"#,
                "conversations[1].from",
                "unknown role \"bot\"",
            ),
            (
                r#"{"conversations":[{"from":"human","value":"a"},{"from":"gpt","value":""}]}"#,
                "conversations[1].value",
                "empty assistant turn",
            ),
            (
                r#"{"system":"s","conversations":[{"from":"human","value":"a"},{"from":"gpt","value":""}]}"#,
                "conversations[1].value",
                "empty assistant turn",
            ),
            (
                r#"{"conversations":[{"from":"function_call","value":"not json"}]}"#,
                "conversations[0].value",
                "must be JSON",
            ),
            (r#"{"instruction":"a","output":""}"#, "output", "empty"),
            (
                r#"{"instruction":"a"}"#,
                "output",
                "missing (required by format alpaca)",
            ),
            (r#"{"prompt":"a"}"#, "completion", "missing"),
            (
                r#"{"prompt":[{"role":"user","content":"a"}],"completion":"b"}"#,
                "prompt",
                "not supported",
            ),
            (r#"{"text":5}"#, "text", "expected a string"),
            (
                r#"{"content":"x","author":3}"#,
                "author",
                "expected a string",
            ),
        ];
        for (line, field, reason) in cases {
            let (f, r) = err(line);
            assert_eq!(f.as_deref(), Some(field), "{line}: {r}");
            assert!(r.contains(reason), "{line}: {r}");
        }
        let (f, r) = err(r#"{"messages":[{"role":"user","content":"a"}]}"#);
        assert_eq!(f, None);
        assert!(r.contains("no assistant turn"), "{r}");
        let (f, r) = err(r#"{"foo":1}"#);
        assert_eq!(f, None);
        assert!(
            r.contains("no known record format") && r.contains("foo"),
            "{r}"
        );
        let (_, r) = err("[1]");
        assert!(r.contains("expected a JSON object"), "{r}");
    }

    #[test]
    fn tool_call_turns_may_have_null_content() {
        let m = chat(
            r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":null,"tool_calls":[{"type":"function","function":{"name":"f","arguments":{}}}]},{"role":"tool","content":"r"},{"role":"assistant","content":"b","thinking":"t"}]}"#,
        );
        assert_eq!(m[1].content, "");
        assert!(m[1].has_tool_calls());
        assert_eq!(m[3].reasoning_content.as_deref(), Some("t"));
    }

    #[test]
    fn conversation_new_validates() {
        let e = Conversation::new(vec![], None).unwrap_err();
        assert!(e.to_string().contains("no messages"), "{e}");
        let e = Conversation::new(
            vec![
                Message::new(Role::User, "q"),
                Message::new(Role::Assistant, ""),
            ],
            None,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "field `messages[1].content`: empty assistant turn (no content, reasoning or tool calls): nothing to train on"
        );
        let c = Conversation::new(
            vec![
                Message::new(Role::User, "q"),
                Message::new(Role::Assistant, "a"),
            ],
            None,
        )
        .unwrap();
        assert_eq!(c.last_assistant(), 1);
    }

    #[test]
    fn names_round_trip() {
        for f in Format::ALL {
            assert_eq!(f.name().parse::<Format>().unwrap(), f);
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.name()));
        }
        assert!("bogus".parse::<Format>().is_err());
        assert_eq!("tool".parse::<Role>().unwrap(), Role::Tool);
    }
}
