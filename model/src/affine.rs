//! The row-wise affine maps of a transformer, `x * w + b` over the last dim (a linear layer's
//! bias, LayerNorm's gain and bias, RMSNorm's gain), as one op with a hand-written backward.
//!
//! candle's broadcast ops get there in one pass forward, but backward reduces the gradient over
//! every row with `sum_keepdim`, a strided loop per column: on the nanoGPT configuration it was
//! 13% of a training step, more than the element-wise work it serves. Here the column sums run
//! over contiguous rows in fixed blocks, summed in a fixed order, so the result does not depend on
//! the thread count; the input's gradient is `g * w`, or the gradient itself (no copy) for a bias.

use candle_core::{CpuStorage, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::{cpu, fusable, slice_of, Element, Input, ParamOp, Real, WithParams};
use crate::Result;

/// Rows per block of the column sums: partial sums stay small, blocks many enough to share.
const ROWS: usize = 64;

/// `x * w + b` per row of `n` values; `w`, `b` optional.
fn forward<T: Real>(x: &[T], w: Option<&[T]>, b: Option<&[T]>, n: usize) -> Vec<T> {
    let mut y = x.to_vec();
    y.par_chunks_mut(n * ROWS).for_each(|rows| {
        for row in rows.chunks_mut(n) {
            if let Some(w) = w {
                row.iter_mut().zip(w).for_each(|(y, &w)| *y = y.mul(w));
            }
            if let Some(b) = b {
                row.iter_mut().zip(b).for_each(|(y, &b)| *y = *y + b);
            }
        }
    });
    y
}

/// Column sums of `g * x` (when `x` is given) and of `g`, over rows of `n` values.
pub(crate) fn column_sums<T: Real>(g: &[T], x: Option<&[T]>, n: usize) -> (Vec<T>, Vec<T>) {
    let blocks: Vec<(Vec<T>, Vec<T>)> = g
        .par_chunks(n * ROWS)
        .enumerate()
        .map(|(i, g)| {
            let mut gx = vec![T::ZERO; if x.is_some() { n } else { 0 }];
            let mut sum = vec![T::ZERO; n];
            for (r, row) in g.chunks(n).enumerate() {
                if let Some(x) = x {
                    let at = (i * ROWS + r) * n;
                    let xr = &x[at..at + n];
                    gx.iter_mut()
                        .zip(row.iter().zip(xr))
                        .for_each(|(s, (&g, &x))| *s = *s + g.mul(x));
                }
                sum.iter_mut().zip(row).for_each(|(s, &g)| *s = *s + g);
            }
            (gx, sum)
        })
        .collect();
    let add = |mut a: Vec<T>, b: &Vec<T>| {
        a.iter_mut().zip(b).for_each(|(a, &b)| *a = *a + b);
        a
    };
    let gx = blocks
        .iter()
        .fold(vec![T::ZERO; if x.is_some() { n } else { 0 }], |a, b| {
            add(a, &b.0)
        });
    let sum = blocks.iter().fold(vec![T::ZERO; n], |a, b| add(a, &b.1));
    (gx, sum)
}

/// Which parameters the map has; the op's inputs are `x`, then `w`, then `b`, as present.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Params {
    Scale,
    Shift,
    Both,
}

struct Affine(Params);

/// The gradients of `x`, `w` and `b` (as present) from the op's inputs and its output gradient.
fn backward<T: Element>(
    params: Params,
    x: &Tensor,
    w: Option<&Tensor>,
    grad: &Tensor,
) -> candle_core::Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let n = x.dim(candle_core::D::Minus1)?;
    let (gs, gl) = grad.storage_and_layout();
    let g = slice_of::<T>(cpu(&gs)?, gl, "affine: the gradient")?;
    let (xs, xl) = x.storage_and_layout();
    let xv = slice_of::<T>(cpu(&xs)?, xl, "affine: the input")?;
    let dev = x.device();
    let wv = match w {
        Some(w) => Some(w.contiguous()?.flatten_all()?.to_vec1::<T>()?),
        None => None,
    };
    let (gx, sum) = column_sums(g, wv.as_ref().map(|_| xv), n);
    let dx = match &wv {
        Some(w) => Tensor::from_vec(forward(g, Some(w), None, n), x.shape(), dev)?,
        None => grad.clone(),
    };
    let dw = match w {
        Some(w) => Some(Tensor::from_vec(gx, w.shape(), dev)?),
        None => None,
    };
    let db = (params != Params::Scale)
        .then(|| Tensor::from_vec(sum, n, dev))
        .transpose()?;
    Ok((dx, dw, db))
}

fn run<T: Element>(
    x: Input<'_>,
    w: Option<Input<'_>>,
    b: Option<Input<'_>>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let n = *x.1.dims().last().unwrap_or(&1);
    let xv = slice_of::<T>(x.0, x.1, "affine: the input")?;
    let w = w
        .map(|(s, l)| slice_of::<T>(s, l, "affine: the scale"))
        .transpose()?;
    let b = b
        .map(|(s, l)| slice_of::<T>(s, l, "affine: the shift"))
        .transpose()?;
    Ok((T::storage(forward(xv, w, b, n)), x.1.shape().clone()))
}

