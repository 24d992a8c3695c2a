//! Does a fine-tuned model do what it was tuned for? Exactly checkable measures:
//!
//! - poems: the generated poem has the requested form (shi: 4 or 8 lines of 5 or 7 characters,
//!   each line ending in `，` or `。`, the last in `。`; ci: the line pattern of that tune as seen
//!   in the training data), and the author conditioning shows in the loss;
//! - answers: greedy generation equals the reference answer exactly and stops at the
//!   end-of-turn token.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use sft_data::{Poem, Prompt, Record, RenderOptions, Sample, Template, TrainOn};
use sft_model::generate::{generate, SamplingParams};
use sft_model::Model;
use sft_tokenizer::Tokenizer;

use crate::error::{Error, Result};

/// The four regulated shi forms: (style, characters per line, lines).
pub const SHI_FORMS: [(&str, usize, usize); 4] = [
    ("五言绝句", 5, 4),
    ("七言绝句", 7, 4),
    ("五言律诗", 5, 8),
    ("七言律诗", 7, 8),
];

/// A poem's line pattern: the length of each line and the mark that ends it, e.g. `5，5。7，7。`.
pub fn line_pattern(content: &str) -> Option<String> {
    let mut out = String::new();
    let mut n = 0;
    for c in content.chars() {
        match c {
            '，' | '。' => {
                if n == 0 {
                    return None;
                }
                out.push_str(&n.to_string());
                out.push(c);
                n = 0;
            }
            c if is_han(c) => n += 1,
            _ => return None,
        }
    }
    // Text after the last mark is an unfinished line.
    (n == 0 && !out.is_empty()).then_some(out)
}

fn is_han(c: char) -> bool {
    matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}')
}

/// Whether `content` has the shape of a regulated shi form.
pub fn is_shi_form(content: &str, chars: usize, lines: usize) -> bool {
    let Some(p) = line_pattern(content) else {
        return false;
    };
    let segs: Vec<&str> = p.split_inclusive(['，', '。']).collect();
    segs.len() == lines
        && segs
            .iter()
            .all(|s| s.trim_end_matches(['，', '。']) == chars.to_string())
        && p.ends_with('。')
}

