//! `cargo xtask bench [--peer] [--configs a,b,c,d] [--threads N] [--steps N] [--warmup N]
//! [--python PATH] [--skip-data] [--skip-generate] [--skip-one-thread] [--cuda] [--dtype f32|bf16]`.
//!
//! Training throughput of the release `sft` on the configurations of `docs/performance.md`
//! (`CONFIGS`; models written with `init-model` into `target/bench/models`), optionally against PyTorch run by
//! `tests/data/scripts/bench_peer.py` in the same invocation; then data preparation (`sft
//! render`, 1 and N threads) and greedy generation. This machine's speed swings between minutes,
//! so only ratios measured in one invocation mean anything: every peer number is measured right
//! after ours. The report goes to stdout and `target/bench/report.md`, raw results to
//! `target/bench/results.jsonl`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Also run the PyTorch peer and print our/their ratios.
    #[arg(long)]
    peer: bool,
    /// Training configurations to run (a, b, c, c-dropout, d, e, e-lora, e-lora-q8,
    /// e-lora-q8-ckpt, e-lora-q4k, f, f-ckpt, f-lora, f-lora-ckpt, g-3b-q4k, h-8b-q4k; see
    /// `CONFIGS`); empty for none.
    #[arg(long, value_delimiter = ',', default_value = "a,b,c,c-dropout,d")]
    configs: Vec<String>,
    /// Compute threads for both sides (default: available cores).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = 3)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Python with torch, transformers and peft (default: `target/bench-venv`, created when
    /// missing).
    #[arg(long)]
    python: Option<PathBuf>,
    #[arg(long)]
    skip_data: bool,
    #[arg(long)]
    skip_generate: bool,
    /// Skip rerunning each multi-step configuration on one thread.
    #[arg(long)]
    skip_one_thread: bool,
    /// Build `sft` with its `cuda` feature (needs the CUDA toolkit) and run the training
    /// configurations, ours and the peer's, on the GPU.
    #[arg(long)]
    cuda: bool,
    /// Weights and activations of the training configurations and the matmul peak: f32 or bf16
    /// (bf16 is for the GPU).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    dtype: String,
    /// Only the data-parallel benchmark (`sft` built with its `mpi` feature, Open MPI's
    /// `mpirun` on the PATH): ranks x threads on this machine and the all-reduce of the
    /// Qwen2.5-0.5B shape's gradients (`xtask/src/ranks.rs`).
    #[arg(long)]
    ranks: bool,
}

/// One training configuration of the benchmark (a row of `docs/performance.md`).
struct BenchConfig {
    name: &'static str,
    what: &'static str,
    preset: &'static str,
    vocab: usize,
    sets: &'static [&'static str],
    batch: usize,
    seq: usize,
    /// Single optimizer step (memory and time), no warm-up.
    single_step: bool,
    /// The model (under `target/bench/models`) and the peer's configuration: `name` unless set.
    base: Option<&'static str>,
    /// Steps with the model's dropout, on both sides (nanopoet trains with 0.1).
    dropout: bool,
    /// LoRA r = 16 on every linear layer (alpha 32, dropout 0.05), on both sides (PEFT's).
    lora: bool,
    /// With `lora`: the frozen base kept as ggml blocks of this type (no peer).
    base_quant: Option<&'static str>,
    /// Activation checkpointing (no peer).
    checkpointing: bool,
    /// Random weights drawn in memory from the preset (`sft bench train --preset`) rather than
    /// a checkpoint written first: for shapes whose f32 checkpoint would not fit in memory.
    in_memory: bool,
}

impl BenchConfig {
    fn base(&self) -> &'static str {
        self.base.unwrap_or(self.name)
    }
}

const E_LORA_Q8: BenchConfig = BenchConfig {
    name: "e-lora-q8",
    what: "the same LoRA on a q8_0 base",
    preset: "qwen2.5-0.5b",
    vocab: 151_936,
    sets: &[],
    batch: 1,
    seq: 512,
    single_step: false,
    base: Some("d"),
    dropout: false,
    lora: true,
    base_quant: Some("q8_0"),
    checkpointing: false,
    in_memory: false,
};

