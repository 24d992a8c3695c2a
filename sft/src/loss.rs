//! Masked cross-entropy through the output layer, computed in row chunks at target positions only.
//!
//! The logits of a 151,936-token vocabulary cost 0.6 MB per position; keeping them for autograd
//! is what makes naive SFT slow and memory-hungry on the CPU. Instead the trainer selects the
//! hidden states of target positions, and this module computes, chunk by chunk, the summed loss
//! and the exact gradients with respect to those hidden states and the output matrix
//! (`softmax - onehot`, scaled). Logits never outlive their chunk. The trainer then feeds the
//! hidden-state gradient back through the model with one surrogate backward
//! (`sum(hidden * grad)`), see `crate::step`.

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor, D};
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::accumulate;
use sft_model::math::{exp_f32, lanes};
use sft_model::Weight;

/// What one pass over a set of target rows produced.
#[derive(Debug)]
pub struct CeOutput {
    /// Sum of `-log p(target)` over the rows (not divided by anything).
    pub loss_sum: f64,
    pub n_targets: usize,
    /// Rows whose arg-max logit is the target (ties resolved to the lowest id).
    pub n_correct: usize,
    /// `d(scale * loss_sum) / d hidden`, shape (n, hidden), when gradients were asked for.
    pub grad_hidden: Option<Tensor>,
    /// `d(scale * loss_sum) / d head`, shape (vocab, hidden), when gradients were asked for.
    pub grad_head: Option<Tensor>,
}

/// Logit elements per chunk: bounds the transient memory to about 128 MiB whatever the vocabulary.
pub const DEFAULT_CHUNK_ELEMS: usize = 32 << 20;

/// Cross-entropy of `hidden` (n, h) rows through `head` (vocab, h) against `targets` (n ids).
/// With `grad_scale = Some(s)`, also returns the gradients of `s * loss_sum`: the trainer passes
/// `1 / (target tokens in the whole optimizer step)`, which makes the loss a per-token mean over
/// all gradient-accumulation micro-batches; `head_grad: false` (a frozen head) leaves the head's
/// gradient, a vocab x hidden product, uncomputed. `softcap = Some(c)`: the logits are
/// `c tanh(z / c)` of the head's output `z` ([`sft_model::Model::logit_softcap`]). Inputs are
/// treated as constants (no graph is built).
pub fn linear_cross_entropy(
    hidden: &Tensor,
    head: &Weight,
    targets: &[u32],
    grad_scale: Option<f64>,
    head_grad: bool,
    softcap: Option<f64>,
    chunk_elems: usize,
) -> Result<CeOutput> {
    let (n, h) = hidden.dims2()?;
    let (vocab, h2) = head.dims2()?;
    if h != h2 || targets.len() != n {
        return Err(candle_core::Error::Msg(format!(
            "linear_cross_entropy: hidden {:?}, head ({vocab}, {h2}), {} targets",
            hidden.dims(),
            targets.len()
        ))
        .into());
    }
    if head_grad && head.dense().is_none() {
        return Err(candle_core::Error::Msg(
            "linear_cross_entropy: a head kept as blocks is frozen".into(),
        )
        .into());
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(candle_core::Error::Msg(format!(
            "target id {bad} is outside the output vocabulary ({vocab})"
        ))
        .into());
    }
    let mut out = CeOutput {
        loss_sum: 0.0,
        n_targets: n,
        n_correct: 0,
        grad_hidden: None,
        grad_head: None,
    };
    if n == 0 {
        return Ok(out);
    }
    // Logits and their gradients in f32 whatever the model dtype.
    let hidden = hidden.detach().to_dtype(DType::F32)?;
    let head = match head {
        Weight::Dense(t) => Weight::Dense(t.detach().to_dtype(DType::F32)?),
        blocks => blocks.clone(),
    };
    let rows_per_chunk = (chunk_elems / vocab).clamp(1, n);
    let mut grad_hidden_chunks = Vec::new();
    let mut grad_head: Option<Tensor> = None;
    let mut start = 0;
    while start < n {
        let len = rows_per_chunk.min(n - start);
        let h_chunk = hidden.narrow(0, start, len)?;
        let mut logits = head.product(&h_chunk)?;
        // d(c tanh(z / c)) / dz = 1 - tanh^2, applied to the capped logits' gradient below.
        let mut cap_slope = None;
        if let Some(c) = softcap {
            let t = (logits / c)?.tanh()?;
            if grad_scale.is_some() {
                cap_slope = Some(t.sqr()?.affine(-1.0, 1.0)?);
            }
            logits = t.affine(c, 0.0)?;
        }
        let tgt = &targets[start..start + len];
        let (loss, correct) = softmax_ce_in_place(&logits, tgt, grad_scale)?;
        out.loss_sum += loss;
        out.n_correct += correct;
        if let Some(slope) = cap_slope {
            logits = (logits * slope)?;
        }
        if grad_scale.is_some() && !head_grad {
            grad_hidden_chunks.push(head.input_grad(&logits)?);
        } else if grad_scale.is_some() {
            let head = head
                .dense()
                .expect("checked above: a trained head is a tensor");
            // `logits` now holds scale * (softmax - onehot).
            // Through the dense layer's backward where it runs, the head's gradient summed
            // over chunks by `gemm` in place (candle's matmul of the transposed logits would make
            // a second (vocab x hidden) buffer per chunk, copy into it, and add each chunk's
            // product to the sum).
            match sft_model::linear_grads(&h_chunk, head, &logits, grad_head.as_ref())? {
                Some((gh, g)) => {
                    grad_hidden_chunks.push(gh);
                    grad_head = Some(g);
                }
                None => {
                    grad_hidden_chunks.push(logits.matmul(head)?);
                    let g = logits.t()?.matmul(&h_chunk)?;
                    match grad_head.as_mut() {
                        None => grad_head = Some(g),
                        Some(acc) => accumulate(acc, &g)?,
                    }
                }
            }
        }
        start += len;
    }
    if grad_scale.is_some() {
        out.grad_hidden = Some(Tensor::cat(&grad_hidden_chunks, 0)?);
        out.grad_head = grad_head;
    }
    Ok(out)
}

