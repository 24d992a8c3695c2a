//! Sampling with a KV cache: greedy, temperature, top-k, top-p and `transformers`' repetition
//! penalty, applied in `transformers`' order (penalty, temperature, top-k, top-p).
//!
//! Each prompt is decoded on its own with a ChaCha8 stream seeded from `(seed, prompt index)`,
//! so a prompt's output does not depend on which other prompts share the call. Generation stops
//! at a stop id, after `max_new_tokens`, or when prompt + output fill the model's positions.

use candle_core::{IndexOp, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{input_error, Result};
use crate::model::Model;

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 means greedy (arg-max, lowest id on ties).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// 1.0 is off. As `transformers`: for every token already in prompt or output, a positive
    /// logit is divided by it and a negative one multiplied.
    pub repetition_penalty: f64,
    pub stop_ids: Vec<u32>,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// New tokens; the stop token is not included.
    pub ids: Vec<u32>,
    /// The stop token that ended generation; `None` when `max_new_tokens` or the context limit
    /// ended it (or the caller's callback did).
    pub stop_id: Option<u32>,
}

/// Continues each prompt; results are in prompt order.
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
) -> Result<Vec<Generation>> {
    let model = model.detached();
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| generate_one(&model, p, params, i as u64, &mut |_| true))
        .collect()
}

