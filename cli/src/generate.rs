//! `sft generate --model DIR (--prompt TEXT | --messages JSON_FILE | --record JSON) [sampling]`.
//!
//! Contract relied on by scripts:
//! - `--prompt TEXT`: raw text, encoded as is.
//! - `--messages FILE`: a JSON array of `{role, content}` messages (or an object with
//!   `messages`), rendered with the checkpoint's chat template and its generation prompt.
//! - `--record JSON`: the prompt part of a record, rendered with the checkpoint's own template;
//!   for a poem record such as `{"style":"七言绝句","author":"李白"}`: begin marker, the given
//!   metadata fields, content-start marker.
//! - Generation stops at the template's stop token (`<|im_end|>`, the poem content-end marker,
//!   or EOS) or after `--max-new-tokens`. `--temperature 0` (the default) is greedy.
//! - `--json`: one line per sample, `{"ids":[...new ids...],"text":"..."}` where `text` is the
//!   decoded new tokens with special tokens (markers) removed; the line also carries
//!   `"stopped"` (true when the stop token ended it). `--num-samples N` draws N samples, sample i
//!   seeded from (`--seed`, i).
//! - `--compare BASE_DIR`: the same prompts on a base checkpoint too, without `--adapter` (and
//!   on the tuned run's tokenizer when it has none); with `--json` each line carries
//!   `"model": "base"` or `"model": "tuned"`.

use std::path::PathBuf;

use anyhow::Context;
use sft_data::{Message, Prompt};
use sft_model::generate::generate;

use crate::common::{self, Checkpoint, ModelArgs, SamplingArgs, TemplateArgs};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "messages", "record"])))]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Raw text to continue.
    #[arg(long)]
    prompt: Option<String>,
    /// A JSON file with a list of chat messages.
    #[arg(long)]
    messages: Option<PathBuf>,
    /// A record (JSON object) whose prompt part is rendered with the checkpoint's template.
    #[arg(long)]
    record: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    /// Also generate with this base checkpoint, for a side-by-side comparison.
    #[arg(long)]
    compare: Option<PathBuf>,
    #[command(flatten)]
    template: TemplateArgs,
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let prompt = prompt(&args)?;
    let tuned = (args.model.path.as_path(), args.model.adapter.as_deref());
    let mut runs = vec![];
    if let Some(base) = &args.compare {
        // The base runs without the adapter, on the tuned run's tokenizer where it has none of
        // its own (an adapter carries the tokenizer it was trained with).
        runs.push(("base", (base.as_path(), None)));
        runs.push(("tuned", tuned));
    } else {
        runs.push(("", tuned));
    }
    for (label, (dir, adapter)) in runs {
        let fallback = (label == "base").then_some(tuned);
        let ck = common::open_with(dir, adapter, fallback, &args.template)?;
        let outputs = generate_with(&ck, &prompt, &args)?;
        if !args.json && !label.is_empty() {
            println!("=== {label}: {} ===", dir.display());
        }
        for (i, (ids, text, stopped)) in outputs.iter().enumerate() {
            if args.json {
                let mut obj = serde_json::json!({ "ids": ids, "text": text, "stopped": stopped });
                if !label.is_empty() {
                    obj["model"] = label.into();
                }
                println!("{obj}");
            } else {
                if args.num_samples > 1 {
                    println!("--- sample {} ---", i + 1);
                }
                println!("{text}");
            }
        }
    }
    Ok(())
}

/// A prompt in the form every `--model` can render.
enum Input {
    Text(String),
    Prompt(Prompt),
}

fn prompt(args: &Args) -> anyhow::Result<Input> {
    if let Some(p) = &args.prompt {
        return Ok(Input::Text(p.clone()));
    }
    if let Some(path) = &args.messages {
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        let value = match value {
            serde_json::Value::Array(_) => serde_json::json!({ "messages": value }),
            other => other,
        };
        let p = Prompt::from_json(&value).with_context(|| path.display().to_string())?;
        if !matches!(p, Prompt::Chat { .. }) {
            anyhow::bail!("{}: expected a list of chat messages", path.display());
        }
        return Ok(Input::Prompt(p));
    }
    let record = args.record.as_deref().expect("clap requires one input");
    let value: serde_json::Value =
        serde_json::from_str(record).context("--record: not a JSON object")?;
    Ok(Input::Prompt(
        Prompt::from_json(&value).context("--record")?,
    ))
}

type Output = (Vec<u32>, String, bool);

fn generate_with(ck: &Checkpoint, input: &Input, args: &Args) -> anyhow::Result<Vec<Output>> {
    let ids = match input {
        Input::Text(t) => ck.tok.encode(t)?,
        Input::Prompt(p) => p.ids(&ck.template, &ck.tok)?,
    };
    let params = args.sampling.params(ck.template.stop_ids().to_vec())?;
    let prompts = vec![ids; args.num_samples.max(1)];
    let generations = generate(&ck.model, &prompts, &params)?;
    generations
        .into_iter()
        .map(|g| {
            Ok((
                g.ids.clone(),
                ck.tok.decode_skip_special(&g.ids)?,
                g.stop_id.is_some(),
            ))
        })
        .collect()
}

/// For `sft chat`: the messages as a prompt.
pub(crate) fn chat_prompt(messages: &[Message]) -> Prompt {
    Prompt::Chat {
        messages: messages.to_vec(),
        tools: None,
    }
}