const CONFIGS: &[BenchConfig] = &[
    BenchConfig {
        name: "a",
        what: "Qwen2 4L h256 i768 4H/2KV, vocab 151,936 tied, 8x256",
        preset: "bench-qwen2",
        vocab: 151_936,
        sets: &[],
        batch: 8,
        seq: 256,
        single_step: false,
        base: None,
        dropout: false,
        lora: false,
        base_quant: None,
        checkpointing: false,
        in_memory: false,
    },
    BenchConfig {
        name: "b",
        what: "the same with vocab 4,096",
        preset: "bench-qwen2",
        vocab: 4096,
        sets: &[],
        batch: 8,
        seq: 256,
        single_step: false,
        base: None,
        dropout: false,
        lora: false,
        base_quant: None,
        checkpointing: false,
        in_memory: false,
    },
    BenchConfig {
        name: "c",
        what: "nanoGPT char: vocab 6,000, emb 256, 8L, 8H, block 256, 16x256",
        preset: "nanopoet-gpt",
        vocab: 6000,
        sets: &[],
        batch: 16,
        seq: 256,
        single_step: false,
        base: None,
        dropout: false,
        lora: false,
        base_quant: None,
        checkpointing: false,
        in_memory: false,
    },
    BenchConfig {
        name: "c-dropout",
        what: "the same, training with its dropout 0.1 (as nanopoet does), both sides",
        preset: "nanopoet-gpt",
        vocab: 6000,
        sets: &[],
        batch: 16,
        seq: 256,
        single_step: false,
        base: Some("c"),
        dropout: true,
        lora: false,
        base_quant: None,
        checkpointing: false,
        in_memory: false,
    },
    BenchConfig {
        name: "d",
        what: "Qwen2.5-0.5B shape, one optimizer step, 1x256",
        preset: "qwen2.5-0.5b",
        vocab: 151_936,
        sets: &[],
        batch: 1,
        seq: 256,
        single_step: true,
        base: None,
        dropout: false,
        lora: false,
        base_quant: None,
        checkpointing: false,
        in_memory: false,
    },
    BenchConfig {
        name: "e",
        what: "Qwen2.5-0.5B shape, full fine-tuning, 1x512",
        preset: "qwen2.5-0.5b",
        vocab: 151_936,
        sets: &[],
        batch: 1,
        seq: 512,
        single_step: false,
        base: Some("d"),
        dropout: false,
        lora: false,
        base_quant: None,
        checkpointing: false,
        in_memory: false,
    },
    BenchConfig {
        name: "e-lora",
        what: "the same with LoRA r=16 on every linear layer",
        preset: "qwen2.5-0.5b",
        vocab: 151_936,
        sets: &[],
        batch: 1,
        seq: 512,
        single_step: false,
        base: Some("d"),
        dropout: false,
        lora: true,
        base_quant: None,
        checkpointing: false,
        in_memory: false,
    },
    E_LORA_Q8,
    BenchConfig {
        name: "e-lora-q8-ckpt",
        what: "the same LoRA on a q8_0 base, with activation checkpointing",
        checkpointing: true,
        ..E_LORA_Q8
    },
    BenchConfig {
        name: "e-lora-q4k",
        what: "the same LoRA on a q4_k base (q5_0 for rows of 896)",
        preset: "qwen2.5-0.5b",
        vocab: 151_936,
        sets: &[],
        batch: 1,
        seq: 512,
        single_step: false,
        base: Some("d"),
        dropout: false,
        lora: true,
        base_quant: Some("q4_k"),
        checkpointing: false,
        in_memory: false,
    },
    BenchConfig {
        name: "f",
        what: "Qwen2.5-0.5B shape, full fine-tuning, one step at 1x2048",
        preset: "qwen2.5-0.5b",
        vocab: 151_936,
        sets: &[],
        batch: 1,
        seq: 2048,
        single_step: true,
        base: Some("d"),
        dropout: false,
        lora: false,
        base_quant: None,
        checkpointing: false,
        in_memory: false,
    },
    BenchConfig {
        name: "f-ckpt",
        what: "the same with activation checkpointing",
        preset: "qwen2.5-0.5b",
        vocab: 151_936,
        sets: &[],
        batch: 1,
        seq: 2048,
        single_step: true,
        base: Some("d"),
        dropout: false,
        lora: false,
        base_quant: None,
        checkpointing: true,
        in_memory: false,
    },
    BenchConfig {
        name: "f-lora",
        what: "Qwen2.5-0.5B shape, LoRA r=16, one step at 1x2048",
        preset: "qwen2.5-0.5b",
        vocab: 151_936,
        sets: &[],
        batch: 1,
        seq: 2048,
        single_step: true,
        base: Some("d"),
        dropout: false,
        lora: true,
        base_quant: None,
        checkpointing: false,
        in_memory: false,
    },
    BenchConfig {
        name: "f-lora-ckpt",
        what: "the same with activation checkpointing",
        preset: "qwen2.5-0.5b",
        vocab: 151_936,
        sets: &[],
        batch: 1,
        seq: 2048,
        single_step: true,
        base: Some("d"),
        dropout: false,
        lora: true,
        base_quant: None,
        checkpointing: true,
        in_memory: false,
    },
    BenchConfig {
        name: "g-3b-q4k",
        what: "Qwen2.5-3B shape, LoRA r=16 on a q4_k base, one step at 1x512",
        preset: "qwen2.5-3b",
        vocab: 151_936,
        sets: &[],
        batch: 1,
        seq: 512,
        single_step: true,
        base: None,
        dropout: false,
        lora: true,
        base_quant: Some("q4_k"),
        checkpointing: false,
        in_memory: true,
    },
    BenchConfig {
        name: "h-8b-q4k",
        what: "Llama 3.1 8B shape, LoRA r=16 on a q4_k base, one step at 1x512",
        preset: "llama3.1-8b",
        vocab: 128_256,
        sets: &[],
        batch: 1,
        seq: 512,
        single_step: true,
        base: None,
        dropout: false,
        lora: true,
        base_quant: Some("q4_k"),
        checkpointing: false,
        in_memory: true,
    },
];

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    if args.ranks {
        return crate::ranks::bench();
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let sft = crate::build_sft_with(if args.cuda { &["cuda"] } else { &[] })?;
    let dtype = args.dtype.as_str();
    let dir = crate::project_root().join("target/bench");
    std::fs::create_dir_all(dir.join("models"))?;
    let python = if args.peer {
        Some(peer_python(args.python.as_deref())?)
    } else {
        None
    };
    let mut results: Vec<Value> = Vec::new();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Training throughput ({dtype}, {})\n",
        if args.cuda {
            "GPU".to_string()
        } else {
            format!("{threads} threads")
        }
    );

    let peak: Value = crate::json_output(
        Command::new(&sft)
            .args(["bench", "gemm", "--json", "--dtype", dtype, "--threads"])
            .arg(threads.to_string())
            // A GPU's peak needs products large enough to fill it.
            .args(["--n", if args.cuda { "8192" } else { "1024" }]),
    )?;
    let peak_gflops = peak["gflops"].as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        md,
        "{dtype} matmul peak ({n}^3 through candle on {dev}): {peak_gflops:.1} GFLOP/s\n",
        n = peak["n"],
        dev = peak["device"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        md,
        "| config | sft tok/s | MFU | sft peak RSS | PyTorch tok/s | PyTorch peak RSS | speed ratio | RSS ratio |\n|---|---|---|---|---|---|---|---|"
    );
    let on = Machine {
        sft: &sft,
        dir: &dir,
        threads,
        dtype,
        peak_gflops,
    };
    // `--configs=` (empty) runs none: only the data, packing and generation benches.
    for name in args.configs.iter().filter(|n| !n.is_empty()) {
        let cfg = CONFIGS.iter().find(|c| c.name == name).with_context(|| {
            let known: Vec<&str> = CONFIGS.iter().map(|c| c.name).collect();
            format!("unknown config {name:?} ({})", known.join(", "))
        })?;
        results.push(train_config(&args, &on, cfg, python.as_deref(), &mut md)?);
    }
    let _ = writeln!(
        md,
        "\nspeed ratio = sft tokens/s / PyTorch tokens/s (above 1: sft is faster); RSS ratio = sft / PyTorch (below 1: sft uses less).\n"
    );
    lora_vs_full(&results, &mut md);
    bigger_models(&results, &mut md);
    if threads > 1 && !args.cuda && !args.skip_one_thread {
        one_thread(&args, &on, &mut results, &mut md)?;
    }
    if !args.skip_data {
        data_prep(&sft, &dir, threads, &mut md, &mut results)?;
        packing(&sft, &dir, threads, &mut md, &mut results)?;
    }
    if !args.skip_generate {
        generation(&sft, &dir, threads, &mut md, &mut results)?;
    }

    let lines: String = results.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.join("results.jsonl"), lines)?;
    std::fs::write(dir.join("report.md"), &md)?;
    println!("{md}");
    eprintln!("written {}", dir.join("report.md").display());
    Ok(())
}

