//! Fused CPU kernels with a hand-written backward, for the ops whose candle composition costs
//! most: the attention softmax, whose (batch, heads, t, t) scores make it the one element-wise
//! op that grows quadratically with the sequence, and the element-wise chains the profile of a
//! small model's training step is full of (GELU: `powf`, `tanh` and a dozen full-size passes
//! forward and backward; the normalisation of LayerNorm and RMSNorm: seven ops forward, more
//! backward). Each becomes one pass forward and one backward, row-wise and so deterministic.
//!
//! `masked_softmax` adds the additive mask and normalises in one pass per row, and keeps only
//! its input and output for backward (the composition keeps five full-size tensors per layer).
//! Its backward is `p * (g - sum(g * p))`, again one pass per row. Rotary embedding writes its
//! output heads-first, so attention's transpose copy goes too, and SwiGLU's `silu(g) * u` returns
//! both gradients from one pass. Other devices and dtypes use the composition, so results never
//! depend on whether a kernel exists.
//!
//! Each fused op also spares candle's backward a zero-filled buffer and an addition per input
//! (`GradStore::or_insert` then `add`), which for a small model is a visible share of a step.

use std::mem::MaybeUninit;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor, D,
};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::dropout::{Dropout, DRAW_BLOCK};
pub(crate) use crate::math::Real;
use crate::Result;

/// The float types the kernels run on, with typed access to candle's CPU storage.
pub(crate) trait Element: Real + candle_core::WithDType {
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        s.as_slice::<Self>().ok()
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        Self::to_cpu_storage_owned(v)
    }
}

impl Element for f32 {}
impl Element for f64 {}

/// The CPU storage behind a tensor (read in a backward pass, which gets tensors).
pub(crate) fn cpu(s: &Storage) -> candle_core::Result<&CpuStorage> {
    match s {
        Storage::Cpu(s) => Ok(s),
        _ => candle_core::bail!("a fused kernel runs on the CPU only"),
    }
}

/// `dst (m x n) = dst + beta * lhs (m x k) rhs (k x n)` when `accumulate`, else `beta * lhs rhs`,
/// with the given parallelism; each matrix is (pointer, row stride, column stride).
///
/// # Safety
/// Every pointer must address the whole strided matrix it describes.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul<T: Real + 'static>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, usize, usize),
    accumulate: bool,
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    beta: T,
    parallelism: Parallelism,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.0,
            dst.2 as isize,
            dst.1 as isize,
            accumulate,
            lhs.0,
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0,
            rhs.2 as isize,
            rhs.1 as isize,
            T::of(1.0),
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The contiguous `T` values of a CPU storage under its layout; `what` names it in the error.
pub(crate) fn slice_of<'a, T: Element>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match crate::cpu::contiguous::<T>(s, l) {
        Some(v) => Ok(v),
        None => candle_core::bail!("{what} must be contiguous, and f32 or f64 like its op's input"),
    }
}

/// Rows per block of a column sum: partial sums stay small, and there are blocks enough to
/// share between threads.
pub(crate) const SUM_ROWS: usize = 64;

/// The element-wise sum of `parts` (each `n` long), in their order.
pub(crate) fn sum_in_order<'a, T: Real + 'a>(
    parts: impl Iterator<Item = &'a Vec<T>>,
    n: usize,
) -> Vec<T> {
    parts.fold(vec![T::ZERO; n], |mut acc, p| {
        acc.iter_mut().zip(p).for_each(|(a, &v)| *a = *a + v);
        acc
    })
}

/// Column sums of rows of `n` values (a bias's gradient), per block of [`SUM_ROWS`] rows and
/// then over the blocks in order, so the result does not depend on the thread count.
pub(crate) fn column_sums<T: Real>(g: &[T], n: usize) -> Vec<T> {
    let blocks: Vec<Vec<T>> = g
        .par_chunks(n * SUM_ROWS)
        .map(|rows| {
            let mut sum = vec![T::ZERO; n];
            for row in rows.chunks(n) {
                sum.iter_mut().zip(row).for_each(|(s, &g)| *s = *s + g);
            }
            sum
        })
        .collect();
    sum_in_order(blocks.iter(), n)
}

/// The storage and layout of one input of an op.
pub(crate) type Input<'a> = (&'a CpuStorage, &'a Layout);

