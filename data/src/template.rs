//! Samples -> text and token ids: chat templates, plain text and the nanopoet poem markers.
//!
//! One [`Template`] value renders every sample kind, each with the part that fits it:
//! - [`Sample::Chat`]: a Jinja chat template, either the checkpoint's own
//!   ([`TemplateChoice::Model`]) or the built-in ChatML one ([`TemplateChoice::ChatMl`]).
//!   Rendering follows `transformers`' `apply_chat_template(..., tokenize=False)` byte for byte
//!   (same context variables, `trim_blocks`/`lstrip_blocks`, Python string methods, a `tojson`
//!   that writes what `json.dumps` writes); ids come from tokenising the whole rendered string at
//!   once, as `transformers` does.
//! - [`Sample::Completion`] and [`Sample::Text`]: plain text, prompt and completion encoded
//!   separately so the prompt tokens are exactly those inference sees, then EOS.
//! - [`Sample::Poem`]: the nanopoet markers, built from ids so no text can forge a marker.
//!
//! For loss masks ([`crate::render`]) a chat template is probed once, when it is built, for two
//! strings: the assistant header `G` (what `add_generation_prompt=true` appends, e.g.
//! `<|im_start|>assistant\n`) and the end-of-turn token `E` (the first special token after an
//! assistant message, e.g. `<|im_end|>`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use minijinja::value::{
    from_args, Enumerator, Kwargs, Object, ObjectRepr, Rest, Serde, Value as JValue, ValueOrKwargs,
};
use minijinja::{Environment, ErrorKind, Output, State};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sft_tokenizer::{Tokenizer, CHATML_SPECIALS, POEM_SPECIALS};

use crate::pyjson::{self, DumpOptions};
use crate::record::{Message, Poem, Role, Sample};
use crate::{Error, Result};

/// Which template to render samples with (`template = "..."` in a config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateChoice {
    /// Conversations with the tokenizer's chat template if it has one, else ChatML if the
    /// tokenizer has the ChatML tokens; plain text for prompt/completion and text; the poem
    /// markers for poems.
    #[default]
    Auto,
    /// The tokenizer's own Jinja chat template; an error if it has none.
    Model,
    /// The built-in ChatML template (`<|im_start|>role\ncontent<|im_end|>\n`).
    #[serde(rename = "chatml", alias = "chat_ml")]
    ChatMl,
    /// Prompt/completion and text samples only.
    Plain,
    /// Poems only, with the nanopoet markers.
    Poem,
}

impl TemplateChoice {
    pub const ALL: [TemplateChoice; 5] = [
        TemplateChoice::Auto,
        TemplateChoice::Model,
        TemplateChoice::ChatMl,
        TemplateChoice::Plain,
        TemplateChoice::Poem,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TemplateChoice::Auto => "auto",
            TemplateChoice::Model => "model",
            TemplateChoice::ChatMl => "chatml",
            TemplateChoice::Plain => "plain",
            TemplateChoice::Poem => "poem",
        }
    }
}

impl fmt::Display for TemplateChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TemplateChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<TemplateChoice> {
        TemplateChoice::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| Error::InvalidOption {
                reason: format!(
                    "unknown template {s:?} (expected one of {})",
                    TemplateChoice::ALL.map(TemplateChoice::name).join(", ")
                ),
            })
    }
}

/// What actually renders a sample, once `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateKind {
    /// The checkpoint's Jinja chat template (or one given in [`TemplateOptions::chat_template`]).
    Model,
    #[serde(rename = "chatml")]
    ChatMl,
    Plain,
    Poem,
}

impl TemplateKind {
    pub fn name(self) -> &'static str {
        match self {
            TemplateKind::Model => "model",
            TemplateKind::ChatMl => "chatml",
            TemplateKind::Plain => "plain",
            TemplateKind::Poem => "poem",
        }
    }
}

impl fmt::Display for TemplateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Optional settings beyond the choice.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TemplateOptions {
    /// A Jinja chat template to use instead of the tokenizer's (for [`TemplateChoice::Auto`] and
    /// [`TemplateChoice::Model`]).
    pub chat_template: Option<String>,
    /// Extra template variables, as `apply_chat_template(**kwargs)` passes them; e.g.
    /// `enable_thinking = false` for Qwen3. Unset variables stay undefined.
    pub variables: Map<String, Value>,
}