/// Where the training configurations run: the `sft` binary, the bench directory, the thread
/// count and dtype, and the matmul peak that MFU is measured against.
struct Machine<'a> {
    sft: &'a Path,
    dir: &'a Path,
    threads: usize,
    dtype: &'a str,
    peak_gflops: f64,
}

/// One training configuration, ours and (with `python`) the PyTorch peer's: its row of the
/// report and its result.
fn train_config(
    args: &Args,
    on: &Machine<'_>,
    cfg: &BenchConfig,
    python: Option<&Path>,
    md: &mut String,
) -> anyhow::Result<Value> {
    let device = if args.cuda { "cuda" } else { "cpu" };
    let model = on.dir.join("models").join(cfg.base());
    if !cfg.in_memory && !model.join("model.safetensors").is_file() {
        eprintln!("initialising {} ({})", model.display(), cfg.what);
        crate::init_model::write_preset(cfg.preset, cfg.vocab, cfg.sets, &model)?;
    }
    let (steps, warmup) = if cfg.single_step {
        (1, 0)
    } else {
        (args.steps, args.warmup)
    };
    eprintln!("== ({}) {} ==", cfg.name, cfg.what);
    let ours = sft_bench_train(on.sft, &model, cfg, (steps, warmup), on.threads, on.dtype)?;
    if args.cuda && ours["device"].as_str() == Some("cpu") {
        bail!("built with --cuda, but `sft` found no GPU and ran on the CPU");
    }
    eprintln!("sft:     {ours}");
    // PyTorch's peer has no quantized base, checkpointing or in-memory shapes here.
    let peer = python.filter(|_| cfg.base_quant.is_none() && !cfg.checkpointing && !cfg.in_memory);
    let theirs = match peer {
        Some(py) => {
            let v: Value = crate::json_output(
                Command::new(py)
                    .arg(crate::project_root().join("tests/data/scripts/bench_peer.py"))
                    .args(["--config", cfg.base()])
                    .args(["--batch-size", &cfg.batch.to_string()])
                    .args(["--seq-len", &cfg.seq.to_string()])
                    .args(["--steps", &steps.to_string()])
                    .args(["--warmup", &warmup.to_string()])
                    .args(["--threads", &on.threads.to_string()])
                    .args(["--device", device, "--dtype", on.dtype])
                    .args(cfg.lora.then_some("--lora"))
                    // The peer's (c) defaults to nanopoet's dropout; ours to none.
                    .args(if cfg.base() == "c" && !cfg.dropout {
                        &["--dropout", "0"][..]
                    } else {
                        &[]
                    }),
            )?;
            eprintln!("PyTorch: {v}");
            Some(v)
        }
        None => None,
    };
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let mfu = f(&ours, "gflops_per_s") / on.peak_gflops;
    let cell = |x: Option<f64>, unit: &str| x.map_or("-".into(), |x| format!("{x:.0}{unit}"));
    let ratio = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}x"));
    let (t_tok, t_rss) = match &theirs {
        Some(t) => (Some(f(t, "tokens_per_s")), Some(f(t, "peak_rss_mib"))),
        None => (None, None),
    };
    let _ = writeln!(
        md,
        "| ({}) {} | {:.0} | {:.1}% | {:.0} MiB | {} | {} | {} | {} |",
        cfg.name,
        cfg.what,
        f(&ours, "tokens_per_s"),
        100.0 * mfu,
        f(&ours, "peak_rss_mib"),
        cell(t_tok, ""),
        cell(t_rss, " MiB"),
        ratio(t_tok.map(|t| f(&ours, "tokens_per_s") / t)),
        ratio(t_rss.map(|t| f(&ours, "peak_rss_mib") / t)),
    );
    Ok(
        json!({"bench": "train", "config": cfg.name, "sft": ours, "pytorch": theirs,
        "mfu": mfu, "sgemm_peak_gflops": on.peak_gflops}),
    )
}