/// An op over an input `x` and one or two parameter tensors (a weight, a bias, a gain and a
/// shift), written once over the float type and run by candle as `CustomOp2` (x, p) or
/// `CustomOp3` (x, p, q) through [`WithParams`].
pub(crate) trait ParamOp: Send + Sync {
    const NAME: &'static str;

    fn forward<T: Element>(
        &self,
        x: Input<'_>,
        params: &[Input<'_>],
    ) -> candle_core::Result<(CpuStorage, Shape)>;

    /// The gradients of `x` and of each parameter, in order, from the output's gradient
    /// (contiguous).
    fn backward<T: Element>(
        &self,
        x: &Tensor,
        params: &[&Tensor],
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<Option<Tensor>>)>;
}

/// A [`ParamOp`] as candle's custom op, for f32 and f64.
pub(crate) struct WithParams<O>(pub(crate) O);

impl<O: ParamOp + 'static> WithParams<O> {
    /// `op` on `x` and its parameters, all made contiguous: candle's `CustomOp2` for one
    /// parameter, `CustomOp3` for two.
    pub(crate) fn apply(op: O, x: &Tensor, p: &Tensor, q: Option<&Tensor>) -> Result<Tensor> {
        let (x, p) = (x.contiguous()?, p.contiguous()?);
        Ok(match q {
            Some(q) => x.apply_op3(&p, &q.contiguous()?, WithParams(op))?,
            None => x.apply_op2(&p, WithParams(op))?,
        })
    }
}

impl<O: ParamOp> WithParams<O> {
    fn run_forward(
        &self,
        x: Input<'_>,
        params: &[Input<'_>],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match x.0 {
            CpuStorage::F32(_) => self.0.forward::<f32>(x, params),
            CpuStorage::F64(_) => self.0.forward::<f64>(x, params),
            _ => candle_core::bail!("{}: only f32 and f64", O::NAME),
        }
    }

    /// The op's gradients, called by candle's backward or by a model's own (`Model::backward`).
    pub(crate) fn run_backward(
        &self,
        x: &Tensor,
        params: &[&Tensor],
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Vec<Option<Tensor>>)> {
        let grad = grad.contiguous()?;
        let (dx, dp) = match x.dtype() {
            DType::F32 => self.0.backward::<f32>(x, params, &grad)?,
            DType::F64 => self.0.backward::<f64>(x, params, &grad)?,
            dtype => candle_core::bail!("{}: no backward for {dtype:?}", O::NAME),
        };
        if dp.len() != params.len() {
            candle_core::bail!(
                "{}: {} gradients for {} parameters",
                O::NAME,
                dp.len(),
                params.len()
            );
        }
        Ok((Some(dx), dp))
    }
}

impl<O: ParamOp> WithParams<O> {
    /// The gradients of `x`, of the parameter `p` and (given) of `q`, for a backward pass other
    /// than candle's (`Model::backward`).
    pub(crate) fn gradients(
        &self,
        x: &Tensor,
        (p, q): (&Tensor, Option<&Tensor>),
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let params: Vec<&Tensor> = std::iter::once(p).chain(q).collect();
        let (dx, dp) = self.run_backward(x, &params, grad)?;
        let mut dp = dp.into_iter();
        let missing = || candle_core::Error::Msg(format!("{}: a gradient is missing", O::NAME));
        let dp0 = dp.next().flatten().ok_or_else(missing)?;
        Ok((dx.ok_or_else(missing)?, dp0, dp.next().flatten()))
    }
}

impl<O: ParamOp> CustomOp2 for WithParams<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run_forward((s1, l1), &[(s2, l2)])
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dp) = self.run_backward(x, &[p], grad)?;
        let mut dp = dp.into_iter();
        Ok((dx, dp.next().flatten()))
    }
}