/// The standard ChatML template. Tool calls, tools and reasoning have no ChatML form, so they
/// raise instead of vanishing from the training text.
const CHATML_TEMPLATE: &str = "\
{%- if tools %}{{ raise_exception('the built-in chatml template does not render tools; use the model template') }}{% endif %}
{%- for message in messages %}
{%- if message.tool_calls %}{{ raise_exception('the built-in chatml template does not render tool_calls; use the model template') }}{% endif %}
{%- if message.reasoning_content %}{{ raise_exception('the built-in chatml template does not render reasoning_content; put it in content or use the model template') }}{% endif %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A compiled chat template and what was learnt from probing it.
pub(crate) struct ChatTemplate {
    pub kind: TemplateKind,
    env: Environment<'static>,
    /// `bos_token`, `eos_token`, ... and the user's variables: the fixed part of the context.
    globals: Vec<(String, JValue)>,
    /// The assistant header `G`: what `add_generation_prompt=true` appends.
    pub header: String,
    /// `G` cut after its first line, when it has more than one (Qwen3 with
    /// `enable_thinking=false` appends an empty think block that only the last turn renders).
    pub short_header: Option<String>,
    /// The end-of-turn token `E`, as text and id.
    pub end_text: String,
    pub end_id: u32,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("kind", &self.kind)
            .field("header", &self.header)
            .field("short_header", &self.short_header)
            .field("end_text", &self.end_text)
            .finish_non_exhaustive()
    }
}

/// Ids of the nanopoet markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoemMarkers {
    pub begin: u32,
    /// (start, end) for author, style, title, in the order they are written.
    pub fields: [(u32, u32); 3],
    pub content: (u32, u32),
}

/// A compiled template: see the module doc.
#[derive(Debug)]
pub struct Template {
    choice: TemplateChoice,
    /// `Err` holds why conversations cannot be rendered, for the error at render time.
    chat: std::result::Result<ChatTemplate, String>,
    poem: std::result::Result<PoemMarkers, String>,
    /// `Err` holds why plain samples cannot be rendered; `Ok(eos)`.
    plain: std::result::Result<Option<u32>, String>,
    stop_ids: Vec<u32>,
}

impl Template {
    pub fn new(choice: TemplateChoice, tok: &Tokenizer) -> Result<Template> {
        Template::with_options(choice, tok, &TemplateOptions::default())
    }

    pub fn with_options(
        choice: TemplateChoice,
        tok: &Tokenizer,
        opts: &TemplateOptions,
    ) -> Result<Template> {
        let model_source = opts
            .chat_template
            .clone()
            .or_else(|| tok.config().chat_template.clone());
        let has_chatml = CHATML_SPECIALS[3..]
            .iter()
            .all(|t| tok.token_to_id(t).is_some());
        let not_here = |what: &str| {
            let renders = match choice {
                TemplateChoice::Plain => "only prompt/completion and text samples",
                TemplateChoice::Poem => "only poems",
                _ => "conversations, prompt/completion and text samples",
            };
            format!(
                "template = \"{choice}\" renders {renders}, not {what}; use template = \"auto\""
            )
        };
        let chat = match choice {
            TemplateChoice::Auto => match (&model_source, has_chatml) {
                (Some(src), _) => Ok(ChatTemplate::new(TemplateKind::Model, src, tok, opts)?),
                (None, true) => Ok(ChatTemplate::new(
                    TemplateKind::ChatMl,
                    CHATML_TEMPLATE,
                    tok,
                    opts,
                )?),
                (None, false) => Err("the tokenizer has no chat template and no <|im_start|>/<|im_end|> tokens, so conversations cannot be rendered; set `template` (model with a chat_template, or chatml with a tokenizer that has the ChatML tokens)".to_owned()),
            },
            TemplateChoice::Model => match &model_source {
                Some(src) => Ok(ChatTemplate::new(TemplateKind::Model, src, tok, opts)?),
                None => {
                    return Err(Error::Template {
                        reason: "template = \"model\" but the tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)".into(),
                    })
                }
            },
            TemplateChoice::ChatMl => {
                if !has_chatml {
                    return Err(Error::Template {
                        reason: "template = \"chatml\" needs the tokens <|im_start|> and <|im_end|>, which the tokenizer lacks".into(),
                    });
                }
                Ok(ChatTemplate::new(
                    TemplateKind::ChatMl,
                    CHATML_TEMPLATE,
                    tok,
                    opts,
                )?)
            }
            TemplateChoice::Plain | TemplateChoice::Poem => Err(not_here("conversations")),
        };
        let poem = match choice {
            TemplateChoice::Auto | TemplateChoice::Poem => poem_markers(tok),
            _ => Err(not_here("poems")),
        };
        if choice == TemplateChoice::Poem {
            if let Err(reason) = &poem {
                return Err(Error::Template {
                    reason: reason.clone(),
                });
            }
        }
        let plain = match choice {
            TemplateChoice::Auto | TemplateChoice::Model | TemplateChoice::ChatMl => {
                Ok(tok.eos_id())
            }
            TemplateChoice::Plain => Ok(tok.eos_id()),
            TemplateChoice::Poem => Err(not_here("prompt/completion or text samples")),
        };
        let mut stop_ids = Vec::new();
        if let Ok(c) = &chat {
            stop_ids.push(c.end_id);
        }
        if let Ok(p) = &poem {
            stop_ids.push(p.content.1);
        }
        if let Ok(Some(eos)) = &plain {
            stop_ids.push(*eos);
        }
        let mut seen = std::collections::HashSet::new();
        stop_ids.retain(|id| seen.insert(*id));
        Ok(Template {
            choice,
            chat,
            poem,
            plain,
            stop_ids,
        })
    }

