//! GELU (tanh approximation) and SwiGLU's `silu(g) * u`, fused forward and backward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::base::*;
use crate::error::Result;

// GELU with the tanh approximation (GPT-2's `gelu_new`, candle's `gelu`):
// y = x/2 (1 + tanh(u)), u = c (x + k x^3), c = sqrt(2/pi), k = 0.044715.
pub(super) const GELU_C: f64 = 0.797_884_560_802_865_4;
pub(super) const GELU_K: f64 = 0.044_715;

pub(super) fn gelu_fwd<T: Real>(x: &[T]) -> Vec<T> {
    let (c, k, half, one) = (T::of(GELU_C), T::of(GELU_K), T::of(0.5), T::of(1.0));
    fill_chunks(x.len(), |at, ys| {
        crate::with_avx512!(for (y, &x) in ys.iter_mut().zip(&x[at..]) {
            let u = c.mul(x + k.mul(x.mul(x).mul(x)));
            y.write(half.mul(x).mul(one + u.tanh()));
        })
    })
}

/// dy/dx = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 k x^2), times the incoming gradient.
pub(super) fn gelu_bwd<T: Real>(x: &[T], g: &[T]) -> Vec<T> {
    let (c, k3, half, one) = (T::of(GELU_C), T::of(3.0 * GELU_K), T::of(0.5), T::of(1.0));
    let k = T::of(GELU_K);
    fill_chunks(x.len(), |at, out| {
        crate::with_avx512!(
            for ((o, &x), &g) in out.iter_mut().zip(&x[at..]).zip(&g[at..]) {
                let x2 = x.mul(x);
                let t = c.mul(x + k.mul(x2).mul(x)).tanh();
                let d = half.mul(one + t)
                    + half.mul(x).mul(one - t.mul(t)).mul(c).mul(one + k3.mul(x2));
                o.write(g.mul(d));
            }
        )
    })
}

pub(super) struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "sft-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = map_real(s, l, "gelu input", gelu_fwd, gelu_fwd)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(gelu_backward(x, grad)?))
    }
}

pub(super) struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "sft-gelu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = map_real2((s1, l1), (s2, l2), "gelu backward", gelu_bwd, gelu_bwd)?;
        Ok((out, l1.shape().clone()))
    }
}

// SwiGLU's product silu(g) * u, with silu(g) = g sigmoid(g):
// d g = grad u sigmoid(g) (1 + g (1 - sigmoid(g))), d u = grad silu(g).

/// 1 / (1 + e^-x), branch-free so loops over it vectorise (random signs made a branch on x
/// mispredict half the time). No overflow trouble: `exp_f32` clamps its input (e^88.7 is
/// finite), and an f64 `exp` that overflows to infinity gives exactly 0.
#[inline]
pub(super) fn sigmoid<T: Real>(x: T) -> T {
    let one = T::of(1.0);
    one.div(one + (T::ZERO - x).exp())
}

pub(super) fn silu_mul_fwd<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
    fill_chunks(g.len(), |at, out| {
        crate::with_avx512!(
            for ((o, &g), &u) in out.iter_mut().zip(&g[at..]).zip(&u[at..]) {
                o.write(g.mul(sigmoid(g)).mul(u));
            }
        )
    })
}

/// Both gradients in one pass, stacked: `[d gate; d up]`, each of the inputs' size.
pub(super) fn silu_mul_bwd<T: Real>(g: &[T], u: &[T], grad: &[T]) -> Vec<T> {
    let n = g.len();
    let one = T::of(1.0);
    let mut out = vec![T::ZERO; 2 * n];
    let (dg, du) = out.split_at_mut(n);
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .zip(grad.par_chunks(CHUNK))
        .for_each(|(((dg, du), (g, u)), grad)| {
            let ins = g.iter().zip(u).zip(grad);
            crate::with_avx512!(
                for ((dg, du), ((&x, &u), &grad)) in dg.iter_mut().zip(du).zip(ins) {
                    let s = sigmoid(x);
                    *du = grad.mul(x.mul(s));
                    *dg = grad.mul(u).mul(s).mul(one + x.mul(one - s));
                }
            )
        });
    out
}

pub(super) struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "sft-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = map_real2((s1, l1), (s2, l2), "silu-mul", silu_mul_fwd, silu_mul_fwd)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = silu_mul_backward(gate, up, grad)?;
        Ok((Some(dg), Some(du)))
    }
}

pub(super) struct SiluMulBackward;

impl CustomOp3 for SiluMulBackward {
    fn name(&self) -> &'static str {
        "sft-silu-mul-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let what = "silu-mul backward";
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(g), CpuStorage::F32(u), CpuStorage::F32(d)) => {
                CpuStorage::F32(silu_mul_bwd(
                    contiguous(g, l1, what)?,
                    contiguous(u, l2, what)?,
                    contiguous(d, l3, what)?,
                ))
            }
            (CpuStorage::F64(g), CpuStorage::F64(u), CpuStorage::F64(d)) => {
                CpuStorage::F64(silu_mul_bwd(
                    contiguous(g, l1, what)?,
                    contiguous(u, l2, what)?,
                    contiguous(d, l3, what)?,
                ))
            }
            _ => candle_core::bail!("{what}: all inputs must be f32 or all f64"),
        };
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((out, Shape::from(dims)))
    }
}

/// `silu(gate) * up`, fused on the CPU when both are f32 or f64 of one shape.
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fusable(gate) && gate.dtype() == up.dtype() && gate.dims() == up.dims() {
        return Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)?);
    }
    Ok((gate.silu()? * up)?)
}

/// The gradient of [`gelu`]'s input.
pub(crate) fn gelu_backward(x: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)
}

/// The gradients of `gate` and `up` in [`silu_mul`].
pub(crate) fn silu_mul_backward(
    gate: &Tensor,
    up: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SiluMulBackward)?;
    Ok((both.get(0)?, both.get(1)?))
}

/// GELU (tanh approximation), fused on the CPU.
pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        Ok(x.contiguous()?.apply_op1(Gelu)?)
    } else {
        Ok(x.gelu()?)
    }
}