impl<O: ParamOp> CustomOp3 for WithParams<O> {
    fn name(&self) -> &'static str {
        O::NAME
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
        self.run_forward((s1, l1), &[(s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        q: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dp) = self.run_backward(x, &[p, q], grad)?;
        let mut dp = dp.into_iter();
        Ok((dx, dp.next().flatten(), dp.next().flatten()))
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

/// Runs `f(x)` for f32 or f64 storage; other dtypes are the caller's business.
fn map_real(
    s: &CpuStorage,
    l: &Layout,
    what: &str,
    f32_fn: impl Fn(&[f32]) -> Vec<f32>,
    f64_fn: impl Fn(&[f64]) -> Vec<f64>,
) -> candle_core::Result<CpuStorage> {
    Ok(match s {
        CpuStorage::F32(v) => CpuStorage::F32(f32_fn(contiguous(v, l, what)?)),
        CpuStorage::F64(v) => CpuStorage::F64(f64_fn(contiguous(v, l, what)?)),
        _ => candle_core::bail!("{what}: only f32 and f64"),
    })
}

/// Runs `f(a, b)` for two f32 or two f64 storages of the same length (the element-wise kernels
/// zip them into outputs they do not fill first, so a shorter one would leave holes).
fn map_real2(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    what: &str,
    f32_fn: impl Fn(&[f32], &[f32]) -> Vec<f32>,
    f64_fn: impl Fn(&[f64], &[f64]) -> Vec<f64>,
) -> candle_core::Result<CpuStorage> {
    fn same_len<'a, T>(
        (a, b): (&'a [T], &'a [T]),
        what: &str,
    ) -> candle_core::Result<(&'a [T], &'a [T])> {
        if a.len() != b.len() {
            candle_core::bail!("{what}: inputs of {} and {} elements", a.len(), b.len());
        }
        Ok((a, b))
    }
    Ok(match (s1, s2) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => {
            let (a, b) = same_len((contiguous(a, l1, what)?, contiguous(b, l2, what)?), what)?;
            CpuStorage::F32(f32_fn(a, b))
        }
        (CpuStorage::F64(a), CpuStorage::F64(b)) => {
            let (a, b) = same_len((contiguous(a, l1, what)?, contiguous(b, l2, what)?), what)?;
            CpuStorage::F64(f64_fn(a, b))
        }
        _ => candle_core::bail!("{what}: both inputs must be f32 or both f64"),
    })
}

/// A vector of `n` values written in parallel chunks of [`CHUNK`] by `f(start, chunk)`, which
/// must write every element of its chunk; nothing is filled first (for an element-wise map, a
/// copy or zero-fill of the output is a third of its memory traffic).
fn fill_chunks<T: Send>(n: usize, f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| f(i * CHUNK, chunk));
    // SAFETY: `f` wrote all n elements (every caller's loop covers its whole chunk).
    unsafe { out.set_len(n) };
    out
}

/// A vector of `n` values that `write` fills through a pointer to its buffer, which is not
/// zero-filled first: for the output of a product that does not accumulate, which `gemm` writes
/// without reading (with `read_dst` false it never loads the destination, and an empty inner
/// dimension writes zeros).
///
/// # Safety
/// `write` must write all `n` elements and nothing beyond them.
pub(crate) unsafe fn written_by<T>(n: usize, write: impl FnOnce(*mut T)) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    write(v.as_mut_ptr());
    // SAFETY: the caller's contract: all n elements are written.
    unsafe { v.set_len(n) };
    v
}

/// Element-wise work is split in chunks this long: large enough to amortise scheduling, small
/// enough that two cores share a (rows, 1024) activation.
const CHUNK: usize = 4096;

// GELU with the tanh approximation (GPT-2's `gelu_new`, candle's `gelu`):
// y = x/2 (1 + tanh(u)), u = c (x + k x^3), c = sqrt(2/pi), k = 0.044715.
const GELU_C: f64 = 0.797_884_560_802_865_4;
const GELU_K: f64 = 0.044_715;

fn gelu_fwd<T: Real>(x: &[T]) -> Vec<T> {
    let (c, k, half, one) = (T::of(GELU_C), T::of(GELU_K), T::of(0.5), T::of(1.0));
    fill_chunks(x.len(), |at, ys| {
        crate::with_avx512!(for (y, &x) in ys.iter_mut().zip(&x[at..]) {
            let u = c.mul(x + k.mul(x.mul(x).mul(x)));
            y.write(half.mul(x).mul(one + u.tanh()));
        })
    })
}

