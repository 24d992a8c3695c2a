//! Fused CPU kernels with a hand-written backward, for the ops whose candle composition costs
//! most: the attention softmax, whose (batch, heads, t, t) scores make it the one element-wise
//! op that grows quadratically with the sequence.
//!
//! `masked_softmax` adds the additive mask and normalises in one pass per row, and keeps only
//! its input and output for backward (the composition keeps five full-size tensors per layer).
//! Its backward is `p * (g - sum(g * p))`, again one pass per row. Other devices and dtypes use
//! the composition, so results never depend on whether a kernel exists.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::Result;

/// The float types the kernels run on (f32 for training, f64 for gradient checks).
trait Real:
    Copy + Send + Sync + PartialOrd + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self>
{
    const ZERO: Self;
    const NEG_INF: Self;
    fn exp(self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const NEG_INF: f32 = f32::NEG_INFINITY;
    fn exp(self) -> f32 {
        f32::exp(self)
    }
    fn mul(self, o: f32) -> f32 {
        self * o
    }
    fn div(self, o: f32) -> f32 {
        self / o
    }
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const NEG_INF: f64 = f64::NEG_INFINITY;
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    fn mul(self, o: f64) -> f64 {
        self * o
    }
    fn div(self, o: f64) -> f64 {
        self / o
    }
}

fn contiguous<'a, T>(v: &'a [T], l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// softmax(scores + mask) over the last dim; scores (b, h, t, tk), mask (b or 1, 1, t, tk).
struct MaskedSoftmax;

fn masked_softmax_rows<T: Real>(
    scores: &[T],
    mask: &[T],
    dims: &[usize],
    mask_batch: usize,
) -> Vec<T> {
    let (h, t, tk) = (dims[1], dims[2], dims[3]);
    let mut out = scores.to_vec();
    out.par_chunks_mut(tk).enumerate().for_each(|(r, row)| {
        let (bi, i) = (r / (h * t), r % t);
        let m0 = ((if mask_batch == 1 { 0 } else { bi }) * t + i) * tk;
        let mask = &mask[m0..m0 + tk];
        let mut max = T::NEG_INF;
        for (x, &m) in row.iter_mut().zip(mask) {
            *x = *x + m;
            if *x > max {
                max = *x;
            }
        }
        let mut sum = T::ZERO;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum = sum + *x;
        }
        for x in row.iter_mut() {
            *x = x.div(sum);
        }
    });
    out
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "sft-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.dims();
        let mask_batch = l2.dims()[0];
        let out = match (s1, s2) {
            (CpuStorage::F32(s), CpuStorage::F32(m)) => CpuStorage::F32(masked_softmax_rows(
                contiguous(s, l1, "scores")?,
                contiguous(m, l2, "mask")?,
                dims,
                mask_batch,
            )),
            (CpuStorage::F64(s), CpuStorage::F64(m)) => CpuStorage::F64(masked_softmax_rows(
                contiguous(s, l1, "scores")?,
                contiguous(m, l2, "mask")?,
                dims,
                mask_batch,
            )),
            _ => candle_core::bail!("masked softmax: scores and mask must both be f32 or f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let d_scores = probs.apply_op2_no_bwd(&grad, &SoftmaxBackward)?;
        // The mask is a constant of the forward pass.
        Ok((Some(d_scores), None))
    }
}

/// d scores = p * (g - sum(g * p)) per row, from the softmax output p and its gradient g.
struct SoftmaxBackward;

fn softmax_backward_rows<T: Real>(p: &[T], g: &[T], tk: usize) -> Vec<T> {
    let mut out = g.to_vec();
    out.par_chunks_mut(tk)
        .zip(p.par_chunks(tk))
        .for_each(|(row, p)| {
            let mut dot = T::ZERO;
            for (&g, &p) in row.iter().zip(p) {
                dot = dot + g.mul(p);
            }
            for (g, &p) in row.iter_mut().zip(p) {
                *g = p.mul(*g - dot);
            }
        });
    out
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "sft-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let tk = *l1.dims().last().expect("softmax output has dims");
        let out = match (s1, s2) {
            (CpuStorage::F32(p), CpuStorage::F32(g)) => CpuStorage::F32(softmax_backward_rows(
                contiguous(p, l1, "probs")?,
                contiguous(g, l2, "grad")?,
                tk,
            )),
            (CpuStorage::F64(p), CpuStorage::F64(g)) => CpuStorage::F64(softmax_backward_rows(
                contiguous(p, l1, "probs")?,
                contiguous(g, l2, "grad")?,
                tk,
            )),
            _ => candle_core::bail!("softmax backward: probs and grad must both be f32 or f64"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// softmax(scores + mask) over the last dim, in at least f32, returned in the scores' dtype.
/// `scores` (b, h, t, tk); `mask` additive, (b or 1, 1, t, tk).
pub(crate) fn masked_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let dtype = scores.dtype();
    let compute = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let (b, _, t, tk) = scores.dims4()?;
    let mask_fits =
        matches!(mask.dims(), &[mb, 1, mt, mtk] if (mb == 1 || mb == b) && mt == t && mtk == tk);
    let scores = scores.to_dtype(compute)?;
    let mask = mask.to_dtype(compute)?;
    let probs = if scores.device().is_cpu() && mask_fits {
        scores
            .contiguous()?
            .apply_op2(&mask.contiguous()?, MaskedSoftmax)?
    } else {
        candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, D::Minus1)?
    };
    Ok(probs.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(n: usize, seed: f64) -> Vec<f64> {
        (0..n)
            .map(|i| ((i as f64 + 1.0) * seed).sin() * 3.0)
            .collect()
    }

    #[test]
    fn fused_softmax_and_its_gradient_match_the_composition() {
        let dev = Device::Cpu;
        let (b, h, t) = (2, 3, 5);
        let scores = Var::from_vec(values(b * h * t * t, 0.37), (b, h, t, t), &dev).unwrap();
        // Causal for batch row 0, plus a fully masked query row (padding) in batch row 1.
        let mut mask = vec![0.0; b * t * t];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..t {
                    if j > i || (bi == 1 && i == 4) {
                        mask[(bi * t + i) * t + j] = -1e9;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, t), &dev).unwrap();
        let w = Tensor::from_vec(values(b * h * t * t, 0.91), (b, h, t, t), &dev).unwrap();

        let fused = masked_softmax(&scores, &mask).unwrap();
        let composed =
            candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f64 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(diff(&fused, &composed) < 1e-14);
        let g_fused = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g_composed = (composed * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (gf, gc) = (
            g_fused.get(scores.as_tensor()).unwrap(),
            g_composed.get(scores.as_tensor()).unwrap(),
        );
        assert!(diff(gf, gc) < 1e-12, "{}", diff(gf, gc));
        assert!(diff(gf, &gf.zeros_like().unwrap()) > 1e-3);

        // A mask shared by the batch, in f32.
        let scores32 = scores.to_dtype(DType::F32).unwrap();
        let shared = mask.narrow(0, 0, 1).unwrap().to_dtype(DType::F32).unwrap();
        let fused = masked_softmax(&scores32, &shared).unwrap();
        let composed =
            candle_nn::ops::softmax(&scores32.broadcast_add(&shared).unwrap(), D::Minus1).unwrap();
        let d: f32 = (fused - composed)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-6);
    }
}