/// The line patterns each ci tune has in the training data (tunes have variants).
pub fn ci_patterns(records: &[Record]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in records {
        if let Sample::Poem(p) = &r.sample {
            if p.style.is_empty() || SHI_FORMS.iter().any(|f| f.0 == p.style) {
                continue;
            }
            if let Some(pat) = line_pattern(&p.content) {
                out.entry(p.style.clone()).or_default().insert(pat);
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
pub struct PoemEvalOptions {
    pub styles: Vec<String>,
    pub per_style: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StyleCompliance {
    pub style: String,
    /// `shi` (form checked) or `ci` (tune pattern checked).
    pub kind: &'static str,
    pub generated: usize,
    pub compliant: usize,
    pub rate: f64,
    /// Share of generations that ended with the content-end marker.
    pub stopped: f64,
    /// Two generations, for the eye.
    pub examples: Vec<String>,
}

/// Generates `per_style` poems for each style (prompt: the style alone) and checks their form.
pub fn poem_compliance(
    model: &Model,
    tok: &Tokenizer,
    template: &Template,
    patterns: &BTreeMap<String, BTreeSet<String>>,
    opts: &PoemEvalOptions,
) -> Result<Vec<StyleCompliance>> {
    let mut out = Vec::with_capacity(opts.styles.len());
    for (k, style) in opts.styles.iter().enumerate() {
        let form = SHI_FORMS.iter().find(|f| f.0 == style);
        let tune = patterns.get(style);
        if form.is_none() && tune.is_none() {
            return Err(Error::Config(format!(
                "style {style:?} is neither a shi form nor a ci tune of the data"
            )));
        }
        let prompt = Prompt::Poem(Poem {
            style: style.clone(),
            ..Poem::default()
        });
        let ids = prompt.ids(template, tok)?;
        let params = SamplingParams {
            max_new_tokens: opts.max_new_tokens,
            temperature: opts.temperature,
            top_k: opts.top_k,
            top_p: None,
            repetition_penalty: 1.0,
            stop_ids: template.stop_ids().to_vec(),
            seed: opts.seed.wrapping_add(k as u64 * 1_000_003),
        };
        let gens = generate(model, &vec![ids; opts.per_style], &params)?;
        let (mut compliant, mut stopped, mut examples) = (0, 0, vec![]);
        for g in &gens {
            let text = tok.decode_skip_special(&g.ids)?;
            let ok = g.stop_id.is_some()
                && match (form, tune) {
                    (Some(&(_, chars, lines)), _) => is_shi_form(&text, chars, lines),
                    (None, Some(pats)) => line_pattern(&text).is_some_and(|p| pats.contains(&p)),
                    (None, None) => unreachable!("checked above"),
                };
            compliant += usize::from(ok);
            stopped += usize::from(g.stop_id.is_some());
            if examples.len() < 2 {
                examples.push(text);
            }
        }
        let n = gens.len().max(1) as f64;
        out.push(StyleCompliance {
            style: style.clone(),
            kind: if form.is_some() { "shi" } else { "ci" },
            generated: gens.len(),
            compliant,
            rate: compliant as f64 / n,
            stopped: stopped as f64 / n,
            examples,
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct AuthorConditioning {
    pub poems: usize,
    /// Mean content loss per token with the true author in the prompt.
    pub loss_true_author: f64,
    /// The same poems with another author (of the same set) in the prompt.
    pub loss_other_author: f64,
    /// Share of poems whose content is more likely under the true author.
    pub true_author_preferred: f64,
}

/// Author conditioning as likelihood: content loss of held-out poems given their true author
/// versus a different author. Only the content is scored, and style/title are left out of the
/// prompt, so the author is the only difference.
pub fn author_conditioning(
    model: &Model,
    tok: &Tokenizer,
    template: &Template,
    poems: &[Poem],
) -> Result<AuthorConditioning> {
    let authors: Vec<&str> = poems
        .iter()
        .map(|p| p.author.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|a| !a.is_empty())
        .collect();
    if authors.len() < 2 {
        return Err(Error::Config(
            "author conditioning needs poems by two authors or more".into(),
        ));
    }
    let opts = RenderOptions {
        train_on: Some(TrainOn::Completion),
        max_len: Some(model.config().max_positions()),
        metadata_keep_prob: 1.0,
        ..RenderOptions::default()
    };
    let eval_model = model.detached();
    let score = |author: &str, p: &Poem| -> Result<Option<f64>> {
        let poem = Poem {
            author: author.to_owned(),
            style: String::new(),
            title: String::new(),
            content: p.content.clone(),
        };
        let record = Record {
            sample: Sample::Poem(poem),
            format: sft_data::Format::Poem,
            source: sft_data::Source {
                file: std::sync::Arc::from(std::path::Path::new("<author-eval>")),
                line: 0,
            },
        };
        let outcome = sft_data::render_record(&record, template, tok, &opts, 0, 0)?;
        let sft_data::RenderOutcome::Kept { rendered, .. } = outcome else {
            return Ok(None);
        };
        let batch = sft_data::collate(&[vec![&rendered]], 0, None);
        let s = crate::step::evaluate_batch(&eval_model, &batch)?;
        Ok(Some(s.mean()))
    };
    let (mut n, mut lt, mut lo, mut wins) = (0usize, 0.0, 0.0, 0usize);
    for (i, p) in poems.iter().enumerate() {
        if p.author.is_empty() {
            continue;
        }
        let pos = authors
            .iter()
            .position(|a| *a == p.author)
            .expect("collected above");
        let other = authors[(pos + 1 + i % (authors.len() - 1)) % authors.len()];
        let (Some(t), Some(o)) = (score(&p.author, p)?, score(other, p)?) else {
            continue;
        };
        n += 1;
        lt += t;
        lo += o;
        wins += usize::from(t < o);
    }
    let d = n.max(1) as f64;
    Ok(AuthorConditioning {
        poems: n,
        loss_true_author: lt / d,
        loss_other_author: lo / d,
        true_author_preferred: wins as f64 / d,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct AnswerAccuracy {
    pub n: usize,
    pub exact_match: f64,
    /// Share of generations that ended with the end-of-turn token.
    pub stopped: f64,
    /// The first misses (as many as asked for): (prompt, expected, got).
    pub misses: Vec<(String, String, String)>,
}

/// Greedy answers to each conversation's last assistant turn, compared exactly (surrounding
/// whitespace ignored, and anything up to a `</think>` dropped) with the reference.
pub fn answer_accuracy(
    model: &Model,
    tok: &Tokenizer,
    template: &Template,
    records: &[Record],
    max_new_tokens: usize,
    max_misses: usize,
) -> Result<AnswerAccuracy> {
    let mut prompts = vec![];
    let mut expected = vec![];
    for r in records {
        let Sample::Chat(conv) = &r.sample else {
            return Err(Error::Config(format!(
                "{}: answer accuracy needs chat records",
                r.source
            )));
        };
        let last = conv.last_assistant();
        prompts.push(template.render_chat_prompt(&conv.messages()[..last], conv.tools(), tok)?);
        expected.push(conv.messages()[last].content.clone());
    }
    let params = SamplingParams {
        max_new_tokens,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        repetition_penalty: 1.0,
        stop_ids: template.stop_ids().to_vec(),
        seed: 0,
    };
    let gens = generate(model, &prompts, &params)?;
    let (mut hits, mut stopped, mut misses) = (0, 0, vec![]);
    for ((g, want), p) in gens.iter().zip(&expected).zip(&prompts) {
        let text = tok.decode_skip_special(&g.ids)?;
        // A Qwen3-style reasoning block is not the answer: compare what follows `</think>`, as
        // Qwen3's own template does when it splits `reasoning_content` off.
        let got = match text.rsplit_once("</think>") {
            Some((_, answer)) => answer.to_string(),
            None => text,
        };
        stopped += usize::from(g.stop_id.is_some());
        if got.trim() == want.trim() && g.stop_id.is_some() {
            hits += 1;
        } else if misses.len() < max_misses {
            misses.push((tok.decode_skip_special(p)?, want.clone(), got));
        }
    }
    let n = gens.len().max(1) as f64;
    Ok(AnswerAccuracy {
        n: gens.len(),
        exact_match: hits as f64 / n,
        stopped: stopped as f64 / n,
        misses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_and_forms() {
        assert_eq!(
            line_pattern("床前明月光，疑是地上霜。").as_deref(),
            Some("5，5。")
        );
        assert_eq!(
            line_pattern("床前明月光，疑是地上"),
            None,
            "unfinished line"
        );
        assert_eq!(line_pattern("床前 明月光。"), None, "foreign character");
        assert_eq!(line_pattern("，。"), None);
        let jueju = "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。";
        assert!(is_shi_form(jueju, 5, 4));
        assert!(!is_shi_form(jueju, 7, 4));
        assert!(!is_shi_form(jueju, 5, 8));
        assert!(
            !is_shi_form("床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉，", 5, 4),
            "ends in 。"
        );
        assert!(!is_shi_form(
            "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉一。",
            5,
            4
        ));
    }

    #[test]
    fn ci_patterns_come_from_the_data() {
        let mk = |style: &str, content: &str| Record {
            sample: Sample::Poem(Poem {
                style: style.into(),
                content: content.into(),
                ..Poem::default()
            }),
            format: sft_data::Format::Poem,
            source: sft_data::Source {
                file: std::sync::Arc::from(std::path::Path::new("t")),
                line: 1,
            },
        };
        let recs = [
            mk("浣溪沙", "一曲新詞酒一杯，去年天氣舊亭臺。"),
            mk("浣溪沙", "一曲新詞酒一杯。"),
            mk("五言绝句", "床前明月光，疑是地上霜。"),
        ];
        let p = ci_patterns(&recs);
        assert_eq!(p.len(), 1);
        assert_eq!(
            p["浣溪沙"].iter().cloned().collect::<Vec<_>>(),
            vec!["7。", "7，7。"]
        );
    }
}
