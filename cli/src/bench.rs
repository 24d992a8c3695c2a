//! `sft bench train (--model DIR | --preset NAME --vocab-size V) [--batch-size B] [--seq-len S]
//! [--steps N] [--warmup W] [--lora [--base-quant TYPE]] [--gradient-checkpointing] [--json]`.
//!
//! Contract relied on by scripts: with `--json`, one object
//! `{"tokens_per_s":x,"step_s_median":y,"peak_rss_mib":z,"forward_s":..,"backward_s":..,"optimizer_s":..}`
//! (plus `params`, `batch_size`, `seq_len`, `threads`, `flops_per_step`, `gflops_per_s`,
//! `lora`, `trainable_params`, `base_quant`, `gradient_checkpointing`, `master_weights`).
//! Full training steps on random ids: forward with the masked loss, backward, clipping, AdamW.
//! `--preset` draws random weights of a preset's shape in memory (no checkpoint on disk), a
//! quantized base's tensors quantized as they are drawn.
//!
//! `sft bench generate --model DIR [--prompt-len P] [--new-tokens N] [--json]`: greedy decoding
//! with the KV cache, `{"tokens_per_s":..,"prefill_s":..,"prompt_len":..,"new_tokens":..}`.
//!
//! `sft bench gemm [--n N] [--dtype D] [--json]`: candle's matmul rate on the device,
//! `{"gflops":..,"n":..,"dtype":..,"device":..}`, the peak that model FLOPs utilisation is
//! measured against.
//!
//! `sft bench allreduce --preset NAME --vocab-size V [--rounds N] [--json]`, launched by
//! `mpirun -np N`: the time to sum the gradients of a preset's shape over the ranks, as a
//! data-parallel step does (`sft::dist::sum_step`'s buckets), on rank 0
//! `{"ranks":..,"elements":..,"bytes":..,"seconds_median":..,"seconds":[..],"transport":..}`.
//! Built without the `mpi` feature, or started alone, it is one rank and sums nothing.
//!
//! `train` and `gemm` run on the first CUDA GPU when `sft` is built with `--features cuda` and
//! one is present, else on the CPU; `--dtype bf16` is for the GPU (on the CPU, f32 is the fast
//! path: half precision falls back to candle's composed ops).

use std::path::PathBuf;

use candle_core::DType;
use sft::bench::{bench_generate, bench_train, matmul_peak_gflops, BenchOptions};
use sft::config::{dtype_name, parse_dtype};
use sft::setup::device_name;
use sft_model::{Model, ModelConfig, Quantize};

use crate::common::Threads;

#[derive(clap::Subcommand)]
pub(crate) enum Command {
    /// Time full training steps of a checkpoint on random token ids.
    Train(TrainArgs),
    /// Time greedy decoding with the KV cache.
    Generate(GenerateArgs),
    /// Measure the matrix-multiply peak.
    Gemm(GemmArgs),
    /// Time summing a model's gradients over the ranks of an `mpirun` job.
    Allreduce(AllreduceArgs),
}

#[derive(clap::Args)]
pub(crate) struct AllreduceArgs {
    /// The gradients' shapes: a preset's parameters (`qwen2.5-0.5b`; see
    /// `cargo xtask init-model`).
    #[arg(long)]
    preset: String,
    /// The vocabulary of `--preset` (Qwen2.5: 151936).
    #[arg(long)]
    vocab_size: usize,
    /// Timed sums (after one untimed one).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[command(flatten)]
    threads: Threads,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub(crate) struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    #[command(flatten)]
    threads: Threads,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub(crate) struct GemmArgs {
    /// Matrix side.
    #[arg(long, default_value_t = 1024)]
    n: usize,
    /// Matrix dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
    #[command(flatten)]
    threads: Threads,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("weights").required(true).args(["model", "preset"])))]
