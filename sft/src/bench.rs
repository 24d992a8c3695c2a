//! Training-step benchmark: full steps (forward + masked loss, backward, clip, AdamW) on random
//! ids, timed by phase. The same code path as training, so what it measures is what users get.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::Serialize;
use sft_data::{collate, Rendered};
use sft_model::Model;

use crate::error::Result;
use crate::optim::{AdamW, OptimConfig};
use crate::step::{backward, forward_loss, GradAccumulator};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub batch_size: usize,
    pub seq_len: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps first (allocator and cache warm-up).
    pub warmup: usize,
    /// Fraction of positions that are targets (1.0: every position, as in pretraining).
    pub target_fraction: f64,
    /// Train with the model's configured dropout (a fresh seed per step), as training does;
    /// off, steps run without it.
    pub dropout: bool,
    /// Half-precision weights updated through f32 master weights (`optim.master_weights`).
    pub master_weights: bool,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub tokens_per_s: f64,
    pub step_s_median: f64,
    pub peak_rss_mib: f64,
    /// Medians per phase: forward includes the masked loss through the output layer.
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    /// Every scalar of the model (the frozen base included).
    pub params: usize,
    /// The scalars that train (all of them without LoRA).
    pub trainable_params: usize,
    /// Whether LoRA adapters trained on a frozen base.
    pub lora: bool,
    pub batch_size: usize,
    pub seq_len: usize,
    pub threads: usize,
    /// Model FLOPs per step: 6 * params * tokens plus attention (6 * layers * seq * hidden per
    /// token, causal half of it counted); with LoRA, a frozen weight counts 4 (its forward and
    /// its input's gradient; no weight gradient).
    pub flops_per_step: f64,
    pub gflops_per_s: f64,
    /// Where the step ran (`cpu`, `cuda:0`) and in which dtype (`f32`, `bf16`).
    pub device: String,
    pub dtype: String,
    /// The dropout probability the steps ran with (0 without `dropout`).
    pub dropout: f64,
    /// A quantized base: its tensors per ggml type.
    pub base_quant: Option<String>,
    /// Activation checkpointing.
    pub gradient_checkpointing: bool,
    /// Half-precision weights updated through f32 master weights.
    pub master_weights: bool,
}

/// Runs the benchmark on `model` (its weights change: it trains).
pub fn bench_train(model: &Model, opts: &BenchOptions) -> Result<BenchResult> {
    let vocab = model.config().vocab_size() as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    let mut opt = AdamW::new(
        model.params(),
        &OptimConfig {
            lr: 1e-5,
            master_weights: opts.master_weights,
            ..OptimConfig::default()
        },
    )?;
    let (mut fwd, mut bwd, mut optim, mut total) = (vec![], vec![], vec![], vec![]);
    let mut acc = GradAccumulator::new(model.params().len());
    // A GPU queues kernels and returns: each phase ends when the device has done its work.
    let dev = model.device();
    for step in 0..opts.warmup + opts.steps {
        let samples: Vec<Rendered> = (0..opts.batch_size)
            .map(|_| {
                let ids = (0..opts.seq_len)
                    .map(|_| rng.random_range(0..vocab))
                    .collect();
                let mask = (0..opts.seq_len)
                    .map(|i| i > 0 && rng.random_bool(opts.target_fraction))
                    .collect();
                Rendered::new(ids, mask).expect("equal lengths")
            })
            .collect();
        let rows: Vec<Vec<&Rendered>> = samples.iter().map(|s| vec![s]).collect();
        let batch = collate(&rows, 0, None);
        dev.synchronize()?;
        let t0 = Instant::now();
        // LoRA's dropout is on whenever training is, as in `sft train`.
        let training = opts.dropout || model.lora().is_some();
        let dropout_seed = training.then(|| opts.seed.wrapping_add(step as u64));
        let f = forward_loss(model, &batch, 1.0 / batch.n_targets as f64, dropout_seed)?
            .expect("the benchmark batch has targets");
        dev.synchronize()?;
        let t1 = Instant::now();
        backward(model, f, &mut acc)?;
        dev.synchronize()?;
        let t2 = Instant::now();
        opt.step(&acc.take(), 1e-5)?;
        dev.synchronize()?;
        let t3 = Instant::now();
        if step >= opts.warmup {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            optim.push((t3 - t2).as_secs_f64());
            total.push((t3 - t0).as_secs_f64());
        }
    }
    let trainable: usize = model.params().iter().map(|(_, v)| v.elem_count()).sum();
    let frozen = model.frozen_count();
    let tokens = (opts.batch_size * opts.seq_len) as f64;
    let cfg = model.config();
    let attention = 6.0 * cfg.num_layers() as f64 * opts.seq_len as f64 * cfg.hidden_size() as f64;
    let flops = (6.0 * trainable as f64 + 4.0 * frozen as f64 + attention) * tokens;
    let step = median(&mut total);
    Ok(BenchResult {
        tokens_per_s: tokens / step,
        step_s_median: step,
        peak_rss_mib: peak_rss_mib(),
        forward_s: median(&mut fwd),
        backward_s: median(&mut bwd),
        optimizer_s: median(&mut optim),
        params: trainable + frozen,
        trainable_params: trainable,
        lora: model.lora().is_some(),
        batch_size: opts.batch_size,
        seq_len: opts.seq_len,
        threads: candle_core::utils::get_num_threads(),
        flops_per_step: flops,
        gflops_per_s: flops / step / 1e9,
        device: crate::setup::device_name(dev),
        dtype: crate::config::dtype_name(model.dtype()),
        dropout: match (model.lora(), opts.dropout) {
            (Some(l), _) => l.dropout,
            (None, true) => cfg.dropout(),
            (None, false) => 0.0,
        },
        base_quant: crate::setup::quantized_summary(model),
        gradient_checkpointing: model.checkpointing(),
        master_weights: opts.master_weights
            && matches!(
                model.dtype(),
                candle_core::DType::BF16 | candle_core::DType::F16
            ),
    })
}

