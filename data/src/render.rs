//! Records -> token ids with loss masks, and the checks that the masks are right.
//!
//! `loss_mask[i] == true` means token `i` is a training target: the model is trained to predict
//! `ids[i]` from `ids[..i]`. (The one-token shift into labels happens in [`crate::shift_labels`]
//! and nowhere else.)
//!
//! What is a target, per sample kind and [`TrainOn`] mode:
//! - chat: an assistant turn's targets are what the model generates for it after its role header,
//!   through and including the end-of-turn token `E` (`<|im_end|>` for Qwen): not the header, not
//!   the newline after `E`, nothing of system, user or tool turns. `assistant` (the default) trains
//!   every assistant turn, `last` (and `completion`) only the final one, `all` every token.
//! - prompt/completion: the completion tokens and EOS (`all`: the prompt too).
//! - text: every token and EOS.
//! - poem: from `<|content|>` through `<|/content|>` (`all`: everything), after metadata dropout.
//!
//! Chat spans are found in the one full rendering, never by assuming that a prompt rendering is a
//! prefix of it (the Qwen3 template renders the last turn differently from earlier ones). With the
//! template's assistant header `G` and end-of-turn text `E` (probed once, see [`crate::template`]),
//! the k-th assistant turn's body starts after the next `G` and ends after the next `E`. A token
//! is a target iff its byte range lies inside a trained body.
//!
//! Checked per sample unless [`RenderOptions::check_invariants`] is off (an [`Error::Invariant`]
//! names file and line): each trained body decodes from its tokens to exactly its rendered text;
//! no token straddles a body boundary; each body contains the message's visible content (after the
//! last `</think>`, trimmed); no body contains a header (no target inside another turn); at least
//! one token is a target.

use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sft_tokenizer::Tokenizer;

use crate::record::{Conversation, Record, Role, Sample};
use crate::template::{poem_ids, ChatTemplate, Template};
use crate::{Error, Result};

/// Which tokens of a sample are trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    /// Every assistant turn (chat); the completion (prompt/completion); the content (poem).
    Assistant,
    /// Only the final assistant turn (chat); otherwise as `assistant`.
    Last,
    /// The answer only: the last assistant turn (chat), the completion, the poem content.
    Completion,
    /// Every token.
    All,
}

impl TrainOn {
    pub const ALL: [TrainOn; 4] = [
        TrainOn::Assistant,
        TrainOn::Last,
        TrainOn::Completion,
        TrainOn::All,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TrainOn::Assistant => "assistant",
            TrainOn::Last => "last",
            TrainOn::Completion => "completion",
            TrainOn::All => "all",
        }
    }

    /// The mode a sample gets when none is configured.
    pub fn default_for(sample: &Sample) -> TrainOn {
        match sample {
            Sample::Chat(_) => TrainOn::Assistant,
            Sample::Completion { .. } | Sample::Poem(_) => TrainOn::Completion,
            Sample::Text(_) => TrainOn::All,
        }
    }
}

impl fmt::Display for TrainOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TrainOn {
    type Err = Error;
    fn from_str(s: &str) -> Result<TrainOn> {
        TrainOn::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| Error::InvalidOption {
                reason: format!(
                    "unknown train_on {s:?} (expected one of {})",
                    TrainOn::ALL.map(TrainOn::name).join(", ")
                ),
            })
    }
}

/// Token ids and, aligned with them, which are training targets. `loss_mask[i] == true` means
/// `ids[i]` is a target (see the module doc). The two always have the same length.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rendered {
    ids: Vec<u32>,
    loss_mask: Vec<bool>,
}