    pub fn choice(&self) -> TemplateChoice {
        self.choice
    }

    /// The main kind, for logs: what renders conversations when anything does, else poems, else
    /// plain text.
    pub fn kind(&self) -> TemplateKind {
        match (&self.chat, &self.poem) {
            (Ok(c), _) => c.kind,
            (Err(_), Ok(_)) if self.choice != TemplateChoice::Plain => TemplateKind::Poem,
            _ => TemplateKind::Plain,
        }
    }

    /// What renders `sample`, or why nothing can.
    pub fn kind_for(&self, sample: &Sample) -> Result<TemplateKind> {
        match sample {
            Sample::Chat(_) => self.chat().map(|c| c.kind),
            Sample::Completion { .. } | Sample::Text(_) => {
                self.plain_eos().map(|_| TemplateKind::Plain)
            }
            Sample::Poem(_) => self.poem().map(|_| TemplateKind::Poem),
        }
    }

    /// End-of-turn token(s) generation should stop at: `<|im_end|>` for chat templates,
    /// `<|/content|>` for poems, EOS for plain text (deduplicated, in that order).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The stop token for one kind of sample.
    pub fn stop_id_for(&self, sample: &Sample) -> Result<Option<u32>> {
        match sample {
            Sample::Chat(_) => self.chat().map(|c| Some(c.end_id)),
            Sample::Completion { .. } | Sample::Text(_) => self.plain_eos(),
            Sample::Poem(_) => self.poem().map(|p| Some(p.content.1)),
        }
    }

    /// The assistant header `G` and end-of-turn text `E` of the chat template, when there is one.
    pub fn chat_markers(&self) -> Option<(&str, &str)> {
        self.chat
            .as_ref()
            .ok()
            .map(|c| (c.header.as_str(), c.end_text.as_str()))
    }

    pub(crate) fn chat(&self) -> Result<&ChatTemplate> {
        match &self.chat {
            Ok(c) => Ok(c),
            Err(reason) => Err(Error::Template {
                reason: reason.clone(),
            }),
        }
    }

    pub(crate) fn poem(&self) -> Result<PoemMarkers> {
        self.poem
            .clone()
            .map_err(|reason| Error::Template { reason })
    }

    pub(crate) fn plain_eos(&self) -> Result<Option<u32>> {
        self.plain
            .clone()
            .map_err(|reason| Error::Template { reason })
    }

    /// Renders messages to text with the chat template, exactly as `transformers`'
    /// `apply_chat_template(messages, tools=tools, add_generation_prompt=..., tokenize=False)`.
    pub fn render_chat_text(
        &self,
        messages: &[Message],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.chat()?.render(messages, tools, add_generation_prompt)
    }

    /// The ids a model is given to generate the answer to `sample`:
    /// - chat: the messages before the last assistant message, with the generation prompt;
    /// - completion: the prompt; text: the text;
    /// - poem: `<|begin|>`, every non-empty metadata field, `<|content|>` (no dropout here: the
    ///   caller decides what to give).
    pub fn render_prompt(&self, sample: &Sample, tok: &Tokenizer) -> Result<Vec<u32>> {
        match sample {
            Sample::Chat(conv) => {
                let end = conv.last_assistant();
                self.render_chat_prompt(&conv.messages()[..end], conv.tools(), tok)
            }
            Sample::Completion { prompt, .. } => {
                self.plain_eos()?;
                Ok(tok.encode(prompt)?)
            }
            Sample::Text(text) => {
                self.plain_eos()?;
                Ok(tok.encode(text)?)
            }
            Sample::Poem(poem) => {
                let m = self.poem()?;
                let (mut ids, _, _) = poem_ids(poem, [true; 3], &m, tok, false)?;
                ids.push(m.content.0);
                Ok(ids)
            }
        }
    }