/// Per row: loss and arg-max; with a scale, overwrites the logits with
/// `scale * (softmax - onehot(target))`. Returns (summed loss, correct rows).
fn softmax_ce_in_place(
    logits: &Tensor,
    targets: &[u32],
    scale: Option<f64>,
) -> Result<(f64, usize)> {
    if logits.device().is_cpu() && logits.is_contiguous() {
        let op = SoftmaxCe {
            targets,
            scale,
            result: std::sync::Mutex::new((0.0, 0)),
        };
        logits.inplace_op1(&op)?;
        let r = *op.result.lock().expect("not poisoned");
        return Ok(r);
    }
    softmax_ce_generic(logits, targets, scale)
}

struct SoftmaxCe<'a> {
    targets: &'a [u32],
    scale: Option<f64>,
    result: std::sync::Mutex<(f64, usize)>,
}

impl InplaceOp1 for SoftmaxCe<'_> {
    fn name(&self) -> &'static str {
        "sft-softmax-ce"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some(data) = sft_model::cpu::contiguous_f32_mut(storage, layout) else {
            candle_core::bail!("softmax-ce: expected contiguous f32 logits")
        };
        let vocab = *layout.dims().last().expect("2-D logits");
        let scale = self.scale;
        // Per-row results are collected in row order and summed sequentially, so the loss is
        // bit-identical whatever rayon's work stealing does.
        let rows: Vec<(f64, usize)> = data
            .par_chunks_mut(vocab)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                sft_model::with_avx512!({
                    let t = t as usize;
                    let fmax = |a: f32, x: f32| if x > a { x } else { a };
                    let max = lanes(row, f32::NEG_INFINITY, fmax, fmax);
                    // The first maximum, as a running arg-max finds it.
                    let arg = row.iter().position(|&x| x == max).unwrap_or(0);
                    // exp in f32 (`exp_f32`, under 2e-7 relative), summed in f64; training keeps
                    // the exps in the row so the gradient needs no second exp pass.
                    let target = row[t];
                    let sum = match scale {
                        Some(_) => {
                            // Exps in a pass of their own, which vectorises; the f64 sum after.
                            for x in row.iter_mut() {
                                *x = exp_f32(*x - max);
                            }
                            lanes(row, 0f64, |a, x| a + x as f64, |a, b| a + b)
                        }
                        None => {
                            let add = |a: f64, x: f32| a + exp_f32(x - max) as f64;
                            lanes(row, 0f64, add, |a, b| a + b)
                        }
                    };
                    let loss = max as f64 + sum.ln() - target as f64;
                    if let Some(s) = scale {
                        let k = (s / sum) as f32;
                        for x in row.iter_mut() {
                            *x *= k;
                        }
                        row[t] -= s as f32;
                    }
                    (loss, usize::from(arg == t))
                })
            })
            .collect();
        let loss = rows.iter().map(|r| r.0).sum::<f64>();
        let correct = rows.iter().map(|r| r.1).sum::<usize>();
        *self.result.lock().expect("not poisoned") = (loss, correct);
        Ok(())
    }
}