/// Continues one prompt (as prompt 0 of [`generate`]), calling `on_token` with each new token
/// before the next is computed; `on_token` returning false stops generation.
pub fn generate_streaming(
    model: &Model,
    prompt: &[u32],
    params: &SamplingParams,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Generation> {
    generate_one(&model.detached(), prompt, params, 0, on_token)
}

fn generate_one(
    model: &Model,
    prompt: &[u32],
    params: &SamplingParams,
    index: u64,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Generation> {
    check_params(params)?;
    let max_positions = model.config().max_positions();
    if prompt.is_empty() {
        return input_error("cannot generate from an empty prompt");
    }
    if prompt.len() > max_positions {
        return input_error(format!(
            "prompt of {} tokens is longer than the model's {max_positions} positions",
            prompt.len()
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    rng.set_stream(index);
    let mut seen = vec![false; model.config().vocab_size()];
    for &id in prompt {
        if let Some(s) = seen.get_mut(id as usize) {
            *s = true;
        }
    }

    let mut cache = model.new_cache();
    let mut out = Generation {
        ids: Vec::new(),
        stop_id: None,
    };
    let mut input = prompt.to_vec();
    let budget = params.max_new_tokens.min(max_positions - prompt.len());
    while out.ids.len() < budget {
        let ids = Tensor::new(input.as_slice(), model.device())?.unsqueeze(0)?;
        let hidden = model.forward_cached_hidden(&ids, &mut cache)?;
        let last_hidden = hidden.narrow(1, input.len() - 1, 1)?;
        let mut last: Vec<f32> = model.logits(&last_hidden)?.i((0, 0))?.to_vec1()?;
        let next = sample(&mut last, &seen, params, &mut rng);
        if params.stop_ids.contains(&next) {
            out.stop_id = Some(next);
            break;
        }
        out.ids.push(next);
        seen[next as usize] = true;
        if !on_token(next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}

fn check_params(p: &SamplingParams) -> Result<()> {
    if !p.temperature.is_finite() || p.temperature < 0.0 {
        return input_error(format!(
            "temperature {} must be finite and >= 0",
            p.temperature
        ));
    }
    if p.repetition_penalty.is_nan() || p.repetition_penalty <= 0.0 {
        return input_error(format!(
            "repetition_penalty {} must be > 0",
            p.repetition_penalty
        ));
    }
    if p.top_k == Some(0) {
        return input_error("top_k must be at least 1");
    }
    if let Some(top_p) = p.top_p.filter(|&t| !(t > 0.0 && t <= 1.0)) {
        return input_error(format!("top_p {top_p} must be in (0, 1]"));
    }
    Ok(())
}

/// Picks the next token from one row of logits (modified in place).
fn sample(logits: &mut [f32], seen: &[bool], p: &SamplingParams, rng: &mut ChaCha8Rng) -> u32 {
    if p.repetition_penalty != 1.0 {
        let penalty = p.repetition_penalty as f32;
        for (l, _) in logits.iter_mut().zip(seen).filter(|(_, &s)| s) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
    if p.temperature == 0.0 {
        return argmax(logits);
    }
    // Candidates sorted by logit, descending (stable: lower id first on ties).
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let inv_t = 1.0 / p.temperature;
    if let Some(k) = p.top_k.filter(|&k| k < order.len()) {
        // transformers keeps every token tied with the k-th.
        let kth = logits[order[k - 1]];
        order.retain(|&i| logits[i] >= kth);
    }
    let max = logits[order[0]] as f64 * inv_t;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| (logits[i] as f64 * inv_t - max).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    if let Some(top_p) = p.top_p.filter(|&t| t < 1.0) {
        // The smallest prefix whose mass reaches top_p (the crossing token included).
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .position(|&q| {
                mass += q;
                mass >= top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (&i, &q) in order.iter().zip(&probs) {
        if u < q {
            return i as u32;
        }
        u -= q;
    }
    *order.last().expect("at least one candidate") as u32
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams {
            max_new_tokens: 1,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            stop_ids: vec![],
            seed: 0,
        }
    }

    fn histogram(logits: &[f32], seen: &[bool], p: &SamplingParams, n: usize) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[sample(&mut logits.to_vec(), seen, p, &mut rng) as usize] += 1;
        }
        counts
    }

    #[test]
    fn greedy_and_repetition_penalty() {
        let p = SamplingParams {
            temperature: 0.0,
            ..params()
        };
        let none = [false; 3];
        assert_eq!(
            sample(
                &mut [1.0, 3.0, 2.0],
                &none,
                &p,
                &mut ChaCha8Rng::seed_from_u64(0)
            ),
            1
        );
        // 3.0 / 2 = 1.5 < 2.0; a negative logit becomes more negative.
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..p
        };
        let seen = [false, true, false];
        assert_eq!(
            sample(
                &mut [1.0, 3.0, 2.0],
                &seen,
                &p,
                &mut ChaCha8Rng::seed_from_u64(0)
            ),
            2
        );
        let mut l = [-1.0, -1.5, -3.0];
        let seen = [true, false, false];
        assert_eq!(
            sample(&mut l, &seen, &p, &mut ChaCha8Rng::seed_from_u64(0)),
            1
        );
        assert_eq!(l[0], -2.0);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        let none = [false; 4];
        let p = SamplingParams {
            top_k: Some(2),
            ..params()
        };
        let h = histogram(&logits, &none, &p, 2000);
        assert_eq!((h[0], h[1]), (0, 0));
        // softmax(3, 2) = (0.731, 0.269): frequencies follow.
        assert!((h[3] as f64 / 2000.0 - 0.731).abs() < 0.04, "{h:?}");
        // probs ~ (0.032, 0.087, 0.237, 0.644): top_p 0.7 keeps ids 3 and 2.
        let p = SamplingParams {
            top_p: Some(0.7),
            ..params()
        };
        let h = histogram(&logits, &none, &p, 2000);
        assert_eq!((h[0], h[1]), (0, 0));
        assert!(h[2] > 0 && h[3] > 0);
        let p = SamplingParams {
            top_p: Some(0.5),
            ..params()
        };
        assert_eq!(histogram(&logits, &none, &p, 200)[3], 200);
    }

    #[test]
    fn temperature_sharpens() {
        let logits = [0.0f32, 1.0];
        let none = [false; 2];
        let hot = histogram(
            &logits,
            &none,
            &SamplingParams {
                temperature: 2.0,
                ..params()
            },
            4000,
        );
        let cold = histogram(
            &logits,
            &none,
            &SamplingParams {
                temperature: 0.25,
                ..params()
            },
            4000,
        );
        // p(1) = sigmoid(1 / T): 0.622 at T = 2, 0.982 at T = 0.25.
        assert!((hot[1] as f64 / 4000.0 - 0.622).abs() < 0.03, "{hot:?}");
        assert!((cold[1] as f64 / 4000.0 - 0.982).abs() < 0.01, "{cold:?}");
    }
}
