//! `cargo xtask train --config FILE [--config FILE ...] [--set k=v ...] [--max-val-loss X]
//! [--sft PATH] [--summary FILE]`: a training run for CI, with its acceptance check.
//!
//! Several `--config`s are stages run in order (pretrain, then SFT on its output); `--set`
//! applies to each. Each stage runs the release `sft` binary (as a user would), then checks its
//! `[check]` section: final validation loss, that the exported model loads, answer accuracy and
//! stop rate (`sft eval-answers`), poem form compliance (`sft eval-poems`). A Markdown summary
//! goes to stdout, to `OUT_DIR/summary.md` and, on GitHub Actions, to `$GITHUB_STEP_SUMMARY`.
//! The exit status is non-zero when any check fails.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::Value;
use sft::TrainConfig;

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The run's TOML config; repeat for stages run in order.
    #[arg(long, required = true)]
    config: Vec<PathBuf>,
    /// Override a config key in every stage (`sft train --set`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Overrides `check.max_val_loss` of the last stage.
    #[arg(long)]
    max_val_loss: Option<f64>,
    /// A prebuilt `sft` binary (default: build the release one).
    #[arg(long)]
    sft: Option<PathBuf>,
    /// Also write the Markdown summary here.
    #[arg(long)]
    summary: Option<PathBuf>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    // Parse every stage first: a typo in stage 2 should not cost stage 1's training time.
    let mut stages = Vec::new();
    for (i, path) in args.config.iter().enumerate() {
        let cfg = TrainConfig::load(path, &args.sets)?;
        let mut check = CheckSection::of(&cfg).with_context(|| format!("{}", path.display()))?;
        check
            .only_train_checks()
            .with_context(|| format!("{}", path.display()))?;
        if i + 1 == args.config.len() {
            check.max_val_loss = args.max_val_loss.or(check.max_val_loss);
        }
        stages.push((path, cfg, check));
    }
    let sft = match &args.sft {
        Some(p) => p.clone(),
        None => crate::build_sft()?,
    };
    let mut markdown = String::new();
    let mut failed = 0;
    for (path, cfg, check) in &stages {
        let stage = run_stage(&sft, path, &args.sets, cfg, check)?;
        failed += stage.checks.iter().filter(|c| !c.passed).count();
        let md = stage.markdown(path, cfg);
        std::fs::write(cfg.run.out_dir.join("summary.md"), &md)
            .with_context(|| format!("writing {}/summary.md", cfg.run.out_dir.display()))?;
        markdown.push_str(&md);
    }
    println!("{markdown}");
    if let Some(p) = &args.summary {
        std::fs::write(p, &markdown).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = std::env::var_os("GITHUB_STEP_SUMMARY") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&p)?;
        f.write_all(markdown.as_bytes())?;
    }
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    Ok(())
}

/// A stage's `[check]`: what its trained model must reach. `sft train` keeps the section as
/// written (it is this program's); it is read here, and a key it does not know is an error
/// before any stage trains.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CheckSection {
    /// The final validation loss must be below this.
    pub(crate) max_val_loss: Option<f64>,
    /// Chats whose last assistant turn the exported model must reproduce with greedy decoding
    /// (`sft eval-answers`).
    pub(crate) answers: Option<PathBuf>,
    /// Exact-match share of `answers` the model must reach.
    pub(crate) min_exact_match: Option<f64>,
    /// Share of `answers` generations that must end at the end-of-turn token.
    pub(crate) min_stop_rate: Option<f64>,
    /// Poem records for `sft eval-poems` (the ci tune patterns to check against).
    pub(crate) poems: Option<PathBuf>,
    /// Styles to generate (default: `sft eval-poems`' list).
    #[serde(default)]
    pub(crate) poem_styles: Vec<String>,
    /// Generations per style (default 50).
    pub(crate) poems_per_style: Option<usize>,
    /// Mean form compliance over `poem_styles` the model must reach.
    pub(crate) min_poem_compliance: Option<f64>,
    /// Form compliance each shi form of `poem_styles` must reach.
    pub(crate) min_shi_compliance: Option<f64>,
    /// Mean compliance over the ci tunes of `poem_styles` the model must reach.
    pub(crate) min_ci_compliance: Option<f64>,
    /// `cargo xtask real-model`: share of the general questions whose answer by the tuned
    /// model still holds the expected word.
    pub(crate) min_general_match: Option<f64>,
    /// `cargo xtask real-model`: exact match on `answers` of the merged model exported to q8_0
    /// GGUF and read back.
    pub(crate) min_export_exact_match: Option<f64>,
}