impl Rendered {
    pub fn new(ids: Vec<u32>, loss_mask: Vec<bool>) -> Result<Rendered> {
        if ids.len() != loss_mask.len() {
            return Err(Error::MaskLength {
                ids: ids.len(),
                mask: loss_mask.len(),
            });
        }
        Ok(Rendered { ids, loss_mask })
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn loss_mask(&self) -> &[bool] {
        &self.loss_mask
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of target tokens.
    pub fn n_targets(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m).count()
    }

    pub fn into_parts(self) -> (Vec<u32>, Vec<bool>) {
        (self.ids, self.loss_mask)
    }

    fn truncate(&mut self, len: usize) {
        self.ids.truncate(len);
        self.loss_mask.truncate(len);
    }
}

/// What to do with a sample longer than `max_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LengthPolicy {
    /// Leave it out (counted in the report).
    #[default]
    Drop,
    /// Keep the first `max_len` tokens; leave it out if no target survives (counted).
    Truncate,
    /// Stop with an error naming the record.
    Error,
}

impl LengthPolicy {
    pub const ALL: [LengthPolicy; 3] = [
        LengthPolicy::Drop,
        LengthPolicy::Truncate,
        LengthPolicy::Error,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LengthPolicy::Drop => "drop",
            LengthPolicy::Truncate => "truncate",
            LengthPolicy::Error => "error",
        }
    }
}

impl fmt::Display for LengthPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LengthPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<LengthPolicy> {
        LengthPolicy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| Error::InvalidOption {
                reason: format!("unknown length_policy {s:?} (expected drop, truncate or error)"),
            })
    }
}

/// How records are rendered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RenderOptions {
    /// `None`: each sample's default (chat: assistant, completion: completion, text: all, poem:
    /// completion).
    pub train_on: Option<TrainOn>,
    /// `None`: no limit (there is no hidden default length).
    pub max_len: Option<usize>,
    pub length_policy: LengthPolicy,
    /// Probability that each poem metadata field (author, style, title) is kept, drawn per field,
    /// per sample, per epoch. 0.5 as in nanopoet: the model learns to write with and without them.
    pub metadata_keep_prob: f64,
    /// Seed of the metadata dropout.
    pub seed: u64,
    /// Check the mask invariants of every sample (cheap next to tokenising; on by default).
    pub check_invariants: bool,
}

impl Default for RenderOptions {
    fn default() -> RenderOptions {
        RenderOptions {
            train_on: None,
            max_len: None,
            length_policy: LengthPolicy::Drop,
            metadata_keep_prob: 0.5,
            seed: 0,
            check_invariants: true,
        }
    }
}

impl RenderOptions {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.metadata_keep_prob) {
            return Err(Error::InvalidOption {
                reason: format!(
                    "metadata_keep_prob = {} is not a probability in [0, 1]",
                    self.metadata_keep_prob
                ),
            });
        }
        if self.max_len == Some(0) {
            return Err(Error::InvalidOption {
                reason: "max_len = 0 leaves nothing to train on".into(),
            });
        }
        Ok(())
    }
}

/// Why a sample was left out (always counted in the report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum DropReason {
    /// Longer than `max_len` under `length_policy = "drop"`.
    TooLong { len: usize, max: usize },
    /// Truncated to `max_len`, and no target token survived.
    NoTargetsAfterTruncation { len: usize, max: usize },
    /// No target token at all (only with `check_invariants` off; otherwise an error).
    NoTargets,
}

