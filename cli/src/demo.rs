//! The bundled demo: `sft train` with no config.
//!
//! The nanopoet flow end to end on 4,800 jueju compiled into the binary: a char tokenizer built
//! from them, a small GPT pretrained on the poem text (`configs/demo-pretrain.toml`), SFT on the
//! poems as records with metadata dropout and loss on the content only
//! (`configs/demo-sft.toml`). Then what SFT changed: the form compliance of the pretrained and
//! the fine-tuned model for each style of the SFT stage's `[check]` (the counts of
//! `sft::quality::poem_compliance`, with `sft eval-poems`' sampling, the check that
//! `cargo xtask train` enforces on the same configs), a few poems of the fine-tuned model, and
//! where the plots and checkpoints are. `--set KEY=V` overrides apply to both stages,
//! `--set pretrain.KEY=V` and `--set sft.KEY=V` to one.
//!
//! With `--json`, stdout is each stage's summary object (as `sft train --config --json`), then
//! `{"demo":{"pretrained":[..],"fine_tuned":[..],"samples":[{prompt,poem}],"target":x}}`, the
//! two lists in `sft eval-poems --json`'s `styles` form.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sft::quality::{ci_patterns, poem_compliance, StyleCompliance};
use sft::TrainConfig;
use sft_data::{InvalidPolicy, Poem, Prompt};
use sft_model::generate::generate;

use crate::common::{self, Checkpoint, SamplingArgs, TemplateArgs};

/// 4,800 jueju (680 KB), MIT; see tests/data/poems/README.md.
const POEMS: &str = include_str!("../../tests/data/poems/jueju.jsonl");
const POEMS_LICENSE: &str = include_str!("../../tests/data/poems/LICENSE-chinese-poetry");
const PRETRAIN: &str = include_str!("../../configs/demo-pretrain.toml");
const SFT: &str = include_str!("../../configs/demo-sft.toml");

/// Authors of the bundled poems that the samples are written for, then one with no author, for
/// each style.
const SAMPLE_AUTHORS: [&str; 3] = ["李白", "白居易", ""];

/// The styles and count the demo evaluates: the SFT stage's `[check]` (which `cargo xtask train`
/// reads in full).
#[derive(Debug, Deserialize)]
struct DemoCheck {
    poem_styles: Vec<String>,
    poems_per_style: usize,
    min_shi_compliance: Option<f64>,
}

/// A poem of the fine-tuned model, shown beside the counts.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    prompt: String,
    poem: String,
}

/// What the demo found: the checker's results for both models, style by style, and the samples.
#[derive(Debug, Serialize)]
struct Outcome {
    pretrained: Vec<StyleCompliance>,
    fine_tuned: Vec<StyleCompliance>,
    samples: Vec<Sample>,
    /// At least this share of each style in form (the `[check]`'s target), if it names one.
    target: Option<f64>,
}