/// One thread against all of them, on the configurations that ran: candle's matmul threading
/// does not always pay on two cores.
fn one_thread(
    args: &Args,
    on: &Machine<'_>,
    results: &mut [Value],
    md: &mut String,
) -> anyhow::Result<()> {
    let _ = writeln!(
        md,
        "| config | sft tok/s, 1 thread | sft tok/s, {} threads | gain |\n|---|---|---|---|",
        on.threads
    );
    for r in results.iter_mut() {
        let name = r["config"].as_str().unwrap_or("").to_string();
        let cfg = CONFIGS.iter().find(|c| c.name == name);
        let Some(cfg) = cfg.filter(|c| !c.single_step) else {
            continue;
        };
        let model = on.dir.join("models").join(cfg.base());
        let one = sft_bench_train(on.sft, &model, cfg, (args.steps, args.warmup), 1, on.dtype)?;
        let (t1, tn) = (
            one["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            r["sft"]["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
        );
        let _ = writeln!(md, "| ({name}) | {t1:.0} | {tn:.0} | {:.2}x |", tn / t1);
        r["sft_1_thread"] = one;
    }
    md.push('\n');
    Ok(())
}

/// LoRA against full fine-tuning of the same model and batch (configurations `e-lora` and
/// `e`), on each side that ran both: LoRA is meant to take at most 40% of full fine-tuning's
/// peak RSS and give at least 1.4x its tokens/s.
fn lora_vs_full(results: &[Value], md: &mut String) {
    let find = |name: &str| results.iter().find(|r| r["config"] == name);
    let (Some(full), Some(lora)) = (find("e"), find("e-lora")) else {
        return;
    };
    let _ = writeln!(
        md,
        "| LoRA r=16 vs full fine-tuning (e-lora / e) | tokens/s | peak RSS |\n|---|---|---|"
    );
    for side in ["sft", "pytorch"] {
        let f = |v: &Value, k: &str| v[side][k].as_f64();
        if let (Some(ft), Some(lt), Some(fr), Some(lr)) = (
            f(full, "tokens_per_s"),
            f(lora, "tokens_per_s"),
            f(full, "peak_rss_mib"),
            f(lora, "peak_rss_mib"),
        ) {
            let _ = writeln!(
                md,
                "| {side} | {:.2}x ({lt:.1} vs {ft:.1}) | {:.0}% ({lr:.0} vs {fr:.0} MiB) |",
                lt / ft,
                100.0 * lr / fr
            );
        }
    }
    md.push('\n');
}

/// What a quantized base and activation checkpointing cost and save, against the same step
/// without them (configurations `e-lora-q8`/`e-lora-q4k` against `e-lora`, `f-ckpt` against
/// `f`, `f-lora-ckpt` against `f-lora`), and the real shapes' LoRA steps on a q4_k base.
fn bigger_models(results: &[Value], md: &mut String) {
    let find = |name: &str| results.iter().find(|r| r["config"] == name);
    let f = |r: &Value, k: &str| r["sft"][k].as_f64().unwrap_or(f64::NAN);
    let pairs = [
        ("e-lora-q8", "e-lora", "q8_0 base vs f32 base (LoRA, 1x512)"),
        (
            "e-lora-q8-ckpt",
            "e-lora",
            "q8_0 base and checkpointing vs f32 base (LoRA, 1x512)",
        ),
        (
            "e-lora-q4k",
            "e-lora",
            "q4_k base vs f32 base (LoRA, 1x512)",
        ),
        (
            "f-ckpt",
            "f",
            "checkpointing vs not (full fine-tuning, 1x2048)",
        ),
        (
            "f-lora-ckpt",
            "f-lora",
            "checkpointing vs not (LoRA, 1x2048)",
        ),
    ];
    let rows: Vec<String> = pairs
        .iter()
        .filter_map(|(a, b, what)| {
            let (a, b) = (find(a)?, find(b)?);
            Some(format!(
                "| {what} | {:.2}x ({:.1} vs {:.1} tok/s) | {:.0}% ({:.0} vs {:.0} MiB) |",
                f(a, "tokens_per_s") / f(b, "tokens_per_s"),
                f(a, "tokens_per_s"),
                f(b, "tokens_per_s"),
                100.0 * f(a, "peak_rss_mib") / f(b, "peak_rss_mib"),
                f(a, "peak_rss_mib"),
                f(b, "peak_rss_mib"),
            ))
        })
        .collect();
    if !rows.is_empty() {
        let _ = writeln!(md, "| sft | tokens/s | peak RSS |\n|---|---|---|");
        for r in rows {
            let _ = writeln!(md, "{r}");
        }
        md.push('\n');
    }
    let big: Vec<&Value> = ["g-3b-q4k", "h-8b-q4k"]
        .iter()
        .filter_map(|n| find(n))
        .collect();
    if !big.is_empty() {
        let _ = writeln!(
            md,
            "| shape (LoRA r=16, q4_k base, 1x512) | parameters | tokens/s | peak RSS |\n|---|---|---|---|"
        );
        for r in big {
            let _ = writeln!(
                md,
                "| {} | {:.2}B | {:.1} | {:.0} MiB |",
                r["config"].as_str().unwrap_or("?"),
                f(r, "params") / 1e9,
                f(r, "tokens_per_s"),
                f(r, "peak_rss_mib"),
            );
        }
        md.push('\n');
    }
}

/// `sft bench train --json` on one configuration.
fn sft_bench_train(
    sft: &Path,
    model: &Path,
    cfg: &BenchConfig,
    (steps, warmup): (usize, usize),
    threads: usize,
    dtype: &str,
) -> anyhow::Result<Value> {
    let weights = match cfg.in_memory {
        true => vec![
            "--preset".into(),
            cfg.preset.into(),
            "--vocab-size".into(),
            cfg.vocab.to_string().into(),
        ],
        false => vec!["--model".into(), model.as_os_str().to_owned()],
    };
    crate::json_output(
        Command::new(sft)
            .args(["bench", "train", "--json", "--dtype", dtype])
            .args(&weights)
            .args(["--batch-size", &cfg.batch.to_string()])
            .args(["--seq-len", &cfg.seq.to_string()])
            .args(["--steps", &steps.to_string()])
            .args(["--warmup", &warmup.to_string()])
            .args(["--threads", &threads.to_string()])
            .args(cfg.dropout.then_some("--dropout"))
            .args(cfg.lora.then_some("--lora"))
            .args(cfg.base_quant.iter().flat_map(|q| ["--base-quant", q]))
            .args(cfg.checkpointing.then_some("--gradient-checkpointing")),
    )
}

/// `sft render --report` over a large messages file with the Qwen tokenizer, timed from outside
/// (JSON parsing, template rendering, tokenisation, masks, report), 1 and `threads` threads.
fn data_prep(
    sft: &Path,
    dir: &Path,
    threads: usize,
    md: &mut String,
    results: &mut Vec<Value>,
) -> anyhow::Result<()> {
    let data = dir.join("data");
    let file = data.join("instructions-train.jsonl");
    if !file.is_file() {
        sft_tests::tasks::write_splits(&data, 1, [200_000, 10, 10])?;
    }
    let _ = writeln!(
        md,
        "## Data preparation (`sft render --report`, Qwen3 tokenizer and template, {})\n\n| threads | records/s | tokens/s | tokens/s per thread |\n|---|---|---|---|",
        file.display()
    );
    let mut counts = vec![1];
    if threads > 1 {
        counts.push(threads);
    }
    for n in counts {
        let t = Instant::now();
        let report: Value = crate::json_output(
            Command::new(sft)
                .env("RAYON_NUM_THREADS", n.to_string())
                .args(["render", "--report", "--json", "--tokenizer"])
                .arg(crate::project_root().join("tests/data/qwen3-tokenizer"))
                .arg("--data")
                .arg(&file),
        )?;
        let s = t.elapsed().as_secs_f64();
        let records = report["kept"].as_f64().unwrap_or(0.0);
        let tokens = report["total_tokens"].as_f64().unwrap_or(0.0);
        let _ = writeln!(
            md,
            "| {n} | {:.0} | {:.0} | {:.0} |",
            records / s,
            tokens / s,
            tokens / s / n as f64
        );
        results.push(
            json!({"bench": "data", "threads": n, "seconds": s, "records": records,
            "tokens": tokens}),
        );
    }
    md.push('\n');
    Ok(())
}

/// The packing bench's models, as `model.init` over `configs/nanopoet-pretrain.toml`'s preset
/// (`block_size` is each dataset's `max_len`): nanopoet's own GPT (emb 256, 8 layers, 8 heads,
/// dropout 0.1), and a 4-layer 128-wide one, whose output layer (a 128 x ~5,000 product at every
/// target) costs about as much as its whole body at a position. A padding position pays only the
/// body's dense layers and norms (the output layer, the loss and attention skip it), so the
/// larger the output layer's share, the less packing saves: the small model shows that end.
const PACKING_MODELS: [(&str, &str); 2] = [
    ("nanopoet (8L 256)", ""),
    ("4L 128", "n_layer = 4, n_embd = 128, n_head = 4, "),
];

/// One dataset of the packing bench.
struct PackingData {
    name: &'static str,
    file: PathBuf,
    /// `data.max_len` and the model's `block_size`.
    len: usize,
}

/// Useful (target) tokens per second of real training runs, padded rows (one record each, padded
/// to the longest of the batch) against packed rows of `max_len`, on two datasets: the bundled
/// poems as they are (8 to 178 characters; about 40% of a padded batch of 8 is padding), and
/// poem sets, records of 1 to 8 consecutive poems (see [`poem_sets`]), whose long tail is closer
/// to chat SFT data; and on two models (see [`PACKING_MODELS`]). Same optimizer and batch size (8
/// rows) for both modes; 24 steps each, the first 4 untimed. The report splits the ratio into
/// what packing can gain (the padded rows' positions per token over the packed rows') and what a
/// position costs packed against padded, both from the runs' own metrics.
fn packing(
    sft: &Path,
    dir: &Path,
    threads: usize,
    md: &mut String,
    results: &mut Vec<Value>,
) -> anyhow::Result<()> {
    let root = crate::project_root();
    let sets = dir.join("data/poem-sets.jsonl");
    poem_sets(&root.join("tests/data/poems/poems-small.jsonl"), &sets)?;
    let datasets = [
        PackingData {
            name: "poems",
            file: root.join("tests/data/poems/poems-small.jsonl"),
            len: 256,
        },
        PackingData {
            name: "poem sets",
            file: sets,
            len: 512,
        },
    ];
    let _ = writeln!(
        md,
        "## Packing (useful tokens/s, `configs/nanopoet-pretrain.toml`, batch 8)\n\n| model | data | max_len | padded target tokens/s | packed target tokens/s | ratio | positions per token, padded / packed | cost per position, packed / padded |\n|---|---|---|---|---|---|---|---|"
    );
    for (model, init) in PACKING_MODELS {
        for data in &datasets {
            // Padded, packed, padded, packed: a slow minute of the machine then lowers one run of
            // each mode, not the ratio; each mode's best run counts.
            let mut best = [PackingRate::default(), PackingRate::default()];
            for round in 0..PACKING_ROUNDS {
                for (mode, packed) in [false, true].into_iter().enumerate() {
                    let r = packing_run(sft, dir, init, data, packed, threads)?;
                    eprintln!(
                    "packing, {model}, {}, {}, round {round}: {:.0} target tokens/s, {:.0} positions/s",
                    data.name,
                    if packed { "packed" } else { "padded" },
                    r.targets_per_s,
                    r.positions_per_s
                );
                    if r.targets_per_s > best[mode].targets_per_s {
                        best[mode] = r;
                    }
                }
            }
            let [padded, packed] = best;
            // The ratio is (padding removed) x (relative cost of a position): at equal cost per
            // position, packing gains exactly the padded rows' positions per token.
            let fill = padded.positions_per_token / packed.positions_per_token;
            let cost = padded.positions_per_s / packed.positions_per_s;
            let _ = writeln!(
                md,
                "| {model} | {} | {} | {:.0} | {:.0} | {:.2}x | {fill:.2}x | {cost:.2}x |",
                data.name,
                data.len,
                padded.targets_per_s,
                packed.targets_per_s,
                packed.targets_per_s / padded.targets_per_s
            );
            results.push(
                json!({"bench": "packing", "model": model, "data": data.name, "max_len": data.len,
            "padded_target_tokens_per_s": padded.targets_per_s,
            "packed_target_tokens_per_s": packed.targets_per_s,
            "padded_positions_per_token": padded.positions_per_token,
            "packed_positions_per_token": packed.positions_per_token,
            "padded_positions_per_s": padded.positions_per_s,
            "packed_positions_per_s": packed.positions_per_s}),
            );
        }
    }
    md.push('\n');
    Ok(())
}

/// Alternating rounds of the packing bench (each mode runs this many times).
const PACKING_ROUNDS: usize = 2;

/// One run of the packing bench, over its timed steps.
#[derive(Default)]
struct PackingRate {
    targets_per_s: f64,
    /// Positions the model ran (padding included) per second.
    positions_per_s: f64,
    /// Positions per non-padding token: 1 for rows without padding.
    positions_per_token: f64,
}

/// One short `sft train` run, padded or packed.
fn packing_run(
    sft: &Path,
    dir: &Path,
    init: &str,
    data: &PackingData,
    packed: bool,
    threads: usize,
) -> anyhow::Result<PackingRate> {
    let out = dir.join(format!("packing-{}-{packed}", data.name.replace(' ', "-")));
    let _ = std::fs::remove_dir_all(&out);
    crate::json_output(
        Command::new(sft)
            .args([
                "train",
                "--json",
                "--config",
                "configs/nanopoet-pretrain.toml",
            ])
            .arg("--set")
            .arg(format!("model.init={{{init}block_size = {}}}", data.len))
            .arg("--set")
            .arg(format!(
                "data.train=[{:?}]",
                data.file.display().to_string()
            ))
            .args(["--set", &format!("data.max_len={}", data.len)])
            .args(["--set", &format!("data.packing={packed}")])
            .args(["--set", "train.batch_size=8", "--set", "train.max_steps=24"])
            .args(["--set", &format!("train.threads={threads}")])
            .args(["--set", "run.log_every=1", "--set", "run.eval_every=100000"])
            .args(["--set", "run.save_every=100000"])
            .args(["--set", &format!("run.out_dir={}", out.display())]),
    )?;
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let steps: Vec<Value> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .collect();
    let timed = &steps[4..];
    // Steps after the first timed one: its `elapsed_s` is where the clock starts.
    let sum = |key: &str| -> f64 { timed[1..].iter().filter_map(|v| v[key].as_f64()).sum() };
    let secs = timed
        .last()
        .and_then(|v| v["elapsed_s"].as_f64())
        .unwrap_or(0.0)
        - timed[0]["elapsed_s"].as_f64().unwrap_or(0.0);
    Ok(PackingRate {
        targets_per_s: sum("target_tokens") / secs,
        positions_per_s: sum("positions") / secs,
        positions_per_token: sum("positions") / sum("tokens"),
    })
}

/// Poem records regrouped into sets: each record holds 1 to 8 consecutive poems (one more with
/// probability 0.6 each time: 2.5 on average), joined by newlines and capped at 500 characters,
/// with the first poem's metadata; as many records as poems, from a fixed seed. Lengths run from
/// about 10 to 500 characters, a long tail like chat SFT data, where padding to the longest of a
/// batch wastes most of it.
fn poem_sets(poems: &Path, out: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(poems).with_context(|| format!("{}", poems.display()))?;
    let records: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}", poems.display()))?;
    // xorshift64*: a fixed, dependency-free stream; the sets only need to be reproducible.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut uniform = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    };
    let content = |i: usize| records[i % records.len()]["content"].as_str().unwrap_or("");
    let mut lines = String::new();
    for (i, record) in records.iter().enumerate() {
        let mut set = content(i).to_string();
        let mut k = 1;
        while k < 8 && uniform() < 0.6 {
            let next = content(i + k);
            if set.chars().count() + 1 + next.chars().count() > 500 {
                break;
            }
            set.push('\n');
            set.push_str(next);
            k += 1;
        }
        let mut r = record.clone();
        r["content"] = Value::String(set);
        lines.push_str(&r.to_string());
        lines.push('\n');
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, lines)?;
    Ok(())
}