/// The middle value (the upper one of an even count), sorting `v`; NaN for none.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The process's peak resident memory (`VmHWM`), 0 where `/proc` is not there.
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateBenchResult {
    /// New tokens per second after the prompt (greedy, KV cache, batch 1).
    pub tokens_per_s: f64,
    /// Time to process the prompt and produce the first new token.
    pub prefill_s: f64,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub threads: usize,
}

/// Greedy decoding of `new_tokens` tokens after a random prompt of `prompt_len` ids, with the
/// KV cache: what `sft generate` and `sft chat` do per token.
pub fn bench_generate(
    model: &Model,
    prompt_len: usize,
    new_tokens: usize,
    seed: u64,
) -> Result<GenerateBenchResult> {
    use sft_model::generate::{generate_streaming, SamplingParams};
    let vocab = model.config().vocab_size() as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let prompt: Vec<u32> = (0..prompt_len.max(1))
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let params = SamplingParams {
        max_new_tokens: new_tokens.max(2),
        temperature: 0.0,
        top_k: None,
        top_p: None,
        repetition_penalty: 1.0,
        stop_ids: vec![],
        seed,
    };
    let t0 = Instant::now();
    let mut first: Option<Instant> = None;
    let mut n = 0usize;
    generate_streaming(model, &prompt, &params, &mut |_| {
        n += 1;
        first.get_or_insert_with(Instant::now);
        true
    })?;
    let end = Instant::now();
    let first = first.unwrap_or(end);
    Ok(GenerateBenchResult {
        tokens_per_s: (n.saturating_sub(1)) as f64 / (end - first).as_secs_f64().max(1e-9),
        prefill_s: (first - t0).as_secs_f64(),
        prompt_len: prompt.len(),
        new_tokens: n,
        threads: candle_core::utils::get_num_threads(),
    })
}

/// The matrix-multiply rate of `dev` in `dtype` (GFLOP/s, best of `reps` n×n×n products through
/// candle): the peak that model FLOPs utilisation is measured against.
pub fn matmul_peak_gflops(
    n: usize,
    reps: usize,
    dtype: candle_core::DType,
    dev: &candle_core::Device,
) -> Result<f64> {
    let a = candle_core::Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let b = candle_core::Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) + 1 {
        dev.synchronize()?;
        let t = Instant::now();
        let c = a.matmul(&b)?;
        dev.synchronize()?;
        // Force the result: candle is eager, but keep the optimiser from dropping the work.
        std::hint::black_box(&c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use sft_model::ModelConfig;

    fn tiny_gpt(dropout: f64) -> Model {
        let mut cfg = sft_model::presets::preset("tiny-gpt").expect("a preset");
        cfg["vocab_size"] = 50.into();
        cfg["dropout"] = dropout.into();
        let cfg = ModelConfig::from_json_str(&cfg.to_string()).unwrap();
        Model::init(&cfg, 3, DType::F32, &Device::Cpu).unwrap()
    }

    /// `--dropout` trains with the model's dropout: the weights after one step differ from a step
    /// without it, and the result says which it was.
    #[test]
    fn bench_steps_take_the_models_dropout_when_asked() {
        let weights = |dropout: bool| {
            let model = tiny_gpt(0.3);
            let opts = BenchOptions {
                batch_size: 2,
                seq_len: 16,
                steps: 1,
                warmup: 0,
                target_fraction: 1.0,
                dropout,
                master_weights: true,
                seed: 1,
            };
            let r = bench_train(&model, &opts).unwrap();
            let w: Vec<f32> = model.params()[0]
                .1
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (r.dropout, w)
        };
        let (off, w_off) = weights(false);
        let (on, w_on) = weights(true);
        assert_eq!((off, on), (0.0, 0.3));
        assert_ne!(w_off, w_on);
        // Without the flag the step is deterministic: the same weights again.
        assert_eq!(weights(false).1, w_off);
    }
}