pub(crate) fn run(out: &Path, sets: &[String], json: bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let data_dir = out.join("data");
    std::fs::create_dir_all(&data_dir).with_context(|| data_dir.display().to_string())?;
    let poems = data_dir.join("jueju.jsonl");
    std::fs::write(&poems, POEMS).with_context(|| poems.display().to_string())?;
    std::fs::write(data_dir.join("LICENSE-chinese-poetry"), POEMS_LICENSE)?;
    eprintln!(
        "sft demo: pretrain a char GPT on {} jueju, then SFT it on them with their metadata, into {}",
        POEMS.lines().count(),
        out.display()
    );
    let data = format!("data.train=[{:?}]", poems.display().to_string());

    let pretrain_dir = out.join("pretrain");
    let cfg = stage(
        "pretrain",
        PRETRAIN,
        &[
            data.clone(),
            format!("run.out_dir={}", pretrain_dir.display()),
            // Re-running the demo starts it over.
            "run.overwrite=true".into(),
        ],
        sets,
    )?;
    eprintln!("\n== stage 1/2: pretraining on poem text ==");
    let pretrained = crate::training::run_config(&cfg, None, json, None)?;

    let sft_dir = out.join("sft");
    let cfg = stage(
        "sft",
        SFT,
        &[
            data,
            format!("model.path={}", pretrained.final_model.display()),
            format!("run.out_dir={}", sft_dir.display()),
            "run.overwrite=true".into(),
        ],
        sets,
    )?;
    eprintln!(
        "\n== stage 2/2: SFT on poem records (metadata kept with p = {}) ==",
        cfg.data.metadata_keep_prob
    );
    let tuned = crate::training::run_config(&cfg, None, json, None)?;

    let check: DemoCheck = serde_json::to_value(&cfg.check)
        .and_then(serde_json::from_value)
        .context("the demo's SFT config: [check] names poem_styles and poems_per_style")?;
    eprintln!(
        "\n== what SFT changed: {} poems per style from each model ==",
        check.poems_per_style
    );
    let outcome = crate::on_pool(cfg.train.threads, || {
        evaluate(&pretrained.final_model, &tuned.final_model, &poems, &check)
    })?;
    let paths = Paths {
        data: poems,
        pretrained: pretrained.final_model,
        tuned: tuned.final_model,
        plots: [pretrained.plot, tuned.plot],
        elapsed_s: t0.elapsed().as_secs_f64(),
    };
    if json {
        println!("{}", serde_json::json!({ "demo": outcome }));
    } else {
        print!("{}", summary(&outcome, &paths));
    }
    Ok(())
}

/// The checker's counts for the pretrained and the fine-tuned model, and samples of the latter.
fn evaluate(
    pretrained: &Path,
    tuned: &Path,
    data: &Path,
    check: &DemoCheck,
) -> anyhow::Result<Outcome> {
    let read = sft::feed::read_data(data, Some(sft_data::Format::Poem), InvalidPolicy::Error)?;
    let patterns = ci_patterns(&read.records);
    let opts = crate::quality::default_options(check.poem_styles.clone(), check.poems_per_style);
    let template = TemplateArgs {
        template: sft_data::TemplateChoice::Auto,
        chat_template: None,
    };
    let count =
        |ck: &Checkpoint| poem_compliance(&ck.model, &ck.tok, &ck.template, &patterns, &opts);
    let pretrained = count(&common::open(pretrained, None, &template)?)?;
    let tuned = common::open(tuned, None, &template)?;
    let fine_tuned = count(&tuned)?;
    let samples = samples(&tuned, &check.poem_styles)?;
    Ok(Outcome {
        pretrained,
        fine_tuned,
        samples,
        target: check.min_shi_compliance,
    })
}

/// A poem for each of `SAMPLE_AUTHORS` in each style, with `sft eval-poems`' sampling.
fn samples(ck: &Checkpoint, styles: &[String]) -> anyhow::Result<Vec<Sample>> {
    let sampling = SamplingArgs {
        max_new_tokens: crate::quality::MAX_NEW_TOKENS,
        temperature: crate::quality::TEMPERATURE,
        top_k: Some(crate::quality::TOP_K),
        top_p: None,
        repetition_penalty: 1.0,
        seed: crate::quality::SEED,
    };
    let params = sampling.params(ck.template.stop_ids().to_vec())?;
    let poems: Vec<Poem> = styles
        .iter()
        .flat_map(|style| {
            SAMPLE_AUTHORS.iter().map(|author| Poem {
                author: author.to_string(),
                style: style.clone(),
                ..Poem::default()
            })
        })
        .collect();
    let mut prompts = vec![];
    for p in &poems {
        prompts.push(Prompt::Poem(p.clone()).ids(&ck.template, &ck.tok)?);
    }
    let written = generate(&ck.model, &prompts, &params)?;
    let mut out = vec![];
    for (p, g) in poems.iter().zip(written) {
        out.push(Sample {
            prompt: prompt_json(p),
            poem: ck.tok.decode_skip_special(&g.ids)?,
        });
    }
    Ok(out)
}

