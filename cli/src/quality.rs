//! `sft eval-poems` and `sft eval-answers`: does the model do what it was tuned for?
//!
//! `sft eval-poems --model DIR --data POEMS.jsonl [--styles S,S,..] [--per-style N] [--seed S]
//! [--json]`: for each style, N poems generated from a prompt naming only the style; a shi
//! complies when it has its form (4 or 8 lines of 5 or 7 characters ending in ，/。), a ci when
//! its line pattern is one the tune has in `--data`. Also the author conditioning: content loss
//! of `--data`'s poems (`--author-poems N` of them) given the true versus another author. With
//! `--json`, one object `{"styles":[{style,kind,generated,compliant,rate,stopped,examples}],
//! "author":{poems,loss_true_author,loss_other_author,true_author_preferred}}`.
//!
//! `sft eval-answers --model DIR --data CHATS.jsonl [--max-new-tokens N] [--misses N] [--json]`: greedy
//! answers to each conversation's last assistant turn; `{"n":..,"exact_match":..,"stopped":..,
//! "misses":[[prompt,expected,got],..]}`.

use std::path::PathBuf;

use sft::quality::{
    answer_accuracy, author_conditioning, ci_patterns, poem_compliance, PoemEvalOptions, SHI_FORMS,
};
use sft_data::{InvalidPolicy, Sample};

use crate::common::{ModelArgs, TemplateArgs};

/// `sft eval-poems`' sampling. The bundled demo counts poems in form with the same settings, so
/// `sft eval-poems` on the demo's models prints the demo's numbers.
pub(crate) const SEED: u64 = 0;
pub(crate) const TEMPERATURE: f64 = 0.8;
pub(crate) const TOP_K: usize = 50;
pub(crate) const MAX_NEW_TOKENS: usize = 160;

/// `sft eval-poems`' options with its default sampling: `per_style` poems for each of `styles`.
pub(crate) fn default_options(styles: Vec<String>, per_style: usize) -> PoemEvalOptions {
    PoemEvalOptions {
        styles,
        per_style,
        max_new_tokens: MAX_NEW_TOKENS,
        temperature: TEMPERATURE,
        top_k: Some(TOP_K),
        seed: SEED,
    }
}

/// The ci tunes the bundled poems have most of.
const DEFAULT_TUNES: [&str; 6] = ["浣溪沙", "鹧鸪天", "蝶恋花", "西江月", "水调歌头", "沁园春"];

#[derive(clap::Args)]
pub(crate) struct PoemArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Poem records: the ci patterns to check against and the poems for author conditioning.
    #[arg(long)]
    data: PathBuf,
    /// Comma-separated styles (default: the four shi forms and six common ci tunes).
    #[arg(long, value_delimiter = ',')]
    styles: Vec<String>,
    #[arg(long, default_value_t = 50)]
    per_style: usize,
    #[arg(long, default_value_t = SEED)]
    seed: u64,
    #[arg(long, default_value_t = TEMPERATURE)]
    temperature: f64,
    #[arg(long, default_value_t = TOP_K)]
    top_k: usize,
    #[arg(long, default_value_t = MAX_NEW_TOKENS)]
    max_new_tokens: usize,
    /// How many poems of --data score the author conditioning (0 skips it).
    #[arg(long, default_value_t = 200)]
    author_poems: usize,
    #[arg(long)]
    json: bool,
}

/// Stride through the authored poems that picks about `n` of them; `None` when `n` is 0.
fn poems_step(records: &[sft_data::Record], n: usize) -> Option<usize> {
    let authored = records
        .iter()
        .filter(|r| matches!(&r.sample, Sample::Poem(p) if !p.author.is_empty()))
        .count();
    authored.checked_div(n).map(|s| s.max(1))
}

pub(crate) fn poems(args: PoemArgs) -> anyhow::Result<()> {
    let ck = args.model.open(&TemplateArgs {
        template: sft_data::TemplateChoice::Auto,
        chat_template: None,
    })?;
    let read = sft::feed::read_data(
        &args.data,
        Some(sft_data::Format::Poem),
        InvalidPolicy::Error,
    )?;
    let styles = if args.styles.is_empty() {
        SHI_FORMS
            .iter()
            .map(|f| f.0)
            .chain(DEFAULT_TUNES)
            .map(str::to_owned)
            .collect()
    } else {
        args.styles.clone()
    };
    let opts = PoemEvalOptions {
        styles,
        per_style: args.per_style,
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: Some(args.top_k),
        seed: args.seed,
    };
    let results = poem_compliance(
        &ck.model,
        &ck.tok,
        &ck.template,
        &ci_patterns(&read.records),
        &opts,
    )?;
    let author = if let Some(step) = poems_step(&read.records, args.author_poems) {
        // Every k-th poem, so all authors of the file are represented.
        let poems: Vec<_> = read
            .records
            .iter()
            .filter_map(|r| match &r.sample {
                Sample::Poem(p) if !p.author.is_empty() => Some(p.clone()),
                _ => None,
            })
            .collect();
        let picked: Vec<_> = poems
            .into_iter()
            .step_by(step)
            .take(args.author_poems)
            .collect();
        Some(author_conditioning(
            &ck.model,
            &ck.tok,
            &ck.template,
            &picked,
        )?)
    } else {
        None
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "styles": results, "author": author })
        );
        return Ok(());
    }
    println!(
        "{:<10} {:>4} {:>9} {:>9} {:>8}  example",
        "style", "kind", "compliant", "rate", "stopped"
    );
    for r in &results {
        println!(
            "{:<10} {:>4} {:>5}/{:<3} {:>8.1}% {:>7.1}%  {}",
            r.style,
            r.kind,
            r.compliant,
            r.generated,
            100.0 * r.rate,
            100.0 * r.stopped,
            r.examples.first().map(String::as_str).unwrap_or("")
        );
    }
    if let Some(a) = author {
        println!(
            "author conditioning over {} poems: content loss {:.4} with the true author, {:.4} with another; true author preferred for {:.1}%",
            a.poems, a.loss_true_author, a.loss_other_author, 100.0 * a.true_author_preferred
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub(crate) struct AnswerArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Chat records whose last assistant turn is the reference answer.
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// How many misses to list.
    #[arg(long, default_value_t = 5)]
    misses: usize,
    #[command(flatten)]
    template: TemplateArgs,
    #[arg(long)]
    json: bool,
}

pub(crate) fn answers(args: AnswerArgs) -> anyhow::Result<()> {
    let ck = args.model.open(&args.template)?;
    let read = sft::feed::read_data(&args.data, None, InvalidPolicy::Error)?;
    let r = answer_accuracy(
        &ck.model,
        &ck.tok,
        &ck.template,
        &read.records,
        args.max_new_tokens,
        args.misses,
    )?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "exact match {:.1}% of {}; stopped at end-of-turn {:.1}%",
            100.0 * r.exact_match,
            r.n,
            100.0 * r.stopped
        );
        for (p, want, got) in &r.misses {
            println!(
                "  miss: {:?}\n    expected {want:?}\n    got      {got:?}",
                p.lines().last().unwrap_or("")
            );
        }
    }
    Ok(())
}
