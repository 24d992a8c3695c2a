//! Every record rendered (in parallel, in a deterministic order), and the preflight [`Report`]:
//! what will be trained on, before any compute is spent.
//!
//! The report answers the questions other SFT tools leave to a surprised user: how many lines
//! were invalid and why, how many samples were dropped or truncated by the length limit, how many
//! target tokens remain, how many characters the tokenizer did not know, how long samples are,
//! and what exactly the first sample trains on.

use std::collections::BTreeMap;
use std::fmt;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sft_tokenizer::Tokenizer;

use crate::record::{Format, ReadOutcome};
use crate::render::{render_record, RenderOptions, RenderOutcome, Rendered};
use crate::template::Template;
use crate::{Error, Result};

/// How many invalid lines and dropped samples the report lists by name.
const EXAMPLES: usize = 5;

/// Rendered samples and the report about them.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Kept samples as (index of the record in [`ReadOutcome::records`], rendering), in record
    /// order.
    pub samples: Vec<(usize, Rendered)>,
    pub report: Report,
}

/// One token of the example sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    /// The token decoded on its own (special tokens included).
    pub token: String,
    pub id: u32,
    pub target: bool,
}

/// Sample lengths in tokens, after truncation, over kept samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LengthStats {
    pub min: usize,
    pub median: usize,
    pub p95: usize,
    pub max: usize,
    pub mean: f64,
    /// (low, high, count): equal-width buckets covering min..=max.
    pub histogram: Vec<(usize, usize, usize)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// `file:line`.
    pub source: String,
    pub reason: String,
}

/// The preflight report. `Display` is for people, `Serialize` (JSON) for scripts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// What renders conversations (or poems / plain text): `model`, `chatml`, `plain`, `poem`.
    pub template: String,
    /// The configured mode, or `default` for each sample's own.
    pub train_on: String,
    pub max_len: Option<usize>,
    pub length_policy: String,
    pub epoch: u64,
    pub records_read: usize,
    pub blank_lines: usize,
    pub per_format: BTreeMap<Format, usize>,
    pub invalid_skipped: usize,
    pub invalid_examples: Vec<Example>,
    /// Records a selection (`data.filter`) left out.
    #[serde(default)]
    pub filtered_out: usize,
    pub kept: usize,
    /// Dropped samples by reason key (`too_long`, `no_targets_after_truncation`, `no_targets`).
    pub dropped: BTreeMap<String, usize>,
    pub dropped_examples: Vec<Example>,
    pub truncated: usize,
    /// Tokens in kept samples (after truncation).
    pub total_tokens: usize,
    /// Target tokens in kept samples.
    pub target_tokens: usize,
    /// Occurrences of the unknown token in kept samples: characters the tokenizer did not know.
    pub unknown_tokens: usize,
    pub lengths: Option<LengthStats>,
    /// Where the example sample came from.
    pub example_source: Option<String>,
    /// The first kept sample, token by token.
    pub example: Vec<TokenView>,
}

/// Renders every record of `read` (in parallel; the output is in record order and independent of
/// the thread count) and builds the report. The first error, in record order, stops it.
///
/// Only poems depend on `epoch` (their metadata dropout); a dataset without poems renders the same
/// every epoch and needs preparing once.
pub fn prepare(
    read: &ReadOutcome,
    template: &Template,
    tok: &Tokenizer,
    opts: &RenderOptions,
    epoch: u64,
) -> Result<Prepared> {
    opts.validate()?;
    let outcomes: Vec<Result<RenderOutcome>> = read
        .records
        .par_iter()
        .enumerate()
        .map(|(i, rec)| render_record(rec, template, tok, opts, epoch, i))
        .collect();
    let mut samples = Vec::with_capacity(outcomes.len());
    let mut dropped: BTreeMap<String, usize> = BTreeMap::new();
    let mut dropped_examples = Vec::new();
    let mut truncated = 0;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        match outcome? {
            RenderOutcome::Kept {
                rendered,
                truncated_from,
            } => {
                truncated += usize::from(truncated_from.is_some());
                samples.push((i, rendered));
            }
            RenderOutcome::Dropped(reason) => {
                *dropped.entry(reason.key().to_owned()).or_default() += 1;
                if dropped_examples.len() < EXAMPLES {
                    dropped_examples.push(Example {
                        source: read.records[i].source.to_string(),
                        reason: reason.to_string(),
                    });
                }
            }
        }
    }
    let unk = tok.unk_id();
    let total_tokens = samples.iter().map(|(_, r)| r.len()).sum();
    let target_tokens = samples.iter().map(|(_, r)| r.n_targets()).sum();
    let unknown_tokens = match unk {
        Some(u) => samples
            .iter()
            .map(|(_, r)| r.ids().iter().filter(|&&id| id == u).count())
            .sum(),
        None => 0,
    };
    let lengths = length_stats(&samples.iter().map(|(_, r)| r.len()).collect::<Vec<_>>());
    let (example_source, example) = match samples.first() {
        Some((i, r)) => (
            Some(read.records[*i].source.to_string()),
            token_views(r, tok)?,
        ),
        None => (None, Vec::new()),
    };
    let report = Report {
        template: template.kind().to_string(),
        train_on: opts
            .train_on
            .map_or_else(|| "default".to_owned(), |t| t.to_string()),
        max_len: opts.max_len,
        length_policy: opts.length_policy.to_string(),
        epoch,
        records_read: read.records.len(),
        blank_lines: read.blank_lines,
        per_format: read.per_format.clone(),
        invalid_skipped: read.skipped.len(),
        filtered_out: read.filtered_out,
        invalid_examples: read
            .skipped
            .iter()
            .take(EXAMPLES)
            .map(|(s, r)| Example {
                source: s.to_string(),
                reason: r.clone(),
            })
            .collect(),
        kept: samples.len(),
        dropped,
        dropped_examples,
        truncated,
        total_tokens,
        target_tokens,
        unknown_tokens,
        lengths,
        example_source,
        example,
    };
    Ok(Prepared { samples, report })
}