/// dy/dx = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 k x^2), times the incoming gradient.
fn gelu_bwd<T: Real>(x: &[T], g: &[T]) -> Vec<T> {
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

struct Gelu;

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

struct GeluBackward;

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

/// Which normalisation a [`Norm`] computes over the last dim.
#[derive(Debug, Clone, Copy)]
pub(crate) enum NormKind {
    /// `(x - mean) / sqrt(var + eps)`: LayerNorm without its affine part.
    Layer,
    /// `x / sqrt(mean(x^2) + eps)`: RMSNorm without its gain.
    Rms,
}

/// The per-row statistics: (mean subtracted, 1 / sqrt(second moment + eps)).
fn norm_stats<T: Real>(row: &[T], kind: NormKind, eps: T) -> (T, T) {
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

fn norm_fwd<T: Real>(x: &[T], n: usize, kind: NormKind, eps: f64) -> Vec<T> {
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
fn norm_bwd<T: Real>(x: &[T], g: &[T], n: usize, kind: NormKind, eps: f64) -> Vec<T> {
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

struct Norm {
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

struct NormBackward {
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

// Rotary position embedding, fused with the transpose attention wants: x (b, t, h, d) in,
// (b, h, t, d) out, `out[j] = x[j] c[j] + x[j ^ half] s[j]` with the gathered tables
// c = [cos | cos], s = [-sin | sin] of (b, t, 1, d). The backward is the same map with s negated
// and the transpose undone: d x[k] = g[k] c[k] - g[k ^ half] s[k] (swapping halves is its own
// inverse, and s at the swapped index is -s). One pass each way instead of two narrows, a cat,
// two broadcast products, a sum and a transpose copy, and their backward.

/// Which way a rope pass reads and writes: (b, t, h, d) -> (b, h, t, d) forward, back for the
/// gradient.
#[derive(Clone, Copy, PartialEq)]
enum RopeDir {
    Forward,
    Backward,
}

fn rope_rows<T: Real>(
    src: &[T],
    cos: &[T],
    sin: &[T],
    (_, t, h, d): (usize, usize, usize, usize),
    dir: RopeDir,
) -> Vec<T> {
    let half = d / 2;
    let mut out = vec![T::ZERO; src.len()];
    // One output row of d values per (bi, hi, ti) forward, per (bi, ti, hi) backward.
    out.par_chunks_mut(d).enumerate().for_each(|(r, row)| {
        let (bi, ti, hi) = match dir {
            RopeDir::Forward => (r / (h * t), r % t, (r / t) % h),
            RopeDir::Backward => (r / (t * h), (r / h) % t, r % h),
        };
        let from = match dir {
            RopeDir::Forward => ((bi * t + ti) * h + hi) * d,
            RopeDir::Backward => ((bi * h + hi) * t + ti) * d,
        };
        let x = &src[from..from + d];
        let at = (bi * t + ti) * d;
        let (c, s) = (&cos[at..at + d], &sin[at..at + d]);
        let rotate = |out: &mut [T], x: &[T], swapped: &[T], c: &[T], s: &[T]| {
            let ins = x.iter().zip(swapped).zip(c.iter().zip(s));
            for (o, ((&x, &swapped), (&c, &s))) in out.iter_mut().zip(ins) {
                let term = swapped.mul(s);
                *o = x.mul(c)
                    + if dir == RopeDir::Forward {
                        term
                    } else {
                        T::ZERO - term
                    };
            }
        };
        // Each half of the row takes the other half as its rotated partner: two straight loops,
        // where one loop with the partner's index chosen per element stayed scalar.
        let (r1, r2) = row.split_at_mut(half);
        let (x1, x2) = x.split_at(half);
        crate::with_avx2!({
            rotate(r1, x1, x2, &c[..half], &s[..half]);
            rotate(r2, x2, x1, &c[half..], &s[half..]);
        });
    });
    out
}

struct Rope(RopeDir);

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "sft-rope"
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
        let dims = l1.dims();
        // Forward takes (b, t, h, d), backward its gradient (b, h, t, d).
        let (b, t, h, d) = match self.0 {
            RopeDir::Forward => (dims[0], dims[1], dims[2], dims[3]),
            RopeDir::Backward => (dims[0], dims[2], dims[1], dims[3]),
        };
        let shape = match self.0 {
            RopeDir::Forward => Shape::from((b, h, t, d)),
            RopeDir::Backward => Shape::from((b, t, h, d)),
        };
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(s)) => {
                CpuStorage::F32(rope_rows(
                    contiguous(x, l1, "rope input")?,
                    contiguous(c, l2, "rope cos")?,
                    contiguous(s, l3, "rope sin")?,
                    (b, t, h, d),
                    self.0,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(c), CpuStorage::F64(s)) => {
                CpuStorage::F64(rope_rows(
                    contiguous(x, l1, "rope input")?,
                    contiguous(c, l2, "rope cos")?,
                    contiguous(s, l3, "rope sin")?,
                    (b, t, h, d),
                    self.0,
                ))
            }
            _ => candle_core::bail!("rope: input and tables must all be f32 or all f64"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The tables are constants of the positions.
        Ok((Some(rope_backward(grad, cos, sin)?), None, None))
    }
}

/// `x` (b, t, h, d) rotated by the gathered tables (b, t, 1, d) and returned as (b, h, t, d),
/// contiguous; `None` when the fused kernel does not apply (the caller composes it then).
pub(crate) fn rope_heads_first(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    let (b, t, _, d) = x.dims4()?;
    let tables_fit = |m: &Tensor| m.dims() == [b, t, 1, d] && m.dtype() == x.dtype();
    if !fusable(x) || d % 2 != 0 || !tables_fit(cos) || !tables_fit(sin) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope(RopeDir::Forward),
    )?))
}

// SwiGLU's product silu(g) * u, with silu(g) = g sigmoid(g):
// d g = grad u sigmoid(g) (1 + g (1 - sigmoid(g))), d u = grad silu(g).

/// 1 / (1 + e^-x), branch-free so loops over it vectorise (random signs made a branch on x
/// mispredict half the time). No overflow trouble: `exp_f32` clamps its input (e^88.7 is
/// finite), and an f64 `exp` that overflows to infinity gives exactly 0.
#[inline]
fn sigmoid<T: Real>(x: T) -> T {
    let one = T::of(1.0);
    one.div(one + (T::ZERO - x).exp())
}

fn silu_mul_fwd<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
    fill_chunks(g.len(), |at, out| {
        crate::with_avx512!(
            for ((o, &g), &u) in out.iter_mut().zip(&g[at..]).zip(&u[at..]) {
                o.write(g.mul(sigmoid(g)).mul(u));
            }
        )
    })
}

/// Both gradients in one pass, stacked: `[d gate; d up]`, each of the inputs' size.
fn silu_mul_bwd<T: Real>(g: &[T], u: &[T], grad: &[T]) -> Vec<T> {
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

struct SiluMul;

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

struct SiluMulBackward;

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

/// Whether `x` can take a fused kernel: on the CPU, f32 or f64.
pub(crate) fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

// Residual dropout, `x + dropout(h)`, as one op that draws its own mask: as `Dropout::apply`
// and an addition it was two graph nodes, a mask tensor drawn on one thread, a multiplication
// and an addition each way, and one more gradient edge for candle's backward.
struct ResidualDropout(Dropout);

fn residual_dropout_fwd<T: Real>(d: &Dropout, x: &[T], h: &[T]) -> Vec<T> {
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

struct MaskMul(Dropout);

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

    /// The mask is a constant: the gradient is masked the same way.
    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(dropout_backward(&self.0, grad)?))
    }
}

/// `dropout(x)`: fused on the CPU (f32, f64), else [`Dropout::apply`]; the same mask either way.
pub(crate) fn dropout(x: &Tensor, d: &Dropout) -> Result<Tensor> {
    if d.p <= 0.0 {
        Ok(x.clone())
    } else if fusable(x) {
        Ok(x.contiguous()?.apply_op1(MaskMul(*d))?)
    } else {
        d.apply(x)
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

// The backward halves of the fused ops as plain functions, for candle's backward (the ops'
// `bwd`) and for the models' own backward pass alike. Each expects the fused forward's inputs
// (CPU f32 or f64).

/// The gradient of [`gelu`]'s input.
pub(crate) fn gelu_backward(x: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)
}

/// The gradient of `h` in [`residual_dropout`] (`x`'s is the incoming gradient itself).
pub(crate) fn dropout_backward(d: &Dropout, grad: &Tensor) -> candle_core::Result<Tensor> {
    grad.contiguous()?.apply_op1_no_bwd(&MaskMul(*d))
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

/// The gradient of [`rope_heads_first`]'s input, (b, t, h, d), from its output's (b, h, t, d).
pub(crate) fn rope_backward(
    grad: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<Tensor> {
    grad.contiguous()?
        .apply_op3_no_bwd(cos, sin, &Rope(RopeDir::Backward))
}

/// The rows of `src` (n, h) summed per id of `ids` (n): the distinct ids in order of first
/// appearance, and their sums (distinct, h), each starting from zero and adding its rows in
/// order, as `zeros.index_add(ids, src)` sums them.
pub(crate) fn sum_rows_by_id(ids: &Tensor, src: &Tensor) -> Result<(Vec<u32>, Tensor)> {
    fn sums<T: Element>(ids: &[u32], src: &[T], h: usize) -> (Vec<u32>, Vec<T>) {
        let mut slot = std::collections::HashMap::with_capacity(ids.len());
        let mut distinct = Vec::new();
        let mut out: Vec<T> = Vec::new();
        for (&id, row) in ids.iter().zip(src.chunks(h)) {
            let k = *slot.entry(id).or_insert_with(|| {
                distinct.push(id);
                out.resize(out.len() + h, T::ZERO);
                distinct.len() - 1
            });
            for (o, &x) in out[k * h..(k + 1) * h].iter_mut().zip(row) {
                *o += x;
            }
        }
        (distinct, out)
    }
    let ids_v = ids.flatten_all()?.to_vec1::<u32>()?;
    let (n, h) = src.dims2()?;
    if ids_v.len() != n {
        return Err(candle_core::Error::Msg(format!("{} ids for {n} rows", ids_v.len())).into());
    }
    let src = src.contiguous()?;
    let (s, l) = src.storage_and_layout();
    let dev = src.device();
    let (distinct, t) = match cpu(&s)? {
        CpuStorage::F32(v) => {
            let (d, o) = sums(&ids_v, contiguous(v, l, "row sums")?, h);
            let k = d.len();
            (d, Tensor::from_vec(o, (k, h), dev)?)
        }
        CpuStorage::F64(v) => {
            let (d, o) = sums(&ids_v, contiguous(v, l, "row sums")?, h);
            let k = d.len();
            (d, Tensor::from_vec(o, (k, h), dev)?)
        }
        _ => return Err(candle_core::Error::Msg("row sums: only f32 and f64".into()).into()),
    };
    Ok((distinct, t))
}

/// `dst[ids[i]] += rows[i]` in place, for distinct `ids`; `dst` must be a tensor nothing else
/// reads (a gradient being built, never a weight).
pub(crate) fn add_rows_in_place(dst: &Tensor, ids: &[u32], rows: &Tensor) -> Result<()> {
    struct AddRows<'a>(&'a [u32]);
    impl candle_core::InplaceOp2 for AddRows<'_> {
        fn name(&self) -> &'static str {
            "sft-add-rows"
        }
        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> candle_core::Result<()> {
            fn add<T: Real>(dst: &mut [T], ids: &[u32], rows: &[T], h: usize) {
                for (&id, row) in ids.iter().zip(rows.chunks(h)) {
                    let at = id as usize * h;
                    for (d, &x) in dst[at..at + h].iter_mut().zip(row) {
                        *d = *d + x;
                    }
                }
            }
            let (Some((d0, d1)), &[_, h]) = (l1.contiguous_offsets(), l1.dims()) else {
                candle_core::bail!("add rows: the destination must be a contiguous matrix");
            };
            if l2.dims() != [self.0.len(), h] {
                candle_core::bail!("add rows: {:?} rows for {} ids", l2.dims(), self.0.len());
            }
            match (s1, s2) {
                (CpuStorage::F32(d), CpuStorage::F32(r)) => {
                    add(&mut d[d0..d1], self.0, contiguous(r, l2, "add rows")?, h)
                }
                (CpuStorage::F64(d), CpuStorage::F64(r)) => {
                    add(&mut d[d0..d1], self.0, contiguous(r, l2, "add rows")?, h)
                }
                _ => candle_core::bail!("add rows: both must be f32 or both f64"),
            }
            Ok(())
        }
    }
    let rows = rows.to_dtype(dst.dtype())?.contiguous()?;
    Ok(dst.inplace_op2(&rows, &AddRows(ids))?)
}

/// GELU (tanh approximation), fused on the CPU.
pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    if fusable(x) {
        Ok(x.contiguous()?.apply_op1(Gelu)?)
    } else {
        Ok(x.gelu()?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{grads, max_diff, values};
    use candle_core::{Device, Var};

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
        let diff = max_diff;
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
        assert!(max_diff(&fused, &composed) < 1e-6);
    }

    /// Value and gradient of `sum(f(x) * w)` for a fused op and its candle composition, in f64.
    fn check_fused(
        fused: impl Fn(&Tensor) -> Tensor,
        composed: impl Fn(&Tensor) -> Tensor,
        tol: f64,
    ) {
        let dev = Device::Cpu;
        let (rows, n) = (7, 33);
        let x = Var::from_vec(values(rows * n, 0.53), (rows, n), &dev).unwrap();
        let w = Tensor::from_vec(values(rows * n, 1.7), (rows, n), &dev).unwrap();
        let (yf, yc) = (fused(x.as_tensor()), composed(x.as_tensor()));
        assert!(max_diff(&yf, &yc) < tol, "values {}", max_diff(&yf, &yc));
        let grad = |y: Tensor| {
            (y * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
                .get(x.as_tensor())
                .unwrap()
                .clone()
        };
        let (gf, gc) = (grad(yf), grad(yc));
        assert!(max_diff(&gf, &gc) < tol, "gradients {}", max_diff(&gf, &gc));
        assert!(max_diff(&gf, &gf.zeros_like().unwrap()) > 1e-3);
        // f32 takes the same kernels.
        let x32 = x.as_tensor().to_dtype(DType::F32).unwrap();
        assert!(max_diff(&fused(&x32), &composed(&x32)) < 1e-5);
    }

    #[test]
    fn element_wise_kernels_refuse_inputs_of_different_lengths() {
        let dev = Device::Cpu;
        let a = Tensor::ones(8, DType::F32, &dev).unwrap();
        let b = Tensor::ones(6, DType::F32, &dev).unwrap();
        let err = a.apply_op2_no_bwd(&b, &SiluMul).unwrap_err().to_string();
        assert!(err.contains("inputs of 8 and 6 elements"), "{err}");
    }

    #[test]
    fn residual_dropout_gives_the_compositions_values_and_gradients_bit_for_bit() {
        let dev = Device::Cpu;
        // Several chunks, so the draws of a chunk that seeks its stream are checked too.
        let n = 3 * CHUNK + 77;
        for dtype in [DType::F32, DType::F64] {
            let var = |seed| {
                Var::from_tensor(
                    &Tensor::from_vec(values(n, seed), n, &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                )
                .unwrap()
            };
            let (x, h) = (var(0.53), var(0.91));
            let w = Tensor::from_vec(values(n, 1.7), n, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let d = Dropout {
                p: 0.3,
                seed: 11,
                site: 4,
            };
            let fused = residual_dropout(x.as_tensor(), h.as_tensor(), &d).unwrap();
            let composed = (x.as_tensor() + d.apply(h.as_tensor()).unwrap()).unwrap();
            let bits = |t: &Tensor| -> Vec<u64> {
                let v: Vec<f64> = t.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            };
            assert_eq!(bits(&fused), bits(&composed), "{dtype:?} values");
            let (gf, gc) = (
                grads(&fused, &w, &[&x, &h]),
                grads(&composed, &w, &[&x, &h]),
            );
            for (a, b) in gf.iter().zip(&gc) {
                assert_eq!(bits(a), bits(b), "{dtype:?} gradients");
            }
            let dropped = bits(&gf[1])
                .iter()
                .filter(|&&b| f64::from_bits(b) == 0.0)
                .count();
            assert!(
                (dropped as f64 / n as f64 - 0.3).abs() < 0.02,
                "{dropped} of {n}"
            );
        }
    }

    #[test]
    fn fused_gelu_matches_candle_gelu_and_its_exact_gradient() {
        // candle's own GELU backward rounds its constants (0.0356774, 0.797885, ...), so its
        // gradient is off by ~1e-6; ours is the exact derivative, checked by finite differences.
        check_fused(|x| gelu(x).unwrap(), |x| x.gelu().unwrap(), 1e-5);
        let xs = values(64, 0.29);
        let x = Var::from_vec(xs.clone(), 64, &Device::Cpu).unwrap();
        let g = gelu(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<f64> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        let f = |v: f64| 0.5 * v * (1.0 + (GELU_C * (v + GELU_K * v * v * v)).tanh());
        for (v, g) in xs.iter().zip(g) {
            let h = 1e-6;
            let fd = (f(v + h) - f(v - h)) / (2.0 * h);
            assert!((fd - g).abs() < 1e-8, "x {v}: {g} vs {fd}");
        }
    }

    #[test]
    fn fused_rope_matches_the_composition_and_its_gradient() {
        let dev = Device::Cpu;
        let (b, t, h, d) = (2, 5, 3, 8);
        let x = Var::from_vec(values(b * t * h * d, 0.37), (b, t, h, d), &dev).unwrap();
        let (cs, sn) = (values(b * t * d / 2, 0.91), values(b * t * d / 2, 1.3));
        let half = |v: &[f64], sign: f64| {
            let v = Tensor::from_vec(v.to_vec(), (b, t, 1, d / 2), &dev).unwrap();
            Tensor::cat(&[(&v * sign).unwrap(), v], 3).unwrap()
        };
        let (cos, sin) = (half(&cs, 1.0), half(&sn, -1.0));
        let fused = rope_heads_first(x.as_tensor(), &cos, &sin)
            .unwrap()
            .unwrap();
        let composed = crate::ops::apply_rope(x.as_tensor(), &cos, &sin)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        assert_eq!(fused.dims(), [b, h, t, d]);
        assert!(max_diff(&fused, &composed) < 1e-12);
        let w = Tensor::from_vec(values(b * t * h * d, 1.7), (b, h, t, d), &dev).unwrap();
        let (gf, gc) = (
            grads(&fused, &w, &[&x]).remove(0),
            grads(&composed, &w, &[&x]).remove(0),
        );
        assert!(max_diff(&gf, &gc) < 1e-12, "{}", max_diff(&gf, &gc));
        assert!(max_diff(&gf, &gf.zeros_like().unwrap()) > 1e-3);
        // f32 takes the same kernel; other shapes of table fall back.
        let to32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let f32_out = rope_heads_first(&to32(x.as_tensor()), &to32(&cos), &to32(&sin))
            .unwrap()
            .unwrap();
        assert!(max_diff(&f32_out.to_dtype(DType::F64).unwrap(), &composed) < 1e-5);
        let narrow = cos.narrow(0, 0, 1).unwrap();
        assert!(rope_heads_first(x.as_tensor(), &narrow, &sin)
            .unwrap()
            .is_none());
    }

    #[test]
    fn fused_silu_mul_matches_the_composition_and_its_gradients() {
        let dev = Device::Cpu;
        let (rows, n) = (7, 33);
        // Wide enough (|x| up to ~90) to reach both branches of the stable sigmoid.
        let big: Vec<f64> = values(rows * n, 0.53).iter().map(|v| v * 30.0).collect();
        let gate = Var::from_vec(big, (rows, n), &dev).unwrap();
        let up = Var::from_vec(values(rows * n, 0.71), (rows, n), &dev).unwrap();
        let w = Tensor::from_vec(values(rows * n, 1.7), (rows, n), &dev).unwrap();
        let fused = silu_mul(gate.as_tensor(), up.as_tensor()).unwrap();
        let composed = (gate.as_tensor().silu().unwrap() * up.as_tensor()).unwrap();
        assert!(max_diff(&fused, &composed) < 1e-10);
        let gf = grads(&fused, &w, &[&gate, &up]);
        let gc = grads(&composed, &w, &[&gate, &up]);
        for (f, c) in gf.iter().zip(&gc) {
            assert!(max_diff(f, c) < 1e-10, "{}", max_diff(f, c));
            assert!(max_diff(f, &f.zeros_like().unwrap()) > 1e-3);
        }
        let to32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let f32_out = silu_mul(&to32(gate.as_tensor()), &to32(up.as_tensor())).unwrap();
        assert!(max_diff(&f32_out.to_dtype(DType::F64).unwrap(), &composed) < 1e-4 * 30.0);
    }

    #[test]
    fn fused_norms_match_the_composition_and_their_gradients() {
        let eps = 1e-5;
        let composed_ln = |x: &Tensor| {
            let c = x
                .broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap())
                .unwrap();
            let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            c.broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
                .unwrap()
        };
        check_fused(|x| layer_norm_core(x, eps).unwrap(), composed_ln, 1e-12);
        let composed_rms = |x: &Tensor| {
            let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            x.broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
                .unwrap()
        };
        check_fused(|x| rms_norm_core(x, eps).unwrap(), composed_rms, 1e-12);
    }
}
