//! `cargo xtask llama-cpp-check [--model GGUF|DIR] [--questions JSONL] [--node-dir DIR]
//! [--sft PATH] [--summary FILE]`: llama.cpp itself reads what `sft export` writes.
//!
//! The model (default: SmolLM2-135M-Instruct's GGUF, fetched as `cargo xtask real-model` does)
//! is exported to f16 and q8_0; for each file, llama.cpp (node-llama-cpp's prebuilt CPU build,
//! installed from npm into `target/llama-cpp-node` when absent) tokenizes each general question
//! of `tests/data/facts/general.json` (or `--questions`) as rendered by the chat template, continues it greedily
//! from sft's prompt ids, and is teacher-forced along sft's greedy answer (`sft generate` on the
//! same file) to give its own choice at every step.
//!
//! The checks: llama.cpp's prompt ids are sft's; its greedy ids are sft's, except where they
//! part at a near-tie. llama.cpp rounds the activations inside its matrix products (to f16 for
//! f16 weights, to 8-bit blocks for q8_0; sft multiplies the dequantized weights in f32), so the
//! two implementations' logits differ by a few hundredths to tenths, and a step whose two best
//! tokens are that close may go either way. At each parting the table gives how far apart sft's
//! logits for the two tokens are (one forward pass over the prefix), which must be under
//! `--tie-gap`, and llama.cpp's, teacher-forced over the same prefix in one batch. Where that
//! is negative, llama.cpp's batched pass prefers sft's token where its token-by-token pass did
//! not: the pair is close enough for llama.cpp's own two paths to part.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::real_model::{
    checks_table, general_questions, prompts, run_json, sft_generate, smollm2_gguf,
};
use crate::train::Check;

/// The node-llama-cpp the check was written against (its llama.cpp: build b1-0ad4a86).
const NODE_LLAMA_CPP: &str = "node-llama-cpp@3.22.1";
/// New tokens per greedy answer (fewer where the model's context ends sooner).
const MAX_NEW_TOKENS: usize = 48;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The model to export: a checkpoint directory, an adapter or a GGUF file.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where node-llama-cpp is (installed with npm when absent; relative to the workspace).
    #[arg(long, default_value = "target/llama-cpp-node")]
    node_dir: PathBuf,
    /// A prebuilt `sft` binary (default: build the release one).
    #[arg(long)]
    sft: Option<PathBuf>,
    /// The questions: the first user turn of each chat of this JSONL file (default: the general
    /// questions of `tests/data/facts/general.json`).
    #[arg(long)]
    questions: Option<PathBuf>,
    /// Where the exports go.
    #[arg(long, default_value = "runs/llama-cpp-check")]
    out: PathBuf,
    /// Where greedy ids part, sft's logits for the two tokens must be closer than this (either
    /// way).
    #[arg(long, default_value_t = 0.5)]
    tie_gap: f64,
    /// Also write the Markdown summary here.
    #[arg(long)]
    summary: Option<PathBuf>,
}