/// The prompt as `sft generate --record` takes it.
fn prompt_json(p: &Poem) -> String {
    let mut m = serde_json::Map::new();
    if !p.author.is_empty() {
        m.insert("author".into(), p.author.clone().into());
    }
    m.insert("style".into(), p.style.clone().into());
    serde_json::Value::Object(m).to_string()
}

/// Where the demo wrote what the summary points to.
struct Paths {
    data: PathBuf,
    pretrained: PathBuf,
    tuned: PathBuf,
    plots: [PathBuf; 2],
    elapsed_s: f64,
}

/// The closing report. Every count in it is the checker's (`outcome.pretrained`,
/// `outcome.fine_tuned`); the samples are shown, never counted.
fn summary(outcome: &Outcome, paths: &Paths) -> String {
    let mut s = String::new();
    let per_style = outcome.fine_tuned.first().map_or(0, |r| r.generated);
    let _ = writeln!(
        s,
        "\nWhat SFT changed: of {per_style} poems per style, written for a prompt that names only the\n\
         style, how many have its form (4 lines of 5 or 7 characters, each ending in ， or 。),\n\
         pretrained model -> fine-tuned model:"
    );
    for (before, after) in outcome.pretrained.iter().zip(&outcome.fine_tuned) {
        // `min_shi_compliance` holds the shi forms, as `cargo xtask train` reads it; a ci tune
        // is reported without a verdict.
        let target = outcome.target.filter(|_| after.kind == "shi");
        let met = target.map_or(String::new(), |t| {
            let ok = after.rate >= t;
            format!(
                "  (target {:.0}%: {})",
                100.0 * t,
                if ok { "met" } else { "NOT met" }
            )
        });
        let _ = writeln!(
            s,
            "  {}: {}/{} -> {}/{} in form{met}",
            after.style, before.compliant, before.generated, after.compliant, after.generated
        );
    }
    for before in &outcome.pretrained {
        if let Some(e) = before.examples.first() {
            let _ = writeln!(s, "  e.g. pretrained, {}: {}", before.style, clip(e, 40));
        }
    }
    let _ = writeln!(s, "\nPoems of the fine-tuned model:");
    for p in &outcome.samples {
        let _ = writeln!(s, "  {}\n    {}", p.prompt, clip(&p.poem, 60));
    }
    let styles: Vec<&str> = outcome
        .fine_tuned
        .iter()
        .map(|r| r.style.as_str())
        .collect();
    let _ = writeln!(
        s,
        "\ncheckpoints: {} (pretrained), {} (fine-tuned)\nloss plots:  {}, {}\n\
         count again: sft eval-poems --model {} --data {} --styles {} --per-style {per_style} --author-poems 0\n\
         write more:  sft generate --model {} --record '{{\"author\":\"李白\",\"style\":\"七言绝句\"}}' --temperature 0.8 --top-k 50\n\
         the demo took {:.0} s",
        paths.pretrained.display(),
        paths.tuned.display(),
        paths.plots[0].display(),
        paths.plots[1].display(),
        paths.tuned.display(),
        paths.data.display(),
        styles.join(","),
        paths.tuned.display(),
        paths.elapsed_s,
    );
    s
}