pub(crate) struct TrainArgs {
    /// A checkpoint directory (`cargo xtask init-model` makes one of any shape) or a GGUF file.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Random weights of a preset's shape (`qwen2.5-0.5b`, `llama3.1-8b`, ...; see
    /// `cargo xtask init-model`), drawn in memory.
    #[arg(long, requires = "vocab_size")]
    preset: Option<String>,
    /// The vocabulary of `--preset` (Qwen2.5: 151936, Llama 3: 128256).
    #[arg(long)]
    vocab_size: Option<usize>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Share of positions that are targets.
    #[arg(long, default_value_t = 1.0)]
    target_fraction: f64,
    /// Train with the model's dropout (nanopoet's GPT: 0.1), as `sft train` does; without this
    /// flag the steps run without dropout.
    #[arg(long)]
    dropout: bool,
    /// Weights and activations: f32, bf16 or f16 (the optimizer state stays f32).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
    #[command(flatten)]
    threads: Threads,
    /// Train LoRA adapters on every linear layer (alpha 2r, dropout 0.05: the `[lora]`
    /// defaults) instead of every weight.
    #[arg(long)]
    lora: bool,
    /// The adapters' rank with `--lora`.
    #[arg(long, default_value_t = 16)]
    lora_r: usize,
    /// The adapters' dropout with `--lora`.
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f64,
    /// The modules `--lora` adapts (`all-linear`, or names such as `q_proj,v_proj`).
    #[arg(long, value_delimiter = ',', default_value = "all-linear")]
    lora_targets: Vec<String>,
    /// With `--lora`: keep the frozen base as ggml blocks of this type (`q8_0`, `q4_k`,
    /// `q6_k`, `q4_0`), as `[lora] base_quant` does.
    #[arg(long, requires = "lora")]
    base_quant: Option<String>,
    /// Recompute each layer in backward instead of keeping its activations
    /// (`train.gradient_checkpointing`).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// With `--dtype bf16|f16`: update the weights in place instead of through f32 master
    /// weights (`optim.master_weights = false`).
    #[arg(long)]
    no_master_weights: bool,
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Train(args) => crate::on_pool(args.threads.threads, || train(args)),
        Command::Generate(args) => crate::on_pool(args.threads.threads, || generate(args)),
        Command::Gemm(args) => crate::on_pool(args.threads.threads, || gemm(args)),
        Command::Allreduce(args) => crate::on_pool(args.threads.threads, || allreduce(args)),
    }
}

/// Sums zero gradients of the preset's shapes over the ranks `rounds + 1` times and reports the
/// timed rounds on rank 0. The values do not change the time: an all-reduce moves and adds
/// every element whatever it holds.
fn allreduce(args: AllreduceArgs) -> anyhow::Result<()> {
    let mut json = sft_model::presets::preset(&args.preset).ok_or_else(|| {
        anyhow::anyhow!(
            "--preset: unknown preset {:?} (known: {})",
            args.preset,
            sft_model::presets::NAMES.join(", ")
        )
    })?;
    json["vocab_size"] = args.vocab_size.into();
    let config = ModelConfig::from_json_str(&json.to_string())
        .map_err(|e| anyhow::anyhow!("--preset {}: {e}", args.preset))?;
    let shapes = config.param_shapes();
    crate::ranks::run(|coll| {
        // On the device the collective sums on (a GPU's with NCCL), as a training step's are.
        let device = coll.device().unwrap_or(candle_core::Device::Cpu);
        let mut grads = shapes
            .iter()
            .map(|s| candle_core::Tensor::zeros(s.as_slice(), DType::F32, &device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let elements: usize = grads.iter().map(|g| g.elem_count()).sum();
        let mut seconds = vec![];
        for round in 0..=args.rounds {
            let t0 = std::time::Instant::now();
            coll.sum_tensors(&mut grads)?;
            if round > 0 {
                seconds.push(t0.elapsed().as_secs_f64());
            }
        }
        if coll.rank() != 0 {
            return Ok(());
        }
        let median = sft::bench::median(&mut seconds.clone());
        let bytes = 4 * elements;
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "ranks": coll.ranks(), "elements": elements, "bytes": bytes,
                    "seconds_median": median, "seconds": seconds, "transport": coll.describe(),
                })
            );
        } else {
            println!(
                "{:.3} s to sum {:.1} MB of f32 gradients ({} tensors of {}) over {}",
                median,
                bytes as f64 / 1e6,
                grads.len(),
                args.preset,
                coll.describe()
            );
        }
        Ok(())
    })
}