fn node_llama_cpp(dir: &Path) -> anyhow::Result<()> {
    if dir
        .join("node_modules/node-llama-cpp/package.json")
        .is_file()
    {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    eprintln!("$ npm install --prefix {} {NODE_LLAMA_CPP}", dir.display());
    let status = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--prefix"])
        .arg(dir)
        .arg(NODE_LLAMA_CPP)
        .status()
        .context("running npm (Node.js is needed for llama.cpp's node-llama-cpp)")?;
    if !status.success() {
        bail!("npm install {NODE_LLAMA_CPP} failed ({status})");
    }
    Ok(())
}

/// sft's logit for `token` minus its logit for `other`, after `ids` (one forward pass over
/// them all, as llama.cpp's teacher forcing runs).
fn sft_margin(
    model: &sft_model::Model,
    ids: &[u32],
    token: u32,
    other: u32,
) -> anyhow::Result<f64> {
    let n = ids.len();
    let input = Tensor::from_vec(ids.to_vec(), (1, n), &Device::Cpu)?;
    let pos = Tensor::from_vec((0..n as u32).collect::<Vec<_>>(), (1, n), &Device::Cpu)?;
    let logits = model.forward(&input, &pos, &sft_model::AttentionMask::Causal, None)?;
    let last: Vec<f32> = logits.get(0)?.get(n - 1)?.to_vec1()?;
    Ok((last[token as usize] - last[other as usize]) as f64)
}

/// The questions asked: the general ones, or the first user turn of each chat of a JSONL file.
fn questions(path: Option<&Path>) -> anyhow::Result<Vec<String>> {
    let Some(path) = path else {
        return Ok(general_questions()?.into_iter().map(|(q, _)| q).collect());
    };
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).with_context(at)?;
        let q = v["messages"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str())
            .with_context(|| format!("{}: no user turn", at()))?;
        out.push(q.to_string());
    }
    Ok(out)
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let model = match &args.model {
        Some(m) => m.clone(),
        None => smollm2_gguf()?,
    };
    let node_dir = crate::project_root().join(&args.node_dir);
    node_llama_cpp(&node_dir)?;
    let sft = match &args.sft {
        Some(p) => p.clone(),
        None => crate::build_sft()?,
    };
    std::fs::create_dir_all(&args.out)?;
    let questions = questions(args.questions.as_deref())?;
    let mut checks = vec![];
    let mut md = format!(
        "#### llama.cpp on `sft export`s of `{}`\n\n",
        model.display()
    );
    for quant in ["f16", "q8_0"] {
        let file = args.out.join(format!("model-{quant}.gguf"));
        let _ = std::fs::remove_file(&file);
        let status = Command::new(&sft)
            .args(["export", "--quant", quant, "--model"])
            .arg(&model)
            .arg("--out")
            .arg(&file)
            .status()?;
        if !status.success() {
            bail!("sft export --quant {quant} failed ({status})");
        }
        let (table, file_checks) = compare(&sft, &node_dir, &file, quant, &questions, &args)?;
        md.push_str(&table);
        checks.extend(file_checks);
    }
    md.push_str(&checks_table(&checks));
    println!("{md}");
    if let Some(p) = &args.summary {
        std::fs::write(p, &md).with_context(|| p.display().to_string())?;
    }
    let failed = checks.iter().filter(|c| !c.passed).count();
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    Ok(())
}

/// Text for a Markdown table's cell: a `|` (as in `<|im_end|>`) would end the cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// How llama.cpp's greedy answer compares with sft's.
enum Outcome {
    Same,
    /// The same ids, until llama.cpp ended at this token: an end of generation for llama.cpp,
    /// which sft's template does not stop at.
    EndsAt(u32),
    /// At step `k` sft chose `mine`, llama.cpp `rival`; sft's logits for the two are `gap`
    /// apart, llama.cpp's teacher-forced ones `llama_gap` the other way.
    Parts {
        k: usize,
        mine: u32,
        rival: u32,
        gap: f64,
        llama_gap: Option<f64>,
    },
}

/// `mine`: sft's answer with its stop token; `theirs`: llama.cpp's, with the end-of-generation
/// token it stopped at; `teacher`: llama.cpp's teacher-forced steps along sft's answer.
fn outcome(
    model: &sft_model::Model,
    prompt: &[u32],
    mine: &[u32],
    theirs: &[u32],
    teacher: &[Value],
    stop: u32,
) -> anyhow::Result<Outcome> {
    if mine == theirs {
        return Ok(Outcome::Same);
    }
    let k = mine.iter().zip(theirs).take_while(|(a, b)| a == b).count();
    if k == theirs.len() && !theirs.is_empty() {
        return Ok(Outcome::EndsAt(theirs[k - 1]));
    }
    let (m, rival) = (
        mine.get(k).copied().unwrap_or(stop),
        theirs.get(k).copied().unwrap_or(stop),
    );
    let mut prefix = prompt.to_vec();
    prefix.extend_from_slice(&mine[..k]);
    Ok(Outcome::Parts {
        k,
        mine: m,
        rival,
        gap: sft_margin(model, &prefix, m, rival)?,
        llama_gap: teacher
            .get(k)
            .and_then(|s| Some(s["rival_logit"].as_f64()? - s["forced_logit"].as_f64()?)),
    })
}

