//! The attention's masked softmax and its backward, one pass per row each way.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::base::*;
use crate::error::Result;

/// softmax(scores + mask) over the last dim; scores (b, h, t, tk), mask (b or 1, 1, t, tk).
pub(super) struct MaskedSoftmax;

pub(super) fn masked_softmax_rows<T: Real>(
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
        // The exps in a pass of their own, which vectorises; the sum in a second.
        for x in row.iter_mut() {
            let d = *x - max;
            *x = if d < T::EXP_ZERO_BELOW {
                T::ZERO
            } else {
                d.exp()
            };
        }
        let mut sum = T::ZERO;
        for &x in row.iter() {
            sum = sum + x;
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
pub(super) struct SoftmaxBackward;

pub(super) fn softmax_backward_rows<T: Real>(p: &[T], g: &[T], tk: usize) -> Vec<T> {
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