/// The benchmark's model: a checkpoint, or random weights of a preset's shape; with
/// `--base-quant`, LoRA's frozen matrices kept as blocks (quantized as they are read or drawn).
fn bench_model(args: &TrainArgs, lora: Option<&sft_model::LoraConfig>) -> anyhow::Result<Model> {
    let device = sft::setup::device()?;
    let (config, dir) = match (&args.model, &args.preset) {
        (Some(dir), _) => {
            let dir = sft::hub::resolve_model(dir)?;
            (sft::gguf::model_config(&dir)?, Some(dir))
        }
        (None, Some(name)) => {
            let mut json = sft_model::presets::preset(name).ok_or_else(|| {
                anyhow::anyhow!(
                    "--preset: unknown preset {name:?} (known: {})",
                    sft_model::presets::NAMES.join(", ")
                )
            })?;
            json["vocab_size"] = args.vocab_size.unwrap_or(0).into();
            let config = ModelConfig::from_json_str(&json.to_string())
                .map_err(|e| anyhow::anyhow!("--preset {name}: {e}"))?;
            (config, None)
        }
        (None, None) => anyhow::bail!("one of --model and --preset is required"),
    };
    let quantize = match (lora, args.base_quant.as_deref()) {
        (Some(lora), Some(q)) => Some(Quantize {
            dtype: sft_model::quant::quant_type(q)
                .ok_or_else(|| anyhow::anyhow!("--base-quant: unknown type {q:?}"))?,
            names: sft_model::frozen_matrices(&config, lora).map_err(anyhow::Error::msg)?,
        }),
        _ => None,
    };
    Ok(match (dir, quantize) {
        (Some(dir), q) => sft::gguf::load_model_with(&dir, args.dtype, &device, q.as_ref())?,
        (None, Some(q)) => Model::init_with(&config, 0, args.dtype, &device, &q)?,
        (None, None) => Model::init(&config, 0, args.dtype, &device)?,
    })
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let model = sft::gguf::load_model(
        &sft::hub::resolve_model(&args.model)?,
        DType::F32,
        &sft::setup::device()?,
    )?;
    let max = model.config().max_positions();
    if args.prompt_len + args.new_tokens > max {
        anyhow::bail!(
            "--prompt-len + --new-tokens = {} exceeds the model's context {max}",
            args.prompt_len + args.new_tokens
        );
    }
    // One untimed run warms the allocator and caches.
    bench_generate(&model, args.prompt_len, 4, 1)?;
    let r = bench_generate(&model, args.prompt_len, args.new_tokens, 0)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{:.1} tokens/s greedy with KV cache ({} new tokens after a {}-token prompt; prefill {:.3} s, {} threads)",
            r.tokens_per_s, r.new_tokens, r.prompt_len, r.prefill_s, r.threads
        );
    }
    Ok(())
}

fn gemm(args: GemmArgs) -> anyhow::Result<()> {
    let dev = sft::setup::device()?;
    let gflops = matmul_peak_gflops(args.n, 5, args.dtype, &dev)?;
    let (dtype, device) = (dtype_name(args.dtype), device_name(&dev));
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "gflops": gflops, "n": args.n, "dtype": dtype, "device": device })
        );
    } else {
        println!(
            "{gflops:.1} GFLOP/s {dtype} matmul on {device} ({0}x{0})",
            args.n
        );
    }
    Ok(())
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    if args.steps == 0 || args.batch_size == 0 || args.seq_len < 2 {
        anyhow::bail!("--steps and --batch-size must be positive and --seq-len at least 2");
    }
    let lora = args.lora.then(|| sft_model::LoraConfig {
        r: args.lora_r,
        alpha: 2.0 * args.lora_r as f64,
        dropout: args.lora_dropout,
        target_modules: args.lora_targets.clone(),
        base_quant: args.base_quant.clone(),
        ..sft_model::LoraConfig::default()
    });
    let mut model = bench_model(&args, lora.as_ref())?;
    if args.seq_len > model.config().max_positions() {
        anyhow::bail!(
            "--seq-len {} exceeds the model's context {}",
            args.seq_len,
            model.config().max_positions()
        );
    }
    if let Some(lora) = &lora {
        model = model.with_lora(lora, 0)?;
    }
    model.set_checkpointing(args.gradient_checkpointing);
    let r = bench_train(
        &model,
        &BenchOptions {
            batch_size: args.batch_size,
            seq_len: args.seq_len,
            steps: args.steps,
            warmup: args.warmup,
            target_fraction: args.target_fraction,
            dropout: args.dropout,
            master_weights: !args.no_master_weights,
            seed: 0,
        },
    )?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{:.1} tokens/s  step {:.3} s (forward+loss {:.3}, backward {:.3}, optimizer {:.3})  {:.1} GFLOP/s  peak RSS {:.0} MiB  ({} params{}, {}x{}, {} {}, {} threads)",
            r.tokens_per_s, r.step_s_median, r.forward_s, r.backward_s, r.optimizer_s, r.gflops_per_s,
            r.peak_rss_mib, r.params,
            if r.lora { format!(", LoRA: {} trainable{}", r.trainable_params, r.base_quant.as_ref().map_or(String::new(), |q| format!(", base {q}"))) } else { String::new() },
            r.batch_size, r.seq_len, r.dtype, r.device, r.threads
        );
    }
    Ok(())
}