/// sft and llama.cpp on one exported file: a Markdown table of the answers and the checks.
fn compare(
    sft: &Path,
    node_dir: &Path,
    file: &Path,
    quant: &str,
    questions: &[String],
    args: &Args,
) -> anyhow::Result<(String, Vec<Check>)> {
    let (rendered, stop_ids) = prompts(file, questions)?;
    let model = sft::gguf::load_model(file, DType::F32, &Device::Cpu)?;
    // Within the model's context: sft stops at its end, llama.cpp's context would run on.
    let longest = rendered.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    let max_new = MAX_NEW_TOKENS.min(model.config().max_positions().saturating_sub(longest));
    if max_new == 0 {
        bail!("{}: a prompt fills the model's context", file.display());
    }
    let mut ours = vec![];
    for q in questions {
        ours.push(sft_generate(sft, file, q, &args.out, max_new)?);
    }
    // Along sft's answer, its stop token included when it is the template's only one.
    let forced = |i: usize| -> Vec<u32> {
        let mut ids = ours[i].ids.clone();
        if ours[i].stopped && stop_ids.len() == 1 {
            ids.push(stop_ids[0]);
        }
        ids
    };
    let script = crate::project_root().join("xtask/scripts/llama_greedy.mjs");
    let reply = run_json(
        Command::new("node").arg(&script).arg(node_dir),
        &json!({
            "gguf": file,
            "prompts": rendered.iter().enumerate().map(|(i, p)| json!({
                "ids": p.ids, "text": p.text, "forced": forced(i),
            })).collect::<Vec<_>>(),
            "max_new_tokens": max_new,
            "threads": 2,
        }),
    )?;
    let tok = sft::gguf::load_tokenizer(file)?;
    let mut md = format!(
        "`{quant}` ({:.1} MB), node-llama-cpp {}, llama.cpp {}:\n\n| question | sft | llama.cpp | teacher-forced steps where llama.cpp picks sft's token |\n|---|---|---|---|\n",
        std::fs::metadata(file)?.len() as f64 / 1e6,
        reply["node_llama_cpp"].as_str().unwrap_or("?"),
        reply["llama_cpp"]["release"].as_str().unwrap_or("?")
    );
    let (mut same_prompt, mut same, mut ties, mut worst) = (0, 0, 0, 0f64);
    let (mut steps, mut steps_same) = (0, 0);
    for (i, q) in questions.iter().enumerate() {
        let answer: &Value = &reply["answers"][i];
        let tokenized: Vec<u32> = serde_json::from_value(answer["tokenized"].clone())?;
        same_prompt += usize::from(tokenized == rendered[i].ids);
        let theirs: Vec<u32> = serde_json::from_value(answer["ids"].clone())?;
        let teacher = answer["forced"]
            .as_array()
            .context("no teacher-forced steps")?;
        let forced = forced(i);
        let agree = teacher
            .iter()
            .zip(&forced)
            .filter(|(s, &t)| s["token"].as_u64() == Some(t as u64))
            .count();
        steps += forced.len();
        steps_same += agree;
        let stop = stop_ids
            .first()
            .copied()
            .context("the template has no stop id")?;
        // sft's answer with the stop it ended at (the one llama.cpp ended at, if it is one).
        let mut mine = ours[i].ids.clone();
        if ours[i].stopped {
            let at = theirs.get(mine.len()).copied();
            mine.push(at.filter(|t| stop_ids.contains(t)).unwrap_or(stop));
        }
        let verdict = match outcome(&model, &rendered[i].ids, &mine, &theirs, teacher, stop)? {
            Outcome::Same => {
                same += 1;
                "the same ids".to_string()
            }
            Outcome::EndsAt(t) => {
                same += 1;
                format!(
                    "the same ids, until llama.cpp ends at {:?}, an end of generation for it, not for sft's template",
                    tok.decode(&[t])?
                )
            }
            Outcome::Parts {
                k,
                mine,
                rival,
                gap,
                llama_gap,
            } => {
                // sft's full pass may even prefer llama.cpp's token by a hair (its generation
                // runs token by token through the KV cache): a near-tie either way.
                worst = worst.max(gap.abs());
                ties += usize::from(gap.abs() < args.tie_gap);
                format!(
                    "parts at token {k} ({:?} for sft's {:?}): sft's logits {gap:.3} apart{}; {:?}",
                    tok.decode(&[rival])?,
                    tok.decode(&[mine])?,
                    llama_gap.map_or(String::new(), |g| format!(
                        ", llama.cpp's teacher-forced ones {g:.3} the other way"
                    )),
                    tok.decode_skip_special(&theirs)?
                )
            }
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {agree}/{} |",
            cell(q),
            cell(&format!("{:?}", ours[i].text)),
            cell(&verdict),
            forced.len()
        );
    }
    md.push('\n');
    let n = questions.len();
    let checks = vec![
        Check {
            name: format!("{quant}: llama.cpp's prompt ids are sft's"),
            value: format!("{same_prompt}/{n}"),
            target: format!("{n}/{n}"),
            passed: same_prompt == n,
        },
        Check {
            name: format!(
                "{quant}: llama.cpp's greedy ids are sft's, or part where sft's two logits are < {} apart",
                args.tie_gap
            ),
            value: format!(
                "{same}/{n} the same, {ties} at a near-tie (widest {worst:.3}); {steps_same}/{steps} teacher-forced steps agree"
            ),
            target: format!("{n}/{n}"),
            passed: same + ties == n,
        },
    ];
    Ok((md, checks))
}