impl ParamOp for Affine {
    const NAME: &'static str = "sft-affine";

    fn forward<T: Element>(
        &self,
        x: Input<'_>,
        params: &[Input<'_>],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (w, b) = match self.0 {
            Params::Scale => (Some(params[0]), None),
            Params::Shift => (None, Some(params[0])),
            Params::Both => (Some(params[0]), params.get(1).copied()),
        };
        run::<T>(x, w, b)
    }

    fn backward<T: Element>(
        &self,
        x: &Tensor,
        params: &[&Tensor],
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<Option<Tensor>>)> {
        let w = (self.0 != Params::Shift).then_some(params[0]);
        let (dx, dw, db) = backward::<T>(self.0, x, w, grad)?;
        // The shift's gradient in the shape the shift came in.
        let shift = params.last().expect("one or two parameters");
        let db = db.map(|db| db.reshape(shift.shape())).transpose()?;
        Ok((
            dx,
            match self.0 {
                Params::Scale => vec![dw],
                Params::Shift => vec![db],
                Params::Both => vec![dw, db],
            },
        ))
    }
}

/// `x * w + b` over the last dim of `x`, where `w` and `b` hold as many values as that dim.
pub(crate) fn affine(x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    let fits = |p: Option<&Tensor>| {
        p.is_none_or(|p| {
            p.elem_count() == n && p.dtype() == x.dtype() && p.device().same_device(x.device())
        })
    };
    if fusable(x) && fits(w) && fits(b) {
        let x = x.contiguous()?;
        return Ok(match (w, b) {
            (Some(w), Some(b)) => x.apply_op3(
                &w.contiguous()?,
                &b.contiguous()?,
                WithParams(Affine(Params::Both)),
            )?,
            (Some(w), None) => x.apply_op2(&w.contiguous()?, WithParams(Affine(Params::Scale)))?,
            (None, Some(b)) => x.apply_op2(&b.contiguous()?, WithParams(Affine(Params::Shift)))?,
            (None, None) => x,
        });
    }
    let y = match w {
        Some(w) => x.broadcast_mul(w)?,
        None => x.clone(),
    };
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::affine;
    use crate::testing::{max_diff, values};

    #[test]
    fn fused_affine_matches_broadcast_ops_and_their_gradients() {
        let dev = Device::Cpu;
        // 150 rows: two full blocks of the column sums and a partial one.
        let (b, t, n) = (3, 50, 24);
        let x = Var::from_vec(values(b * t * n, 0.37), (b, t, n), &dev).unwrap();
        let w = Var::from_vec(values(n, 0.91), n, &dev).unwrap();
        let bias = Var::from_vec(values(n, 1.3), n, &dev).unwrap();
        let g = Tensor::from_vec(values(b * t * n, 1.7), (b, t, n), &dev).unwrap();
        for (use_w, use_b) in [(true, true), (true, false), (false, true)] {
            let (wt, bt) = (
                use_w.then_some(w.as_tensor()),
                use_b.then_some(bias.as_tensor()),
            );
            let fused = affine(&x, wt, bt).unwrap();
            let mut composed = x.as_tensor().clone();
            if let Some(w) = wt {
                composed = composed.broadcast_mul(w).unwrap();
            }
            if let Some(b) = bt {
                composed = composed.broadcast_add(b).unwrap();
            }
            assert!(max_diff(&fused, &composed) < 1e-14);
            let grads = |y: &Tensor| (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gc) = (grads(&fused), grads(&composed));
            let mut checked = 0;
            for v in [&x, &w, &bias] {
                match (gf.get(v.as_tensor()), gc.get(v.as_tensor())) {
                    (Some(f), Some(c)) => {
                        assert_eq!(f.dims(), c.dims());
                        assert!(max_diff(f, c) < 1e-12, "{}", max_diff(f, c));
                        assert!(max_diff(f, &f.zeros_like().unwrap()) > 1e-3);
                        checked += 1;
                    }
                    (None, None) => {}
                    _ => panic!(
                        "the fused op and the composition differ in which inputs get a gradient"
                    ),
                }
            }
            assert_eq!(checked, 1 + use_w as usize + use_b as usize);
        }
    }

    #[test]
    fn fused_affine_gradients_do_not_depend_on_the_thread_count() {
        let dev = Device::Cpu;
        let (rows, n) = (1000, 40);
        let f32v = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        let x = Var::from_vec(f32v(values(rows * n, 0.37)), (rows, n), &dev).unwrap();
        let w = Var::from_vec(f32v(values(n, 0.91)), n, &dev).unwrap();
        let b = Var::from_vec(f32v(values(n, 1.3)), n, &dev).unwrap();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let y = affine(&x, Some(&w), Some(&b)).unwrap();
                let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                [&w, &b].map(|v| g.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap())
            })
        };
        assert!(run(1) == run(4));
    }
}