    /// A chat prompt from any messages (a user-only conversation is fine): the rendering with
    /// `add_generation_prompt=true`, tokenised whole.
    pub fn render_chat_prompt(
        &self,
        messages: &[Message],
        tools: Option<&Value>,
        tok: &Tokenizer,
    ) -> Result<Vec<u32>> {
        if messages.is_empty() {
            return Err(Error::Template {
                reason: "cannot render a prompt from zero messages".into(),
            });
        }
        let text = self.chat()?.render(messages, tools, true)?;
        Ok(tok.encode(&text)?)
    }
}

impl ChatTemplate {
    fn new(
        kind: TemplateKind,
        source: &str,
        tok: &Tokenizer,
        opts: &TemplateOptions,
    ) -> Result<ChatTemplate> {
        let env = environment(&strip_generation_tags(source)).map_err(|e| Error::Template {
            reason: format!("the chat template does not compile: {e}"),
        })?;
        let cfg = tok.config();
        let mut globals: Vec<(String, JValue)> = Vec::new();
        for (name, value) in [
            ("bos_token", &cfg.bos_token),
            ("eos_token", &cfg.eos_token),
            ("pad_token", &cfg.pad_token),
            ("unk_token", &cfg.unk_token),
        ] {
            if let Some(v) = value {
                globals.push((name.to_owned(), JValue::from(v.as_str())));
            }
        }
        // As in transformers, the caller's variables override the special tokens.
        for (name, value) in &opts.variables {
            globals.retain(|(n, _)| n != name);
            globals.push((name.clone(), JValue::from(Serde(value))));
        }
        let mut t = ChatTemplate {
            kind,
            env,
            globals,
            header: String::new(),
            short_header: None,
            end_text: String::new(),
            end_id: 0,
        };
        t.probe(tok)?;
        Ok(t)
    }

    /// Learns `G` and `E` from two probe conversations (see the module doc).
    fn probe(&mut self, tok: &Tokenizer) -> Result<()> {
        let fail = |reason: String| Error::Template {
            reason: format!("probing the chat template: {reason}"),
        };
        const QUESTION: &str = "Ping 1";
        const ANSWER: &str = "Pong 2";
        let user = Message::new(Role::User, QUESTION);
        let answer = Message::new(Role::Assistant, ANSWER);
        let r1 = self.render(std::slice::from_ref(&user), None, false)?;
        let r2 = self.render(std::slice::from_ref(&user), None, true)?;
        let mut header = r2.strip_prefix(r1.as_str()).ok_or_else(|| {
            fail("the rendering with add_generation_prompt=true does not extend the one without, so the assistant header cannot be found".into())
        })?;
        if header.is_empty() {
            // Templates without a generation prompt (Mistral's `[INST] ... [/INST]`): the
            // answer follows the user turn's closing text, which then plays the header.
            header = r1
                .rfind(QUESTION)
                .map(|p| &r1[p + QUESTION.len()..])
                .filter(|closing| !closing.is_empty())
                .ok_or_else(|| {
                    fail("add_generation_prompt=true adds nothing and the user turn has no closing text after its content, so no assistant header can be found".into())
                })?;
        }
        let r3 = self.render(&[user, answer], None, false)?;
        let pos = r3.rfind(ANSWER).ok_or_else(|| {
            fail(format!(
                "the assistant message {ANSWER:?} does not appear verbatim in {r3:?}"
            ))
        })?;
        let after = &r3[pos + ANSWER.len()..];
        let enc = tok.encode_with_offsets(after)?;
        let (i, &end_id) = enc
            .ids
            .iter()
            .enumerate()
            .find(|(_, &id)| tok.is_special(id))
            .ok_or_else(|| {
                fail(format!(
                    "no special token follows the assistant message (rendered tail {after:?}), so the model could not learn to end its turn"
                ))
            })?;
        let (s, e) = enc.offsets[i];
        self.end_text = after[s..e].to_owned();
        self.end_id = end_id;
        self.short_header = header
            .find('\n')
            .filter(|&i| i + 1 < header.len())
            .map(|i| header[..=i].to_owned());
        self.header = header.to_owned();
        Ok(())
    }