impl CheckSection {
    /// `cfg`'s `[check]` section (empty when it has none).
    pub(crate) fn of(cfg: &TrainConfig) -> anyhow::Result<CheckSection> {
        toml::Value::Table(cfg.check.clone())
            .try_into()
            .map_err(|e| anyhow::anyhow!("[check]: {e}"))
    }

    /// Refuses the checks only `cargo xtask real-model` enforces: a training run would read them
    /// and pass without them.
    pub(crate) fn only_train_checks(&self) -> anyhow::Result<()> {
        let theirs = [
            ("min_general_match", self.min_general_match),
            ("min_export_exact_match", self.min_export_exact_match),
        ];
        match theirs.iter().find(|(_, v)| v.is_some()) {
            Some((key, _)) => anyhow::bail!(
                "[check] {key} is checked by `cargo xtask real-model`, not by `cargo xtask train`"
            ),
            None => Ok(()),
        }
    }
}

pub(crate) struct Check {
    pub(crate) name: String,
    pub(crate) value: String,
    pub(crate) target: String,
    pub(crate) passed: bool,
}

pub(crate) struct Stage {
    /// `sft train --json`'s summary.
    pub(crate) summary: Value,
    last_metrics: Option<Value>,
    pub(crate) checks: Vec<Check>,
}