/// At most `n` characters of `text`, with an ellipsis where it was cut.
fn clip(text: &str, n: usize) -> String {
    match text.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

fn stage(
    name: &str,
    config: &str,
    paths: &[String],
    sets: &[String],
) -> anyhow::Result<TrainConfig> {
    let own = |s: &String| -> Option<String> {
        match s.split_once('.') {
            Some((stage, rest)) if stage == "pretrain" || stage == "sft" => {
                (stage == name).then(|| rest.to_owned())
            }
            _ => Some(s.clone()),
        }
    };
    let overrides: Vec<String> = paths
        .iter()
        .cloned()
        .chain(sets.iter().filter_map(own))
        .collect();
    TrainConfig::from_toml_str(config, &overrides).map_err(|e| anyhow::anyhow!("demo config: {e}"))
}

/// Where the demo writes when no `--set run.out_dir` says otherwise.
pub(crate) fn default_out() -> PathBuf {
    PathBuf::from("runs/demo")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(style: &str, compliant: usize, generated: usize, example: &str) -> StyleCompliance {
        StyleCompliance {
            style: style.into(),
            kind: "shi",
            generated,
            compliant,
            rate: compliant as f64 / generated as f64,
            stopped: 1.0,
            examples: vec![example.into()],
        }
    }

    fn paths() -> Paths {
        Paths {
            data: "runs/demo/data/jueju.jsonl".into(),
            pretrained: "runs/demo/pretrain/final".into(),
            tuned: "runs/demo/sft/final".into(),
            plots: [
                "runs/demo/pretrain/loss.svg".into(),
                "runs/demo/sft/loss.svg".into(),
            ],
            elapsed_s: 118.4,
        }
    }

    /// The counts are the checker's, not a count of the poems shown: here every sample has the
    /// form and the checker's examples do not, and the summary still prints the checker's 7/50
    /// and 31/50.
    #[test]
    fn summary_counts_are_the_checkers() {
        let in_form = "白日依山盡，黃河入海流。欲窮千里目，更上一層樓。";
        let outcome = Outcome {
            pretrained: vec![
                result("五言绝句", 0, 50, "山不見，人"),
                result("七言绝句", 2, 50, "花"),
            ],
            fine_tuned: vec![
                result("五言绝句", 7, 50, "一"),
                result("七言绝句", 31, 50, "二"),
            ],
            samples: (0..6)
                .map(|i| Sample {
                    prompt: format!("{{\"style\":\"{i}\"}}"),
                    poem: in_form.into(),
                })
                .collect(),
            target: Some(0.5),
        };
        let s = summary(&outcome, &paths());
        assert!(
            s.contains("五言绝句: 0/50 -> 7/50 in form  (target 50%: NOT met)"),
            "{s}"
        );
        assert!(
            s.contains("七言绝句: 2/50 -> 31/50 in form  (target 50%: met)"),
            "{s}"
        );
        assert!(s.contains("of 50 poems per style"), "{s}");
        assert_eq!(s.matches(in_form).count(), 6, "{s}");
        // A ci tune has no shi target to meet.
        let mut with_ci = outcome;
        with_ci.pretrained.push(result("浣溪沙", 0, 50, "三"));
        let mut ci = result("浣溪沙", 3, 50, "四");
        ci.kind = "ci";
        with_ci.fine_tuned.push(ci);
        let c = summary(&with_ci, &paths());
        assert!(c.contains("浣溪沙: 0/50 -> 3/50 in form\n"), "{c}");
        assert!(s.contains("e.g. pretrained, 五言绝句: 山不見，人"), "{s}");
        // What to run to count again, and where the plots and checkpoints are.
        assert!(
            s.contains("sft eval-poems --model runs/demo/sft/final --data runs/demo/data/jueju.jsonl --styles 五言绝句,七言绝句 --per-style 50"),
            "{s}"
        );
        for p in [
            "runs/demo/pretrain/final",
            "runs/demo/sft/loss.svg",
            "took 118 s",
        ] {
            assert!(s.contains(p), "{p} in {s}");
        }
    }

    #[test]
    fn clip_cuts_at_characters() {
        assert_eq!(clip("一二三四", 2), "一二…");
        assert_eq!(clip("一二", 2), "一二");
    }

    /// The shipped SFT stage's `[check]` is what the demo evaluates: both jueju forms, a target.
    #[test]
    fn the_sft_stage_names_what_to_evaluate() {
        let cfg = stage("sft", SFT, &[], &["sft.check.poems_per_style=3".into()]).unwrap();
        let check: DemoCheck =
            serde_json::from_value(serde_json::to_value(&cfg.check).unwrap()).unwrap();
        assert_eq!(check.poem_styles, ["五言绝句", "七言绝句"]);
        assert_eq!(check.poems_per_style, 3);
        assert!(check.min_shi_compliance.is_some_and(|t| t >= 0.5));
    }
}