    pub(crate) fn render(
        &self,
        messages: &[Message],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let mut ctx: BTreeMap<String, JValue> = BTreeMap::new();
        for (name, value) in &self.globals {
            ctx.insert(name.clone(), value.clone());
        }
        let msgs: Vec<JValue> = messages.iter().map(message_value).collect();
        ctx.insert("messages".into(), JValue::from(msgs));
        // transformers passes tools and documents as None when absent: defined, and none.
        ctx.insert(
            "tools".into(),
            tools.map_or(JValue::from(()), |t| JValue::from(Serde(t))),
        );
        ctx.insert("documents".into(), JValue::from(()));
        ctx.insert(
            "add_generation_prompt".into(),
            JValue::from(add_generation_prompt),
        );
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .expect("the template was added when the environment was built");
        tmpl.render(JValue::from(ctx)).map_err(|e| Error::Template {
            reason: format!("the chat template failed: {e}"),
        })
    }
}

const TEMPLATE_NAME: &str = "chat_template";

/// A Jinja environment configured as `transformers` configures its sandbox.
fn environment(source: &str) -> std::result::Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_debug(false);
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_filter("tojson", tojson);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<JValue, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", strftime_now);
    env.add_template_owned(TEMPLATE_NAME, source.to_owned())?;
    Ok(env)
}

/// TRL's training templates mark assistant text with `{% generation %}` ... `{% endgeneration %}`,
/// a tag only `transformers` knows. Spans are found here without it, so the tags become a no-op
/// `if` that keeps their whitespace control (`{%-`, `-%}`).
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, trail) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Prints values as Jinja2 (Python) does where it differs from MiniJinja: `True`, `False`,
/// `None`, and floats in Python's `repr`.
fn python_formatter(
    out: &mut Output,
    state: &mut State,
    value: &JValue,
) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    let write = |out: &mut Output, s: &str| {
        out.write_str(s)
            .map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "formatting failed"))
    };
    match value.kind() {
        ValueKind::Bool => write(out, if value.is_true() { "True" } else { "False" }),
        ValueKind::None => write(out, "None"),
        ValueKind::Number if value.as_i64().is_none() || value.to_string().contains(['.', 'e']) => {
            match f64::try_from(value.clone()) {
                Ok(x) => write(out, &pyjson::float_repr(x)),
                Err(_) => minijinja::escape_formatter(out, state, value),
            }
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// `transformers`' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, arguments by position or keyword.
fn tojson(
    value: &JValue,
    args: Rest<ValueOrKwargs>,
) -> std::result::Result<JValue, minijinja::Error> {
    let args = args.into_values();
    let (positional, kwargs) = from_args::<(&[JValue], Kwargs)>(&args)?;
    if positional.len() > 4 {
        return Err(minijinja::Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 positional arguments",
        ));
    }
    // Python's signature: tojson(x, ensure_ascii, indent, separators, sort_keys).
    let arg = |pos: usize, name: &str| -> std::result::Result<Option<JValue>, minijinja::Error> {
        match positional.get(pos) {
            Some(v) => Ok(Some(v.clone())),
            None => kwargs.get::<Option<JValue>>(name),
        }
    };
    let ensure_ascii = arg(0, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match arg(1, "indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_owned(),
            None => {
                // An int (or a bool, which Python treats as 0 or 1).
                let n = if v.kind() == minijinja::value::ValueKind::Bool {
                    usize::from(v.is_true())
                } else {
                    usize::try_from(v.clone()).map_err(|_| {
                        minijinja::Error::new(
                            ErrorKind::InvalidOperation,
                            format!("tojson: indent must be an int or a string, got {v}"),
                        )
                    })?
                };
                " ".repeat(n)
            }
        }),
    };
    let mut opts = DumpOptions::new(indent);
    opts.ensure_ascii = ensure_ascii;
    opts.sort_keys = arg(3, "sort_keys")?.is_some_and(|v| v.is_true());
    if let Some(seps) = arg(2, "separators")? {
        if !seps.is_none() && !seps.is_undefined() {
            let parts: Vec<String> = seps
                .try_iter()?
                .map(|p| p.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .filter(|p| p.len() == 2)
                .ok_or_else(|| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    )
                })?;
            opts.item_sep = parts[0].clone();
            opts.key_sep = parts[1].clone();
        }
    }
    kwargs.assert_all_used()?;
    if value.is_undefined() {
        return Err(minijinja::Error::new(
            ErrorKind::UndefinedError,
            "tojson of an undefined value",
        ));
    }
    let json = serde_json::to_value(value)
        .map_err(|e| minijinja::Error::new(ErrorKind::BadSerialization, format!("tojson: {e}")))?;
    Ok(JValue::from(pyjson::dumps(&json, &opts)))
}

