//! Evaluation: the loss over a prepared set (a run's validation data, `sft eval`'s file) and
//! the sample generations a run logs when it evaluates.

use sft_data::{collate, Prepared, Rendered, Template};
use sft_model::generate::{generate, SamplingParams};
use sft_model::Model;
use sft_tokenizer::Tokenizer;

use crate::config::EvalSection;
use crate::error::Result;
use crate::metrics::EvalMetrics;
use crate::step::{evaluate_batch, LossStats};

/// A run's evaluation at `step` (in `epoch`); `elapsed_s` reads the run's clock once the
/// evaluation is done.
pub fn evaluate(
    model: &Model,
    val: &Prepared,
    batch_size: usize,
    pad_id: u32,
    (step, epoch): (u64, u64),
    elapsed_s: &dyn Fn() -> f64,
) -> Result<EvalMetrics> {
    let stats = evaluate_prepared(model, val, batch_size, pad_id)?;
    Ok(EvalMetrics {
        step,
        epoch: epoch as f64,
        val_loss: stats.mean(),
        val_token_accuracy: stats.accuracy(),
        val_targets: stats.n_targets,
        elapsed_s: elapsed_s(),
    })
}

/// Loss over every target token of a prepared set: sum over targets / number of targets.
pub fn evaluate_prepared(
    model: &Model,
    data: &Prepared,
    batch_size: usize,
    pad_id: u32,
) -> Result<LossStats> {
    let eval_model = model.detached();
    let mut stats = LossStats::default();
    // Sorting by length keeps padding low; the sum does not depend on the order.
    let mut order: Vec<usize> = (0..data.samples.len()).collect();
    order.sort_by_key(|&i| data.samples[i].1.len());
    for chunk in order.chunks(batch_size.max(1)) {
        let rows: Vec<Vec<&Rendered>> = chunk.iter().map(|&i| vec![&data.samples[i].1]).collect();
        let batch = collate(&rows, pad_id, None);
        stats.add(evaluate_batch(&eval_model, &batch)?);
    }
    Ok(stats)
}

/// Generations for the configured sample prompts: `(prompt as text, generated text)`.
pub fn sample_generations(
    model: &Model,
    tok: &Tokenizer,
    template: &Template,
    eval: &EvalSection,
    seed: u64,
) -> Result<Vec<(String, String)>> {
    let mut prompts = Vec::with_capacity(eval.samples.len());
    for value in &eval.samples {
        prompts.push(sft_data::prompt_ids(value, template, tok)?);
    }
    let params = SamplingParams {
        max_new_tokens: eval.max_new_tokens,
        temperature: eval.temperature,
        top_k: eval.top_k,
        top_p: eval.top_p,
        repetition_penalty: 1.0,
        stop_ids: template.stop_ids().to_vec(),
        seed,
    };
    let generations = generate(model, &prompts, &params)?;
    let mut out = Vec::with_capacity(prompts.len());
    for (value, g) in eval.samples.iter().zip(generations) {
        out.push((value.to_string(), tok.decode_skip_special(&g.ids)?));
    }
    Ok(out)
}