pub(crate) fn run_stage(
    sft: &Path,
    config: &Path,
    sets: &[String],
    cfg: &TrainConfig,
    check: &CheckSection,
) -> anyhow::Result<Stage> {
    eprintln!("== sft train --config {} ==", config.display());
    let mut cmd = Command::new(sft);
    // A CI run starts over each time: a previous run in its out_dir is replaced.
    cmd.arg("train")
        .arg("--config")
        .arg(config)
        .arg("--json")
        .arg("--overwrite");
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    let summary: Value = crate::json_output(&mut cmd)?;
    let path_of = |key: &str| -> anyhow::Result<PathBuf> {
        summary
            .get(key)
            .and_then(Value::as_str)
            .map(PathBuf::from)
            .with_context(|| format!("`sft train --json` printed no {key}"))
    };
    let model = path_of("final_model")?;
    let metrics = std::fs::read_to_string(path_of("metrics")?).unwrap_or_default();
    let last_metrics = metrics
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get("loss").is_some());
    let mut checks = Vec::new();

    if let Some(max) = check.max_val_loss {
        let got = summary.get("final_val_loss").and_then(Value::as_f64);
        checks.push(Check {
            name: "final validation loss".into(),
            value: got.map_or("none (no validation data)".into(), |v| format!("{v:.4}")),
            target: format!("< {max}"),
            passed: got.is_some_and(|v| v < max),
        });
    }
    // The exported model must load as a checkpoint and score data: `sft eval` opens it as a
    // user would, with its own tokenizer and template.
    checks.push(loads_check(sft, &model, cfg)?);
    if let Some(answers) = &check.answers {
        let mut cmd = Command::new(sft);
        cmd.args(["eval-answers", "--json", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(answers);
        let r: Value = crate::json_output(&mut cmd)?;
        let n = r.get("n").and_then(Value::as_u64).unwrap_or(0);
        for (key, name, min) in [
            ("exact_match", "exact match", check.min_exact_match),
            ("stopped", "stops at end of turn", check.min_stop_rate),
        ] {
            let got = r.get(key).and_then(Value::as_f64).unwrap_or(0.0);
            checks.push(Check {
                name: format!("{name} ({n} held-out chats)"),
                value: format!("{:.1}%", 100.0 * got),
                target: min.map_or("(reported)".into(), |m| format!(">= {:.1}%", 100.0 * m)),
                passed: min.is_none_or(|m| got >= m),
            });
        }
    }
    if let Some(poems) = &check.poems {
        let mut cmd = Command::new(sft);
        cmd.args(["eval-poems", "--json", "--author-poems", "0", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(poems)
            .arg("--per-style")
            .arg(check.poems_per_style.unwrap_or(50).to_string());
        if !check.poem_styles.is_empty() {
            cmd.arg("--styles").arg(check.poem_styles.join(","));
        }
        let r: Value = crate::json_output(&mut cmd)?;
        let styles = r
            .get("styles")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        checks.extend(poem_checks(check, &styles));
    }
    Ok(Stage {
        summary,
        last_metrics,
        checks,
    })
}

/// The checks on `sft eval-poems`' per-style results: each style's rate (each shi form against
/// `min_shi_compliance`), the ci tunes' mean against `min_ci_compliance`, the mean over every
/// style against `min_poem_compliance`.
fn poem_checks(check: &CheckSection, styles: &[Value]) -> Vec<Check> {
    let at_least = |name: String, got: f64, min: Option<f64>| Check {
        name,
        value: format!("{:.1}%", 100.0 * got),
        target: min.map_or("(reported)".into(), |m| format!(">= {:.1}%", 100.0 * m)),
        passed: min.is_none_or(|m| got >= m),
    };
    let mut checks = Vec::new();
    let (mut rates, mut ci_rates) = (Vec::new(), Vec::new());
    for s in styles {
        let rate = s.get("rate").and_then(Value::as_f64).unwrap_or(0.0);
        let style = s.get("style").and_then(Value::as_str).unwrap_or("?");
        rates.push(rate);
        let min = match s.get("kind").and_then(Value::as_str) == Some("shi") {
            true => check.min_shi_compliance,
            false => {
                ci_rates.push(rate);
                None
            }
        };
        checks.push(at_least(format!("form compliance {style}"), rate, min));
    }
    let mean = |r: &[f64]| r.iter().sum::<f64>() / r.len().max(1) as f64;
    if !ci_rates.is_empty() {
        checks.push(at_least(
            format!("mean ci compliance ({} tunes)", ci_rates.len()),
            mean(&ci_rates),
            check.min_ci_compliance,
        ));
    }
    checks.push(at_least(
        format!("mean form compliance ({} styles)", rates.len()),
        mean(&rates),
        check.min_poem_compliance,
    ));
    checks
}

fn loads_check(sft: &Path, model: &Path, cfg: &TrainConfig) -> anyhow::Result<Check> {
    let data = cfg
        .data
        .validation
        .first()
        .or(cfg.data.train.first())
        .context("the config names no data file")?
        .location()
        .0;
    let mut cmd = Command::new(sft);
    // A check that the model loads and evaluates, not a measurement: a large corpus is cut short.
    cmd.args(["eval", "--json", "--limit", "2000", "--model"])
        .arg(model)
        .arg("--data")
        .arg(&data);
    if let Some(f) = cfg.data.format {
        cmd.arg("--format").arg(f.name());
    }
    if let Some(n) = cfg.data.max_len {
        cmd.arg("--max-len").arg(n.to_string());
    }
    let loss = crate::json_output(&mut cmd).map(|v| v.get("loss").and_then(Value::as_f64));
    Ok(Check {
        name: "exported model loads and evaluates".into(),
        value: match &loss {
            Ok(Some(l)) => format!("loss {l:.4} on `{}`", data.display()),
            Ok(None) => "no loss printed".into(),
            Err(e) => format!("{e:#}"),
        },
        target: "finite loss".into(),
        passed: matches!(loss, Ok(Some(l)) if l.is_finite()),
    })
}

impl Stage {
    pub(crate) fn markdown(&self, config: &Path, cfg: &TrainConfig) -> String {
        let s = &self.summary;
        let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
        let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
        let verdict = if self.checks.iter().all(|c| c.passed) {
            "passed"
        } else {
            "FAILED"
        };
        let mut md = String::new();
        let _ = writeln!(md, "### `{}`: {verdict}\n", config.display());
        let _ = writeln!(md, "| metric | value |\n|---|---|");
        let rows = [
            ("steps", s.get("steps").map(|v| v.to_string())),
            ("final train loss", Some(fmt(num(s, "final_train_loss")))),
            ("final validation loss", Some(fmt(num(s, "final_val_loss")))),
            (
                "final validation token accuracy",
                num(s, "final_val_accuracy").map(|a| format!("{:.1}%", 100.0 * a)),
            ),
            (
                "best validation loss (step)",
                num(s, "best_val_loss").map(|l| {
                    format!(
                        "{l:.4} ({})",
                        s.get("best_step").map_or("-".into(), |v| v.to_string())
                    )
                }),
            ),
            (
                "tokens/s (last step)",
                self.last_metrics
                    .as_ref()
                    .and_then(|m| num(m, "tokens_per_s"))
                    .map(|t| format!("{t:.0}")),
            ),
            (
                "wall time",
                num(s, "elapsed_s").map(|t| format!("{:.0} s", t)),
            ),
            (
                "peak memory",
                num(s, "peak_rss_mib").map(|m| format!("{m:.0} MiB")),
            ),
            ("output", Some(format!("`{}`", cfg.run.out_dir.display()))),
            (
                "loss plot",
                s.get("plot")
                    .and_then(Value::as_str)
                    .map(|p| format!("`{p}`")),
            ),
        ];
        for (k, v) in rows {
            if let Some(v) = v {
                let _ = writeln!(md, "| {k} | {v} |");
            }
        }
        let _ = writeln!(md, "\n| check | value | target | |\n|---|---|---|---|");
        for c in &self.checks {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                c.name,
                c.value,
                c.target,
                if c.passed { "ok" } else { "FAIL" }
            );
        }
        md.push('\n');
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_every_check_and_the_verdict() {
        let stage = Stage {
            summary: serde_json::json!({"steps": 10, "final_val_loss": 0.25, "elapsed_s": 3.0,
                "plot": "runs/x/loss.svg"}),
            last_metrics: Some(serde_json::json!({"loss": 0.3, "tokens_per_s": 1234.0})),
            checks: vec![
                Check {
                    name: "final validation loss".into(),
                    value: "0.2500".into(),
                    target: "< 0.3".into(),
                    passed: true,
                },
                Check {
                    name: "exact match".into(),
                    value: "80.0%".into(),
                    target: ">= 90.0%".into(),
                    passed: false,
                },
            ],
        };
        let cfg = TrainConfig::from_toml_str(
            "[model]\npreset = \"tiny-gpt\"\n[tokenizer]\nbuild = \"char\"\n[data]\ntrain = [\"x.jsonl\"]\n[run]\nout_dir = \"runs/x\"\n",
            &[],
        )
        .unwrap();
        let md = stage.markdown(Path::new("configs/x.toml"), &cfg);
        assert!(md.contains("`configs/x.toml`: FAILED"), "{md}");
        assert!(
            md.contains("| final validation loss | 0.2500 | < 0.3 | ok |"),
            "{md}"
        );
        assert!(
            md.contains("| exact match | 80.0% | >= 90.0% | FAIL |"),
            "{md}"
        );
        assert!(md.contains("| tokens/s (last step) | 1234 |"), "{md}");
        assert!(md.contains("`runs/x/loss.svg`"), "{md}");
    }

    /// Each shi form against its own bound, the ci against their mean, all against the overall
    /// mean: one form below its bound fails the stage even when the means pass.
    #[test]
    fn poem_checks_hold_each_shi_form_and_the_ci_mean() {
        let check = CheckSection {
            min_poem_compliance: Some(0.6),
            min_shi_compliance: Some(0.9),
            min_ci_compliance: Some(0.3),
            ..Default::default()
        };
        let styles = |jueju: f64, ci: [f64; 2]| {
            vec![
                serde_json::json!({"style": "五言绝句", "kind": "shi", "rate": jueju}),
                serde_json::json!({"style": "七言律诗", "kind": "shi", "rate": 1.0}),
                serde_json::json!({"style": "浣溪沙", "kind": "ci", "rate": ci[0]}),
                serde_json::json!({"style": "沁园春", "kind": "ci", "rate": ci[1]}),
            ]
        };
        let verdicts = |s: Vec<Value>| -> Vec<(String, bool)> {
            poem_checks(&check, &s)
                .into_iter()
                .map(|c| (c.name, c.passed))
                .collect()
        };
        let all = verdicts(styles(0.92, [0.5, 0.2]));
        assert!(all.iter().all(|(_, ok)| *ok), "{all:?}");
        assert_eq!(all[4].0, "mean ci compliance (2 tunes)");
        assert_eq!(all[5].0, "mean form compliance (4 styles)");
        let low_form = verdicts(styles(0.88, [0.9, 0.9]));
        assert_eq!(low_form[0], ("form compliance 五言绝句".into(), false));
        assert!(low_form[1..].iter().all(|(_, ok)| *ok), "{low_form:?}");
        let low_ci = verdicts(styles(1.0, [0.4, 0.1]));
        assert_eq!(low_ci[4], ("mean ci compliance (2 tunes)".into(), false));
        // A ci tune has no bound of its own.
        assert!(low_ci[3].1);
    }

    const CONFIG: &str = "[model]\npreset = \"tiny-gpt\"\n[tokenizer]\nbuild = \"char\"\n[data]\ntrain = [\"x.jsonl\"]\n[run]\nout_dir = \"runs/x\"\n[check]\nmin_exact_mach = 0.9\n";

    /// `sft train` keeps `[check]` as written; here a key that is not a check is an error
    /// naming it, and a right one reads.
    #[test]
    fn a_typo_in_check_is_an_error() {
        let cfg = TrainConfig::from_toml_str(CONFIG, &[]).unwrap();
        let err = format!("{:#}", CheckSection::of(&cfg).unwrap_err());
        assert!(err.contains("min_exact_mach"), "{err}");
        let cfg = TrainConfig::from_toml_str(&CONFIG.replace("mach", "match"), &[]).unwrap();
        let check = CheckSection::of(&cfg).unwrap();
        assert_eq!(check.min_exact_match, Some(0.9));
        let cfg =
            TrainConfig::from_toml_str(&CONFIG.replace("mach = 0.9", "match = \"high\""), &[])
                .unwrap();
        assert!(CheckSection::of(&cfg).is_err());
        // A check only `cargo xtask real-model` enforces is refused by name.
        let cfg = TrainConfig::from_toml_str(
            &CONFIG.replace("min_exact_mach = 0.9", "min_general_match = 0.9"),
            &[],
        )
        .unwrap();
        let err = CheckSection::of(&cfg)
            .unwrap()
            .only_train_checks()
            .unwrap_err()
            .to_string();
        assert!(err.contains("min_general_match"), "{err}");
    }

    /// The GitHub workflow's training step is a `cargo xtask train` that this program accepts,
    /// the same line `.ci/run train-demo` runs, on configs that load and hold the demo to its
    /// target, and the artifact it keeps is their run directory.
    #[test]
    fn the_workflow_runs_the_demo_check() {
        use clap::Parser;
        let root = crate::project_root();
        let workflow =
            std::fs::read_to_string(root.join(".github/workflows/train-demo.yml")).unwrap();
        let line = workflow
            .lines()
            .filter_map(|l| l.trim().strip_prefix("run: "))
            .find(|l| l.starts_with("cargo xtask train "))
            .expect("a `run: cargo xtask train ...` step");
        let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
        assert!(
            ci.lines().any(|l| l.trim() == line),
            ".ci/run lacks `{line}`"
        );
        // Plain words, so what clap sees here is what the shell passes there.
        assert!(
            !line.contains(['\'', '"', '$', '|', ';', '&', '\\']),
            "{line}"
        );
        // `cargo xtask` is the alias of the xtask binary: its arguments start after `cargo`.
        let parsed = crate::Xtask::try_parse_from(line.split_whitespace().skip(1));
        let crate::Cmd::Train(args) = parsed.unwrap_or_else(|e| panic!("{line}: {e}")).command
        else {
            panic!("{line}: not `xtask train`");
        };
        let mut out_dirs = vec![];
        for config in &args.config {
            let cfg = TrainConfig::load(&root.join(config), &args.sets).unwrap();
            out_dirs.push(cfg.run.out_dir.clone());
            if config == args.config.last().unwrap() {
                let check = CheckSection::of(&cfg).unwrap();
                assert_eq!(check.poem_styles, ["五言绝句", "七言绝句"]);
                assert!(check.min_shi_compliance.is_some_and(|m| m >= 0.5));
            }
        }
        let artifact = workflow
            .lines()
            .find_map(|l| l.trim().strip_prefix("path: "))
            .expect("an artifact path");
        assert!(
            out_dirs.iter().all(|d| d.starts_with(artifact)),
            "{out_dirs:?} outside {artifact}"
        );
        assert!(args.summary.is_some_and(|s| s.starts_with(artifact)));
    }

    /// Every shipped config's `[check]` reads, so CI finds a typo in one before it trains.
    #[test]
    fn shipped_checks_read() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut checks = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let cfg = TrainConfig::load(&path, &[]).unwrap();
                let check =
                    CheckSection::of(&cfg).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                checks += usize::from(check != CheckSection::default());
            }
        }
        assert!(
            checks >= 5,
            "expected the quality configs' checks, found {checks}"
        );
    }
}