/// The same computation with candle ops, for devices without the CPU kernel.
fn softmax_ce_generic(
    logits: &Tensor,
    targets: &[u32],
    scale: Option<f64>,
) -> Result<(f64, usize)> {
    let (rows, vocab) = logits.dims2()?;
    let tgt = Tensor::from_slice(targets, rows, logits.device())?;
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = log_probs.gather(&tgt.unsqueeze(1)?, 1)?;
    let loss = -(picked.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?);
    let correct = logits
        .argmax(D::Minus1)?
        .eq(&tgt)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as usize;
    if let Some(s) = scale {
        let ids = Tensor::arange(0u32, vocab as u32, logits.device())?;
        let onehot = ids
            .broadcast_as((rows, vocab))?
            .broadcast_eq(&tgt.unsqueeze(1)?)?;
        let grad = ((log_probs.exp()? - onehot.to_dtype(DType::F32)?)? * s)?;
        // Write back so the caller sees the same in-place contract as the CPU kernel.
        logits.slice_set(&grad, 0, 0)?;
    }
    Ok((loss, correct))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: (usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// The loss and gradients from candle's autograd on the plain formula.
    fn reference(h: &Tensor, w: &Tensor, targets: &[u32], scale: f64) -> (f64, Tensor, Tensor) {
        reference_capped(h, w, targets, scale, None)
    }

    fn reference_capped(
        h: &Tensor,
        w: &Tensor,
        targets: &[u32],
        scale: f64,
        cap: Option<f64>,
    ) -> (f64, Tensor, Tensor) {
        let hv = Var::from_tensor(h).unwrap();
        let wv = Var::from_tensor(w).unwrap();
        let mut logits = hv.as_tensor().matmul(&wv.as_tensor().t().unwrap()).unwrap();
        if let Some(c) = cap {
            logits = ((logits / c).unwrap().tanh().unwrap() * c).unwrap();
        }
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let tgt = Tensor::from_slice(targets, targets.len(), &Device::Cpu).unwrap();
        let picked = lp.gather(&tgt.unsqueeze(1).unwrap(), 1).unwrap();
        let loss = (picked.sum_all().unwrap().neg().unwrap() * scale).unwrap();
        let grads = loss.backward().unwrap();
        let l = loss.to_scalar::<f32>().unwrap() as f64 / scale;
        (
            l,
            grads.get(hv.as_tensor()).unwrap().clone(),
            grads.get(wv.as_tensor()).unwrap().clone(),
        )
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn matches_autograd_for_every_chunking() {
        let (n, h, v) = (13, 8, 37);
        let hidden = randn((n, h), 1);
        let head = randn((v, h), 2);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % v as u32).collect();
        let scale = 1.0 / 29.0;
        let (ref_loss, ref_dh, ref_dw) = reference(&hidden, &head, &targets, scale);
        for chunk_elems in [1, v * 2, v * 5, v * n, 1 << 20] {
            let out = linear_cross_entropy(
                &hidden,
                &Weight::Dense(head.clone()),
                &targets,
                Some(scale),
                true,
                None,
                chunk_elems,
            )
            .unwrap();
            assert!(
                (out.loss_sum - ref_loss).abs() < 1e-4,
                "{} vs {ref_loss}",
                out.loss_sum
            );
            assert!(max_abs_diff(out.grad_hidden.as_ref().unwrap(), &ref_dh) < 1e-6);
            assert!(max_abs_diff(out.grad_head.as_ref().unwrap(), &ref_dw) < 1e-6);
            // A frozen head: the same hidden gradient, bit for bit, and no head gradient.
            let frozen = linear_cross_entropy(
                &hidden,
                &Weight::Dense(head.clone()),
                &targets,
                Some(scale),
                false,
                None,
                chunk_elems,
            )
            .unwrap();
            assert!(frozen.grad_head.is_none() && frozen.loss_sum == out.loss_sum);
            let (a, b) = (frozen.grad_hidden.unwrap(), out.grad_hidden.unwrap());
            assert_eq!(max_abs_diff(&a, &b), 0.0);
        }
    }

    /// Gemma 2's final soft-cap `c tanh(z / c)` inside the chunked loss: loss and both
    /// gradients as autograd gives them through the capped logits (a cap of 2 bends them hard).
    #[test]
    fn softcapped_logits_match_autograd() {
        let (n, h, v) = (9, 8, 23);
        let hidden = (randn((n, h), 4) * 3.0).unwrap();
        let head = randn((v, h), 5);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 5 + 1) % v as u32).collect();
        let scale = 1.0 / 9.0;
        let (ref_loss, ref_dh, ref_dw) =
            reference_capped(&hidden, &head, &targets, scale, Some(2.0));
        let (plain_loss, _, _) = reference(&hidden, &head, &targets, scale);
        assert!(
            (ref_loss - plain_loss).abs() > 1e-2,
            "the cap must matter here"
        );
        for chunk_elems in [v * 2, 1 << 20] {
            let out = linear_cross_entropy(
                &hidden,
                &Weight::Dense(head.clone()),
                &targets,
                Some(scale),
                true,
                Some(2.0),
                chunk_elems,
            )
            .unwrap();
            assert!(
                (out.loss_sum - ref_loss).abs() < 1e-4,
                "{} vs {ref_loss}",
                out.loss_sum
            );
            assert!(max_abs_diff(out.grad_hidden.as_ref().unwrap(), &ref_dh) < 1e-6);
            assert!(max_abs_diff(out.grad_head.as_ref().unwrap(), &ref_dw) < 1e-6);
            let eval = linear_cross_entropy(
                &hidden,
                &Weight::Dense(head.clone()),
                &targets,
                None,
                true,
                Some(2.0),
                chunk_elems,
            )
            .unwrap();
            assert!((eval.loss_sum - out.loss_sum).abs() < 1e-9 * out.loss_sum.abs().max(1.0));
        }
    }

    #[test]
    fn generic_path_matches_cpu_kernel() {
        let logits = randn((5, 11), 3);
        let targets = [0u32, 10, 5, 5, 2];
        let a = logits.copy().unwrap();
        let b = logits.copy().unwrap();
        let ra = softmax_ce_in_place(&a, &targets, Some(0.5)).unwrap();
        let rb = softmax_ce_generic(&b, &targets, Some(0.5)).unwrap();
        assert!((ra.0 - rb.0).abs() < 1e-5);
        assert_eq!(ra.1, rb.1);
        assert!(max_abs_diff(&a, &b) < 1e-6);
    }

    #[test]
    fn accuracy_and_empty_inputs() {
        let head = Tensor::new(&[[1f32, 0.], [0., 1.], [-1., -1.]], &Device::Cpu).unwrap();
        let hidden = Tensor::new(&[[5f32, 0.], [0., 5.], [5., 0.]], &Device::Cpu).unwrap();
        let out = linear_cross_entropy(
            &hidden,
            &Weight::Dense(head.clone()),
            &[0, 1, 1],
            None,
            true,
            None,
            1 << 20,
        )
        .unwrap();
        assert_eq!(out.n_correct, 2);
        assert!(out.grad_hidden.is_none());
        let empty = hidden.narrow(0, 0, 0).unwrap();
        let out = linear_cross_entropy(
            &empty,
            &Weight::Dense(head.clone()),
            &[],
            Some(1.0),
            true,
            None,
            1 << 20,
        )
        .unwrap();
        assert_eq!((out.loss_sum, out.n_targets), (0.0, 0));
        let err = linear_cross_entropy(
            &hidden,
            &Weight::Dense(head.clone()),
            &[0, 1, 3],
            None,
            true,
            None,
            1 << 20,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("outside the output vocabulary"),
            "{err}"
        );
    }
}
