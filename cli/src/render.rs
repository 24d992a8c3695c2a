//! `sft render (--model DIR | --tokenizer PATH) --data FILE [options]`: what training would see.
//!
//! Contract relied on by scripts:
//! - `--json`: one line per kept record, in file order,
//!   `{"input_ids":[...],"loss_mask":[0|1,...],"text":"..."}`; `loss_mask` is aligned with
//!   `input_ids` and unshifted (1 = the token is a training target); `text` is the rendered
//!   chat-template string for conversations, and the decoding of `input_ids` (special tokens
//!   included) for other samples and for truncated ones. Nothing else goes to stdout.
//! - `--report`: only the preflight report; with `--json`, the report as one JSON object.
//! - neither: each kept sample with its targets highlighted (green when stdout is a terminal,
//!   else between `[[` and `]]`), then the report.
//!
//! Invalid lines stop the command with `file:line: field ...: reason` unless `--skip-invalid`,
//! which counts and lists them in the report. Dropped samples are counted in the report.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use sft_data::{
    prepare, Format, InvalidPolicy, LengthPolicy, RenderOptions, Rendered, Sample, TemplateChoice,
    TemplateOptions, TrainOn,
};
use sft_tokenizer::Tokenizer;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["model", "tokenizer"])))]
pub(crate) struct Args {
    /// A checkpoint directory; its tokenizer (and chat template) is used.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A tokenizer.json, a char-tokenizer JSON, or a directory holding one.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The JSONL file to render.
    #[arg(long)]
    data: PathBuf,
    /// Record format (messages, sharegpt, alpaca, prompt_completion, instruct_label, text, poem);
    /// detected per line when absent.
    #[arg(long)]
    format: Option<Format>,
    /// auto, model, chatml, plain or poem.
    #[arg(long, default_value = "auto")]
    template: TemplateChoice,
    /// A Jinja chat template file to use instead of the tokenizer's.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// A template variable as NAME=JSON (e.g. enable_thinking=false); repeatable.
    #[arg(long = "template-var", value_name = "NAME=JSON")]
    template_vars: Vec<String>,
    /// assistant, last, completion or all; each sample's default when absent.
    #[arg(long)]
    train_on: Option<TrainOn>,
    /// Longest sample in tokens; no limit when absent.
    #[arg(long)]
    max_len: Option<usize>,
    /// What to do with longer samples: drop, truncate or error.
    #[arg(long, default_value = "drop")]
    length_policy: LengthPolicy,
    /// Skip invalid lines (listed in the report) instead of stopping at the first.
    #[arg(long)]
    skip_invalid: bool,
    /// Probability of keeping each poem metadata field.
    #[arg(long, default_value_t = 0.5)]
    metadata_keep_prob: f64,
    /// Seed of the poem metadata dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Epoch whose rendering to show (poem dropout differs per epoch).
    #[arg(long, default_value_t = 0)]
    epoch: u64,
    /// Machine-readable output (see the module doc).
    #[arg(long)]
    json: bool,
    /// Print only the preflight report.
    #[arg(long)]
    report: bool,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let tok_path = args
        .model
        .as_ref()
        .or(args.tokenizer.as_ref())
        .expect("clap requires one of --model and --tokenizer");
    // `--model` may be a hub id in the local cache.
    let tok_path = &match &args.model {
        Some(_) => sft::hub::resolve_model(tok_path)?,
        None => tok_path.clone(),
    };
    let tok = sft::gguf::load_tokenizer(tok_path)
        .with_context(|| format!("loading the tokenizer from {}", tok_path.display()))?;
    let mut topts = TemplateOptions::default();
    if let Some(path) = &args.chat_template {
        topts.chat_template = Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the chat template {}", path.display()))?,
        );
    }
    for var in &args.template_vars {
        let (name, value) = var
            .split_once('=')
            .with_context(|| format!("--template-var {var:?}: expected NAME=JSON"))?;
        let value: serde_json::Value = serde_json::from_str(value)
            .with_context(|| format!("--template-var {var:?}: the value is not JSON"))?;
        topts.variables.insert(name.to_owned(), value);
    }
    let template =
        crate::common::template(args.template, &tok, &topts, args.chat_template.as_deref())?;
    let policy = if args.skip_invalid {
        InvalidPolicy::Skip
    } else {
        InvalidPolicy::Error
    };
    let read = sft::feed::read_data(&args.data, args.format, policy)?;
    let opts = RenderOptions {
        train_on: args.train_on,
        max_len: args.max_len,
        length_policy: args.length_policy,
        metadata_keep_prob: args.metadata_keep_prob,
        seed: args.seed,
        check_invariants: true,
    };
    let prepared = prepare(&read, &template, &tok, &opts, args.epoch)?;

    let stdout = std::io::stdout();
    let color = stdout.is_terminal();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.report {
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&prepared.report)?)?;
        } else {
            write!(out, "{}", prepared.report)?;
        }
        out.flush()?;
        return Ok(());
    }
    for (index, rendered) in &prepared.samples {
        let record = &read.records[*index];
        if args.json {
            let text = match &record.sample {
                Sample::Chat(conv) if !was_truncated(rendered, &opts) => {
                    template.render_chat_text(conv.messages(), conv.tools(), false)?
                }
                _ => tok.decode(rendered.ids())?,
            };
            let mask: Vec<u8> = rendered.loss_mask().iter().map(|&m| u8::from(m)).collect();
            let line = serde_json::json!({
                "input_ids": rendered.ids(),
                "loss_mask": mask,
                "text": text,
            });
            writeln!(out, "{line}")?;
        } else {
            writeln!(
                out,
                "--- {} ({}, {} tokens, {} targets) ---",
                record.source,
                record.sample.kind_name(),
                rendered.len(),
                rendered.n_targets()
            )?;
            writeln!(out, "{}", highlight(rendered, &tok, color)?)?;
        }
    }
    if !args.json {
        write!(out, "\n{}", prepared.report)?;
    }
    out.flush()?;
    Ok(())
}

/// A sample can only have been truncated if it is exactly `max_len` long.
fn was_truncated(r: &Rendered, opts: &RenderOptions) -> bool {
    opts.length_policy == LengthPolicy::Truncate && opts.max_len == Some(r.len())
}

/// The sample's text with target runs in green (ANSI) or between `[[` and `]]`. Runs are decoded
/// whole, so characters split over several tokens print correctly.
fn highlight(r: &Rendered, tok: &Tokenizer, color: bool) -> anyhow::Result<String> {
    let (open, close) = if color {
        ("\x1b[32m", "\x1b[0m")
    } else {
        ("[[", "]]")
    };
    let mut out = String::new();
    let ids = r.ids();
    let mask = r.loss_mask();
    let mut start = 0;
    while start < ids.len() {
        let target = mask[start];
        let end = (start..ids.len())
            .find(|&i| mask[i] != target)
            .unwrap_or(ids.len());
        let text = tok.decode(&ids[start..end])?;
        if target {
            out.push_str(open);
            out.push_str(&text);
            out.push_str(close);
        } else {
            out.push_str(&text);
        }
        start = end;
    }
    Ok(out)
}
