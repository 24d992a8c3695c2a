//! The normalisation of LayerNorm and RMSNorm (before the gain and shift, which `crate::norm`
//! fuses), one pass per row each way.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::base::*;
use crate::error::Result;

/// Which normalisation a [`Norm`] computes over the last dim.
#[derive(Debug, Clone, Copy)]
pub(crate) enum NormKind {
    /// `(x - mean) / sqrt(var + eps)`: LayerNorm without its affine part.
    Layer,
    /// `x / sqrt(mean(x^2) + eps)`: RMSNorm without its gain.
    Rms,
}

/// The per-row statistics: (mean subtracted, 1 / sqrt(second moment + eps)).
pub(super) fn norm_stats<T: Real>(row: &[T], kind: NormKind, eps: T) -> (T, T) {
    let n = T::of(row.len() as f64);
    let mean = match kind {
        NormKind::Layer => row.iter().fold(T::ZERO, |a, &v| a + v).div(n),
        NormKind::Rms => T::ZERO,
    };
    let m2 = row
        .iter()
        .fold(T::ZERO, |a, &v| a + (v - mean).mul(v - mean))
        .div(n);
    (mean, T::of(1.0).div((m2 + eps).sqrt()))
}

pub(super) fn norm_fwd<T: Real>(x: &[T], n: usize, kind: NormKind, eps: f64) -> Vec<T> {
    let eps = T::of(eps);
    let mut y = x.to_vec();
    y.par_chunks_mut(n).for_each(|row| {
        let (mean, inv) = norm_stats(row, kind, eps);
        for v in row {
            *v = (*v - mean).mul(inv);
        }
    });
    y
}

/// With y the normalised row and g its gradient: LayerNorm dx = inv (g - mean(g) - y mean(g y)),
/// RMSNorm dx = inv (g - y mean(g y)).
pub(super) fn norm_bwd<T: Real>(x: &[T], g: &[T], n: usize, kind: NormKind, eps: f64) -> Vec<T> {
    let eps = T::of(eps);
    let nn = T::of(n as f64);
    let mut out = g.to_vec();
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .for_each(|(gs, xs)| {
            let (mean, inv) = norm_stats(xs, kind, eps);
            let (mut sum_g, mut sum_gy) = (T::ZERO, T::ZERO);
            for (&g, &x) in gs.iter().zip(xs) {
                sum_g = sum_g + g;
                sum_gy = sum_gy + g.mul((x - mean).mul(inv));
            }
            let mean_g = match kind {
                NormKind::Layer => sum_g.div(nn),
                NormKind::Rms => T::ZERO,
            };
            let mean_gy = sum_gy.div(nn);
            for (g, &x) in gs.iter_mut().zip(xs) {
                let y = (x - mean).mul(inv);
                *g = inv.mul(*g - mean_g - y.mul(mean_gy));
            }
        });
    out
}

pub(super) struct Norm {
    kind: NormKind,
    eps: f64,
}

impl CustomOp1 for Norm {
    fn name(&self) -> &'static str {
        "sft-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = *l.dims().last().expect("norm input has dims");
        let (kind, eps) = (self.kind, self.eps);
        let out = map_real(
            s,
            l,
            "norm input",
            |x| norm_fwd(x, n, kind, eps),
            |x| norm_fwd(x, n, kind, eps),
        )?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = NormBackward {
            kind: self.kind,
            eps: self.eps,
        };
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &back)?))
    }
}

pub(super) struct NormBackward {
    kind: NormKind,
    eps: f64,
}

impl CustomOp2 for NormBackward {
    fn name(&self) -> &'static str {
        "sft-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = *l1.dims().last().expect("norm input has dims");
        let (kind, eps) = (self.kind, self.eps);
        let out = map_real2(
            (s1, l1),
            (s2, l2),
            "norm backward",
            |x, g| norm_bwd(x, g, n, kind, eps),
            |x, g| norm_bwd(x, g, n, kind, eps),
        )?;
        Ok((out, l1.shape().clone()))
    }
}

/// `(x - mean) / sqrt(var + eps)` over the last dim (LayerNorm before its affine part); `x` is
/// f32 or f64.
pub(crate) fn layer_norm_core(x: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(x) {
        return Ok(x.contiguous()?.apply_op1(Norm {
            kind: NormKind::Layer,
            eps,
        })?);
    }
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(centred.broadcast_div(&(var + eps)?.sqrt()?)?)
}

/// `x / sqrt(mean(x^2) + eps)` over the last dim (RMSNorm before its gain); `x` is f32 or f64.
pub(crate) fn rms_norm_core(x: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(x) {
        return Ok(x.contiguous()?.apply_op1(Norm {
            kind: NormKind::Rms,
            eps,
        })?);
    }
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?)
}