/// `strftime_now(format)` of `transformers` (Llama 3 templates print today's date), in UTC.
/// Supports `%d %m %Y %y %H %M %S %b %B %a %A %j %%`.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(secs, &format)
}

fn strftime(secs: i64, format: &str) -> std::result::Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported directive %{}",
                        other.unwrap_or(' ')
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// A message as the template sees it: a dict holding only the keys that have values, so `is
/// defined` tests work as in `transformers` (which also copies reasoning to `thinking`).
#[derive(Debug)]
struct MessageObj(Vec<(&'static str, JValue)>);

impl Object for MessageObj {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        let key = key.as_str()?;
        self.0
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.iter().map(|(k, _)| JValue::from(*k)).collect())
    }
}

fn message_value(m: &Message) -> JValue {
    let mut entries = Vec::with_capacity(5);
    if let Some(r) = &m.reasoning_content {
        entries.push(("thinking", JValue::from(r.as_str())));
    }
    entries.push(("role", JValue::from(m.role.name())));
    entries.push(("content", JValue::from(m.content.as_str())));
    if let Some(r) = &m.reasoning_content {
        entries.push(("reasoning_content", JValue::from(r.as_str())));
    }
    if let Some(t) = &m.tool_calls {
        entries.push(("tool_calls", JValue::from(Serde(t))));
    }
    JValue::from_object(MessageObj(entries))
}

fn poem_markers(tok: &Tokenizer) -> std::result::Result<PoemMarkers, String> {
    let id = |name: &str| {
        tok.token_to_id(name).ok_or_else(|| {
            format!("the tokenizer lacks the poem marker {name}; poems need a tokenizer with the nanopoet markers (POEM_SPECIALS)")
        })
    };
    let s = &POEM_SPECIALS;
    Ok(PoemMarkers {
        begin: id(s.begin)?,
        fields: [
            (id(s.author.0)?, id(s.author.1)?),
            (id(s.style.0)?, id(s.style.1)?),
            (id(s.title.0)?, id(s.title.1)?),
        ],
        content: (id(s.content.0)?, id(s.content.1)?),
    })
}

/// `[<|begin|>]` + each kept non-empty field of author, style, title between its markers, then
/// (with `with_content`) `<|content|>` content `<|/content|>`. Text is encoded with special-token
/// matching off, so a poem cannot forge a marker. Returns the ids, the index of `<|content|>`
/// (the first target) and the number of unknown characters.
pub(crate) fn poem_ids(
    poem: &Poem,
    keep: [bool; 3],
    m: &PoemMarkers,
    tok: &Tokenizer,
    with_content: bool,
) -> Result<(Vec<u32>, usize, usize)> {
    let mut ids = Vec::with_capacity(poem.content.len() + 16);
    let mut unknown = 0;
    ids.push(m.begin);
    let fields = [&poem.author, &poem.style, &poem.title];
    for ((field, keep), (start, end)) in fields.into_iter().zip(keep).zip(m.fields) {
        if keep && !field.is_empty() {
            let enc = tok.encode_ordinary(field)?;
            unknown += enc.n_unknown;
            ids.push(start);
            ids.extend(enc.ids);
            ids.push(end);
        }
    }
    let content_at = ids.len();
    if with_content {
        let enc = tok.encode_ordinary(&poem.content)?;
        unknown += enc.n_unknown;
        ids.push(m.content.0);
        ids.extend(enc.ids);
        ids.push(m.content.1);
    }
    Ok((ids, content_at, unknown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_noops() {
        assert_eq!(
            strip_generation_tags("a{%- generation %}b{% endgeneration -%}c{% if x %}"),
            "a{%- if true %}b{% endif -%}c{% if x %}"
        );
    }

    #[test]
    fn strftime_matches_python() {
        // datetime.fromtimestamp(1700000000, timezone.utc).strftime(...)
        assert_eq!(
            strftime(1_700_000_000, "%d %b %Y %H:%M:%S %A %j %B %y %m %a %%").unwrap(),
            "14 Nov 2023 22:13:20 Tuesday 318 November 23 11 Tue %"
        );
        assert_eq!(
            strftime(951_782_400, "%Y-%m-%d %j").unwrap(),
            "2000-02-29 060"
        );
        assert!(strftime(0, "%Q").is_err());
    }
}