impl DropReason {
    /// A stable name for grouping in reports.
    pub fn key(&self) -> &'static str {
        match self {
            DropReason::TooLong { .. } => "too_long",
            DropReason::NoTargetsAfterTruncation { .. } => "no_targets_after_truncation",
            DropReason::NoTargets => "no_targets",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DropReason::TooLong { len, max } => write!(f, "{len} tokens > max_len {max}"),
            DropReason::NoTargetsAfterTruncation { len, max } => write!(
                f,
                "{len} tokens truncated to max_len {max} left no target token"
            ),
            DropReason::NoTargets => f.write_str("no target token"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RenderOutcome {
    Kept {
        rendered: Rendered,
        /// The length before truncation, when the sample was truncated.
        truncated_from: Option<usize>,
    },
    Dropped(DropReason),
}

/// Why rendering one sample failed, before file and line are attached.
enum Fail {
    Invariant(String),
    Other(Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Other(e)
    }
}

impl From<sft_tokenizer::Error> for Fail {
    fn from(e: sft_tokenizer::Error) -> Fail {
        Fail::Other(e.into())
    }
}

/// Renders one record. A pure function of its arguments: `epoch` and `index` (the record's
/// position in its dataset) seed the poem metadata dropout, so a resumed run renders the same.
pub fn render_record(
    record: &Record,
    template: &Template,
    tok: &Tokenizer,
    opts: &RenderOptions,
    epoch: u64,
    index: usize,
) -> Result<RenderOutcome> {
    opts.validate()?;
    let src = &record.source;
    let mut rendered = render_sample(&record.sample, template, tok, opts, epoch, index).map_err(
        |fail| match fail {
            Fail::Invariant(reason) => Error::Invariant {
                file: src.file.clone(),
                line: src.line,
                reason,
            },
            Fail::Other(e) => Error::Render {
                file: src.file.clone(),
                line: src.line,
                error: Box::new(e),
            },
        },
    )?;
    let len = rendered.len();
    let mut truncated_from = None;
    if let Some(max) = opts.max_len.filter(|&max| len > max) {
        match opts.length_policy {
            LengthPolicy::Drop => {
                return Ok(RenderOutcome::Dropped(DropReason::TooLong { len, max }))
            }
            LengthPolicy::Error => {
                return Err(Error::TooLong {
                    file: src.file.clone(),
                    line: src.line,
                    len,
                    max,
                })
            }
            LengthPolicy::Truncate => {
                rendered.truncate(max);
                if rendered.n_targets() == 0 {
                    return Ok(RenderOutcome::Dropped(
                        DropReason::NoTargetsAfterTruncation { len, max },
                    ));
                }
                truncated_from = Some(len);
            }
        }
    }
    if rendered.n_targets() == 0 {
        return Ok(RenderOutcome::Dropped(DropReason::NoTargets));
    }
    Ok(RenderOutcome::Kept {
        rendered,
        truncated_from,
    })
}

fn render_sample(
    sample: &Sample,
    template: &Template,
    tok: &Tokenizer,
    opts: &RenderOptions,
    epoch: u64,
    index: usize,
) -> std::result::Result<Rendered, Fail> {
    let train_on = opts
        .train_on
        .unwrap_or_else(|| TrainOn::default_for(sample));
    let rendered = match sample {
        Sample::Chat(conv) => {
            render_chat(conv, template.chat()?, tok, train_on, opts.check_invariants)?
        }
        Sample::Completion { prompt, completion } => {
            let eos = template.plain_eos()?.ok_or_else(|| Error::Template {
                reason: "the tokenizer has no eos token, so a completion could not teach the model to stop; set eos_token in tokenizer_config.json".into(),
            })?;
            let p = tok.encode(prompt)?;
            let c = tok.encode(completion)?;
            let mut ids = Vec::with_capacity(p.len() + c.len() + 1);
            ids.extend_from_slice(&p);
            ids.extend_from_slice(&c);
            ids.push(eos);
            let mut mask = vec![train_on == TrainOn::All; p.len()];
            mask.resize(ids.len(), true);
            Rendered {
                ids,
                loss_mask: mask,
            }
        }
        Sample::Text(text) => {
            let mut ids = tok.encode(text)?;
            match template.plain_eos()? {
                Some(eos) => ids.push(eos),
                // Pretraining-style text may go without an end token, but only when asked for.
                None if opts.train_on == Some(TrainOn::All) => {}
                None => {
                    return Err(Error::Template {
                        reason: "the tokenizer has no eos token to end a text sample with; set eos_token, or set train_on = \"all\" to train text without one".into(),
                    }
                    .into())
                }
            }
            let n = ids.len();
            Rendered {
                ids,
                loss_mask: vec![true; n],
            }
        }
        Sample::Poem(poem) => {
            let markers = template.poem()?;
            let keep = metadata_keep(opts.seed, epoch, index, opts.metadata_keep_prob);
            let (ids, content_at, _) = poem_ids(poem, keep, &markers, tok, true)?;
            let loss_mask = (0..ids.len())
                .map(|i| train_on == TrainOn::All || i >= content_at)
                .collect();
            Rendered { ids, loss_mask }
        }
    };
    Ok(rendered)
}

/// Which of author, style, title a poem keeps: one Bernoulli draw per field from a ChaCha8 stream
/// seeded by (seed, epoch, index), so the choice is a pure function (resume-safe) and differs per
/// epoch. All three are drawn even for empty fields, so one field's emptiness never shifts
/// another's draw.
pub fn metadata_keep(seed: u64, epoch: u64, index: usize, keep_prob: f64) -> [bool; 3] {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(&[seed, epoch, index as u64]));
    let p = keep_prob.clamp(0.0, 1.0);
    [rng.random_bool(p), rng.random_bool(p), rng.random_bool(p)]
}

/// SplitMix64 over several words: a well-spread seed from small, related integers.
pub(crate) fn mix(words: &[u64]) -> u64 {
    let mut h: u64 = 0x243f_6a88_85a3_08d3;
    for &w in words {
        h = h.wrapping_add(w).wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h = z ^ (z >> 31);
    }
    h
}

/// The byte span of each assistant turn's body in the full rendering: after its header, through
/// its end-of-turn text. One span per assistant message, in order.
fn assistant_spans(
    text: &str,
    conv: &Conversation,
    chat: &ChatTemplate,
) -> std::result::Result<Vec<(usize, usize)>, Fail> {
    let mut spans = Vec::new();
    let mut cursor = 0;
    for (k, (i, _)) in conv
        .messages()
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == Role::Assistant)
        .enumerate()
    {
        let rest = &text[cursor..];
        let full = rest.find(&chat.header).map(|p| (p, chat.header.len()));
        let short = chat
            .short_header
            .as_ref()
            .and_then(|h| rest.find(h.as_str()).map(|p| (p, h.len())));
        // The full header wins where both start at the same place.
        let (at, len) = match (full, short) {
            (Some(f), Some(s)) if s.0 < f.0 => s,
            (Some(f), _) => f,
            (None, Some(s)) => s,
            (None, None) => {
                return Err(Fail::Invariant(format!(
                    "assistant turn {k} (messages[{i}]): no assistant header {:?} in the rendering after byte {cursor}",
                    chat.header
                )))
            }
        };
        let start = cursor + at + len;
        let end = text[start..].find(&chat.end_text).ok_or_else(|| {
            Fail::Invariant(format!(
                "assistant turn {k} (messages[{i}]): no end-of-turn {:?} after its header",
                chat.end_text
            ))
        })? + start
            + chat.end_text.len();
        spans.push((start, end));
        cursor = end;
    }
    Ok(spans)
}

fn render_chat(
    conv: &Conversation,
    chat: &ChatTemplate,
    tok: &Tokenizer,
    train_on: TrainOn,
    check: bool,
) -> std::result::Result<Rendered, Fail> {
    let text = chat.render(conv.messages(), conv.tools(), false)?;
    let enc = tok.encode_with_offsets(&text)?;
    let n = enc.ids.len();
    if train_on == TrainOn::All {
        return Ok(Rendered {
            ids: enc.ids,
            loss_mask: vec![true; n],
        });
    }
    let spans = assistant_spans(&text, conv, chat)?;
    let last = spans.len() - 1;
    let trained = |k: usize| train_on == TrainOn::Assistant || k == last;
    let mut mask = vec![false; n];
    // Token index range of each span.
    let mut ranges = vec![(usize::MAX, 0usize); spans.len()];
    let mut si = 0;
    for (t, &(s, e)) in enc.offsets.iter().enumerate() {
        while si < spans.len() && spans[si].1 <= s {
            si += 1;
        }
        let Some(&(a, b)) = spans.get(si) else {
            break;
        };
        let inside = s >= a && e <= b;
        if !inside && e > a && s < b {
            if check {
                let what = if s < a { "start" } else { "end" };
                return Err(Fail::Invariant(format!(
                    "token {t} ({:?}, bytes {s}..{e}) straddles the {what} of assistant turn {si} (bytes {a}..{b}); the content probably begins or ends with whitespace the template's header or end token merges with",
                    &text[s..e]
                )));
            }
            // Unchecked: a straddling token belongs where it starts.
            if s < a {
                continue;
            }
        }
        if e > a && s < b {
            mask[t] = trained(si);
            ranges[si].0 = ranges[si].0.min(t);
            ranges[si].1 = t + 1;
        }
    }
    if check {
        check_chat(conv, chat, tok, &text, &enc, &spans, &ranges, &trained)?;
        if !mask.contains(&true) {
            return Err(Fail::Invariant("no target token".into()));
        }
    }
    Ok(Rendered {
        ids: enc.ids,
        loss_mask: mask,
    })
}

#[allow(clippy::too_many_arguments)]
fn check_chat(
    conv: &Conversation,
    chat: &ChatTemplate,
    tok: &Tokenizer,
    text: &str,
    enc: &sft_tokenizer::Encoding,
    spans: &[(usize, usize)],
    ranges: &[(usize, usize)],
    trained: &dyn Fn(usize) -> bool,
) -> std::result::Result<(), Fail> {
    let assistants = conv
        .messages()
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == Role::Assistant);
    for (k, ((i, msg), (&(a, b), &(t0, t1)))) in
        assistants.zip(spans.iter().zip(ranges)).enumerate()
    {
        let body = &text[a..b];
        let at =
            |what: String| Fail::Invariant(format!("assistant turn {k} (messages[{i}]): {what}"));
        for header in std::iter::once(&chat.header).chain(chat.short_header.as_ref()) {
            if body.contains(header.as_str()) {
                return Err(at(format!(
                    "its body contains the assistant header {header:?}, so targets would run into another turn: {}",
                    excerpt(body)
                )));
            }
        }
        let visible = msg
            .content
            .rsplit("</think>")
            .next()
            .unwrap_or_default()
            .trim();
        if !visible.is_empty() && !body.contains(visible) {
            return Err(at(format!(
                "the rendered body {} does not contain the message content {}",
                excerpt(body),
                excerpt(visible)
            )));
        }
        if !trained(k) {
            continue;
        }
        if t0 >= t1 {
            return Err(at("no token lies inside its body".into()));
        }
        if enc.n_unknown == 0 {
            let decoded = tok.decode(&enc.ids[t0..t1])?;
            if decoded != body {
                return Err(at(format!(
                    "its target tokens decode to {} instead of the rendered body {}",
                    excerpt(&decoded),
                    excerpt(body)
                )));
            }
        } else {
            // Unknown characters decode to the unknown token, so compare byte ranges instead.
            let first = enc.offsets[t0].0;
            let last = enc.offsets[t1 - 1].1;
            let contiguous = enc.offsets[t0..t1].windows(2).all(|w| w[0].1 == w[1].0);
            if first != a || last != b || !contiguous {
                return Err(at(format!(
                    "its target tokens cover bytes {first}..{last}, not the body {a}..{b}"
                )));
            }
        }
    }
    Ok(())
}

/// A string shortened for an error message.
fn excerpt(s: &str) -> String {
    const MAX: usize = 160;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX / 2).collect();
        let tail: String = {
            let mut t: Vec<char> = s.chars().rev().take(MAX / 2).collect();
            t.reverse();
            t.into_iter().collect()
        };
        format!("{head:?} ... {tail:?}")
    }
}
