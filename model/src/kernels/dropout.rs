//! The dropout ops: `x + dropout(h)` as one op, and a mask multiply (dropout's forward and
//! every dropout's backward), drawing the masks of `crate::dropout` in blocks.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::base::*;
use crate::dropout::{Dropout, DRAW_BLOCK};
use crate::error::Result;

// Residual dropout, `x + dropout(h)`, as one op that draws its own mask: as `Dropout::apply`
// and an addition it would be two graph nodes, a mask tensor drawn on one thread, a multiplication
// and an addition each way, and one more gradient edge for candle's backward.
pub(super) struct ResidualDropout(Dropout);

pub(super) fn residual_dropout_fwd<T: Real>(d: &Dropout, x: &[T], h: &[T]) -> Vec<T> {
    // Element i draws word i of the site's stream (as in [`Dropout::apply`]): chunks draw
    // independently.
    fill_chunks(x.len(), |at, out| {
        let mut words = d.words();
        let mut m = [T::ZERO; DRAW_BLOCK];
        for (i, out) in out.chunks_mut(DRAW_BLOCK).enumerate() {
            let (m, at) = (&mut m[..out.len()], at + i * DRAW_BLOCK);
            d.fill(&mut words, at as u64, m);
            crate::with_avx512!(for (((o, &x), &h), &m) in
                out.iter_mut().zip(&x[at..]).zip(&h[at..]).zip(m.iter())
            {
                o.write(x + h.mul(m));
            });
        }
    })
}

/// `g` times the mask: the gradient of `h`.
pub(crate) fn dropout_mask_mul<T: Real>(d: &Dropout, g: &[T]) -> Vec<T> {
    fill_chunks(g.len(), |at, out| {
        let mut words = d.words();
        let mut m = [T::ZERO; DRAW_BLOCK];
        for (i, out) in out.chunks_mut(DRAW_BLOCK).enumerate() {
            let (m, at) = (&mut m[..out.len()], at + i * DRAW_BLOCK);
            d.fill(&mut words, at as u64, m);
            crate::with_avx512!(
                for ((o, &g), &m) in out.iter_mut().zip(&g[at..]).zip(m.iter()) {
                    o.write(g.mul(m));
                }
            );
        }
    })
}

impl CustomOp2 for ResidualDropout {
    fn name(&self) -> &'static str {
        "sft-residual-dropout"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = &self.0;
        let out = map_real2(
            (s1, l1),
            (s2, l2),
            "residual dropout",
            |x, h| residual_dropout_fwd(d, x, h),
            |x, h| residual_dropout_fwd(d, x, h),
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _h: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(dropout_backward(&self.0, grad)?)))
    }
}

pub(super) struct MaskMul(Dropout);

impl CustomOp1 for MaskMul {
    fn name(&self) -> &'static str {
        "sft-dropout-mask-mul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = &self.0;
        let out = map_real(
            s,
            l,
            "dropout gradient",
            |g| dropout_mask_mul(d, g),
            |g| dropout_mask_mul(d, g),
        )?;
        Ok((out, l.shape().clone()))
    }
}

/// `x + dropout(h)`: fused on the CPU (f32, f64), else [`Dropout::apply`] and an addition; the
/// same masks and results either way.
pub(crate) fn residual_dropout(x: &Tensor, h: &Tensor, d: &Dropout) -> Result<Tensor> {
    if d.p > 0.0 && fusable(x) && x.dtype() == h.dtype() && x.shape() == h.shape() {
        Ok(x.contiguous()?
            .apply_op2(&h.contiguous()?, ResidualDropout(*d))?)
    } else {
        Ok((x + d.apply(h)?)?)
    }
}

/// The gradient of `h` in [`residual_dropout`] (`x`'s is the incoming gradient itself).
pub(crate) fn dropout_backward(d: &Dropout, grad: &Tensor) -> candle_core::Result<Tensor> {
    grad.contiguous()?.apply_op1_no_bwd(&MaskMul(*d))
}
