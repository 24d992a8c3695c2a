//! Rotary position embedding, fused with the transpose to heads-first layout.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::base::*;
use crate::error::Result;

// Rotary position embedding, fused with the transpose attention wants: x (b, t, h, d) in,
// (b, h, t, d) out, `out[j] = x[j] c[j] + x[j ^ half] s[j]` with the gathered tables
// c = [cos | cos], s = [-sin | sin] of (b, t, 1, d). The backward is the same map with s negated
// and the transpose undone: d x[k] = g[k] c[k] - g[k ^ half] s[k] (swapping halves is its own
// inverse, and s at the swapped index is -s). One pass each way instead of two narrows, a cat,
// two broadcast products, a sum and a transpose copy, and their backward.

/// Which way a rope pass reads and writes: (b, t, h, d) -> (b, h, t, d) forward, back for the
/// gradient.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum RopeDir {
    Forward,
    Backward,
}

pub(super) fn rope_rows<T: Real>(
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

pub(super) struct Rope(RopeDir);

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

/// The gradient of [`rope_heads_first`]'s input, (b, t, h, d), from its output's (b, h, t, d).
pub(crate) fn rope_backward(
    grad: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<Tensor> {
    grad.contiguous()?
        .apply_op3_no_bwd(cos, sin, &Rope(RopeDir::Backward))
}