/// Greedy decoding with the KV cache on configurations (a), (b) and (c) (those initialised).
fn generation(
    sft: &Path,
    dir: &Path,
    threads: usize,
    md: &mut String,
    results: &mut Vec<Value>,
) -> anyhow::Result<()> {
    let _ = writeln!(
        md,
        "## Generation (greedy, KV cache, batch 1, 64-token prompt, 128 new tokens, {threads} threads)\n\n| model | tokens/s | prefill |\n|---|---|---|"
    );
    for name in ["a", "b", "c"] {
        let model = dir.join("models").join(name);
        if !model.join("model.safetensors").is_file() {
            continue;
        }
        let r: Value = crate::json_output(
            Command::new(sft)
                .args(["bench", "generate", "--json", "--model"])
                .arg(&model)
                .args(["--threads", &threads.to_string()]),
        )?;
        let _ = writeln!(
            md,
            "| ({name}) | {:.1} | {:.3} s |",
            r["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            r["prefill_s"].as_f64().unwrap_or(f64::NAN)
        );
        results.push(json!({"bench": "generate", "config": name, "sft": r}));
    }
    md.push('\n');
    Ok(())
}

/// A Python with torch, transformers and peft (the LoRA configurations' peer, and
/// `golden_lora.py`): `--python`, else `target/bench-venv` (created or completed with pip from
/// PyPI the first time).
fn peer_python(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    venv_python(given, &["torch", "transformers", "peft"])
}

/// `given`, else the Python of `target/bench-venv` with `packages` importable (the venv created,
/// or completed with pip from PyPI, the first time).
pub(crate) fn venv_python(given: Option<&Path>, packages: &[&str]) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_owned());
    }
    let venv = crate::project_root().join("target/bench-venv");
    let python = venv.join("bin/python");
    let import = format!("import {}", packages.join(", "));
    let ok = |py: &Path| {
        Command::new(py)
            .args(["-c", &import])
            .status()
            .is_ok_and(|s| s.success())
    };
    if python.is_file() && ok(&python) {
        return Ok(python);
    }
    let list = packages.join(", ");
    eprintln!("installing {list} into {} (once)", venv.display());
    if !python.is_file() {
        let status = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()?;
        if !status.success() {
            bail!("python3 -m venv {} failed", venv.display());
        }
    }
    let status = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet"])
        .args(packages)
        .status()?;
    if !status.success() || !ok(&python) {
        bail!("installing {list} into {} failed", venv.display());
    }
    Ok(python)
}