/// Each token of `r` decoded on its own, with its target flag.
pub fn token_views(r: &Rendered, tok: &Tokenizer) -> Result<Vec<TokenView>> {
    r.ids()
        .iter()
        .zip(r.loss_mask())
        .map(|(&id, &target)| {
            Ok(TokenView {
                token: tok.decode(&[id])?,
                id,
                target,
            })
        })
        .collect::<Result<Vec<_>, Error>>()
}

fn length_stats(lengths: &[usize]) -> Option<LengthStats> {
    if lengths.is_empty() {
        return None;
    }
    let mut sorted = lengths.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    // Nearest-rank percentiles.
    let rank = |p: f64| sorted[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    let (min, max) = (sorted[0], sorted[n - 1]);
    const BUCKETS: usize = 8;
    let width = (max - min) / BUCKETS + 1;
    let mut histogram: Vec<(usize, usize, usize)> = (0..BUCKETS)
        .map(|b| (min + b * width, min + (b + 1) * width - 1, 0))
        .take_while(|&(lo, _, _)| lo <= max)
        .collect();
    for &l in &sorted {
        histogram[(l - min) / width].2 += 1;
    }
    Some(LengthStats {
        min,
        median: rank(0.5),
        p95: rank(0.95),
        max,
        mean: sorted.iter().sum::<usize>() as f64 / n as f64,
        histogram,
    })
}

/// Writes token runs with targets between `[[` and `]]`: the plain-text highlighting used when
/// colours are not available.
pub fn bracket_targets(views: &[TokenView]) -> String {
    let mut out = String::new();
    let mut inside = false;
    for v in views {
        if v.target != inside {
            out.push_str(if v.target { "[[" } else { "]]" });
            inside = v.target;
        }
        out.push_str(&v.token);
    }
    if inside {
        out.push_str("]]");
    }
    out
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "== preflight report (epoch {}) ==", self.epoch)?;
        writeln!(
            f,
            "template {}, train_on {}, max_len {}, length_policy {}",
            self.template,
            self.train_on,
            self.max_len.map_or("none".to_owned(), |m| m.to_string()),
            self.length_policy
        )?;
        let formats: Vec<String> = self
            .per_format
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(
            f,
            "records read     {} ({}), blank lines {}",
            self.records_read,
            if formats.is_empty() {
                "none".to_owned()
            } else {
                formats.join(", ")
            },
            self.blank_lines
        )?;
        writeln!(f, "invalid skipped  {}", self.invalid_skipped)?;
        if self.filtered_out > 0 {
            writeln!(f, "filtered out     {} (data.filter)", self.filtered_out)?;
        }
        for e in &self.invalid_examples {
            writeln!(f, "  {}: {}", e.source, e.reason)?;
        }
        let dropped: usize = self.dropped.values().sum();
        writeln!(
            f,
            "samples kept     {} (truncated {}), dropped {}{}",
            self.kept,
            self.truncated,
            dropped,
            if self.dropped.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    self.dropped
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )?;
        for e in &self.dropped_examples {
            writeln!(f, "  {}: {}", e.source, e.reason)?;
        }
        let pct = if self.total_tokens == 0 {
            0.0
        } else {
            100.0 * self.target_tokens as f64 / self.total_tokens as f64
        };
        writeln!(
            f,
            "tokens           {} total, {} targets ({pct:.1}%), {} unknown",
            self.total_tokens, self.target_tokens, self.unknown_tokens
        )?;
        if let Some(l) = &self.lengths {
            writeln!(
                f,
                "length           min {}, median {}, p95 {}, max {}, mean {:.1}",
                l.min, l.median, l.p95, l.max, l.mean
            )?;
            let top = l.histogram.iter().map(|h| h.2).max().unwrap_or(1).max(1);
            for &(lo, hi, count) in &l.histogram {
                let bar = "#".repeat((count * 40).div_ceil(top));
                writeln!(f, "  {lo:>7}..{hi:<7} {count:>8} {bar}")?;
            }
        }
        if let Some(src) = &self.example_source {
            writeln!(f, "first sample ({src}), targets in [[ ]]:")?;
            writeln!(f, "{}", bracket_targets(&self.example))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_stats_percentiles_and_buckets() {
        let l = length_stats(&[10, 1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
        assert_eq!((l.min, l.median, l.p95, l.max), (1, 5, 10, 10));
        assert_eq!(l.histogram.iter().map(|h| h.2).sum::<usize>(), 10);
        assert!(l.histogram.iter().all(|h| h.0 <= h.1));
        let one = length_stats(&[7]).unwrap();
        assert_eq!(one.histogram, vec![(7, 7, 1)]);
        assert!(length_stats(&[]).is_none());
    }

    #[test]
    fn brackets_mark_target_runs() {
        let v = |t: &str, target| TokenView {
            token: t.into(),
            id: 0,
            target,
        };
        assert_eq!(
            bracket_targets(&[
                v("a", false),
                v("b", true),
                v("c", true),
                v("d", false),
                v("e", true)
            ]),
            "a[[bc]]d[[e]]"
        );
    }
}
