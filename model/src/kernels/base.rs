//! What every fused kernel shares: typed access to CPU storage, the `gemm` call, the
//! parallel fill and sum helpers, and `ParamOp`/`WithParams`, an op over an input and its
//! parameters written once over f32/f64 and run as candle's custom op.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::error::Result;
pub(crate) use crate::math::Real;

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

pub(crate) fn contiguous<'a, T>(
    v: &'a [T],
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// Runs `f(x)` for f32 or f64 storage; other dtypes are the caller's business.
pub(crate) fn map_real(
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
pub(crate) fn map_real2(
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
pub(crate) fn fill_chunks<T: Send>(
    n: usize,
    f: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
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
pub(crate) const CHUNK: usize = 4096;

/// Whether `x` can take a fused kernel: on the CPU, f32 or f64.
pub(crate) fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}
