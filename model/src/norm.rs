//! LayerNorm and RMSNorm with their gain (and shift) in one op: `(x - mean) * inv * w + b` per
//! row, with a hand-written backward that recomputes each row's statistics.
//!
//! As the normalisation kernel followed by the affine op, a norm would be two graph nodes, and the
//! normalised rows kept for backward; here it is one node keeping only its input, and
//! backward makes one pass per row for the input's gradient plus the gain's and shift's column
//! sums (in fixed blocks of rows, summed in order, so independent of the thread count).

use candle_core::{CpuStorage, Shape, Tensor, D};
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::{
    cpu, fusable, slice_of, sum_in_order, Element, Input, NormKind, ParamOp, Real, WithParams,
    SUM_ROWS,
};
use crate::math::lanes;

/// Mean (0 for RMSNorm) and `1 / sqrt(variance + eps)` of a row, in eight lanes.
#[inline]
fn stats<T: Real>(row: &[T], kind: NormKind, eps: T) -> (T, T) {
    let n = T::of(row.len() as f64);
    let add = |a: T, b: T| a + b;
    let mean = match kind {
        NormKind::Layer => lanes(row, T::ZERO, add, add).div(n),
        NormKind::Rms => T::ZERO,
    };
    let sq = |a: T, v: T| a + (v - mean).mul(v - mean);
    let m2 = lanes(row, T::ZERO, sq, add).div(n);
    (mean, T::of(1.0).div((m2 + eps).sqrt()))
}

/// `(x - mean) * inv * w + b` per row of `w.len()` values.
fn forward_rows<T: Real>(x: &[T], w: &[T], b: Option<&[T]>, kind: NormKind, eps: f64) -> Vec<T> {
    let (n, eps) = (w.len(), T::of(eps));
    let mut y = x.to_vec();
    y.par_chunks_mut(n * SUM_ROWS).for_each(|rows| {
        for row in rows.chunks_mut(n) {
            let (mean, inv) = stats(row, kind, eps);
            for (j, v) in row.iter_mut().enumerate() {
                let h = (*v - mean).mul(inv).mul(w[j]);
                *v = match b {
                    Some(b) => h + b[j],
                    None => h,
                };
            }
        }
    });
    y
}

/// Partial sums of `g * x_hat` (the gain's gradient) and of `g` (the shift's), per block of rows.
type Partials<T> = Vec<(Vec<T>, Vec<T>)>;

/// The input's gradient and, per block of rows, the partial column sums. With x_hat the
/// normalised row and h = g w: LayerNorm dx = inv (h - mean(h) - x_hat mean(h x_hat)), RMSNorm
/// dx = inv (h - x_hat mean(h x_hat)).
fn backward_rows<T: Real>(
    x: &[T],
    w: &[T],
    g: &[T],
    kind: NormKind,
    eps: f64,
) -> (Vec<T>, Partials<T>) {
    let (n, eps) = (w.len(), T::of(eps));
    let nn = T::of(n as f64);
    let mut dx = g.to_vec();
    let partials = dx
        .par_chunks_mut(n * SUM_ROWS)
        .zip(x.par_chunks(n * SUM_ROWS))
        .map(|(gs, xs)| {
            let (mut dw, mut db) = (vec![T::ZERO; n], vec![T::ZERO; n]);
            for (g, x) in gs.chunks_mut(n).zip(xs.chunks(n)) {
                let (mean, inv) = stats(x, kind, eps);
                let (mut sum_h, mut sum_hy) = (T::ZERO, T::ZERO);
                for j in 0..n {
                    let y = (x[j] - mean).mul(inv);
                    dw[j] = dw[j] + g[j].mul(y);
                    db[j] = db[j] + g[j];
                    let h = g[j].mul(w[j]);
                    sum_h = sum_h + h;
                    sum_hy = sum_hy + h.mul(y);
                }
                let mean_h = match kind {
                    NormKind::Layer => sum_h.div(nn),
                    NormKind::Rms => T::ZERO,
                };
                let mean_hy = sum_hy.div(nn);
                for j in 0..n {
                    let y = (x[j] - mean).mul(inv);
                    g[j] = inv.mul(g[j].mul(w[j]) - mean_h - y.mul(mean_hy));
                }
            }
            (dw, db)
        })
        .collect();
    (dx, partials)
}

#[derive(Debug, Clone, Copy)]
struct NormAffine {
    kind: NormKind,
    eps: f64,
}

impl NormAffine {
    fn run<T: Element>(
        &self,
        x: Input<'_>,
        w: Input<'_>,
        b: Option<Input<'_>>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let xv = slice_of::<T>(x.0, x.1, "norm: the input")?;
        let w = slice_of::<T>(w.0, w.1, "norm: the gain")?;
        let b = b
            .map(|(s, l)| slice_of::<T>(s, l, "norm: the shift"))
            .transpose()?;
        let y = forward_rows(xv, w, b, self.kind, self.eps);
        Ok((T::storage(y), x.1.shape().clone()))
    }

    /// The gradients of x, the gain and (with `shift`) the shift.
    fn gradients<T: Element>(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
        shift: bool,
    ) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let xv = slice_of::<T>(cpu(&xs)?, xl, "norm: the input")?;
        let wv = slice_of::<T>(cpu(&ws)?, wl, "norm: the gain")?;
        let g = slice_of::<T>(cpu(&gs)?, gl, "norm: the gradient")?;
        let n = wv.len();
        let (dx, partials) = backward_rows(xv, wv, g, self.kind, self.eps);
        let dev = x.device();
        Ok((
            Tensor::from_vec(dx, x.shape(), dev)?,
            Tensor::from_vec(
                sum_in_order(partials.iter().map(|p| &p.0), n),
                w.shape(),
                dev,
            )?,
            shift
                .then(|| {
                    Tensor::from_vec(
                        sum_in_order(partials.iter().map(|p| &p.1), n),
                        w.shape(),
                        dev,
                    )
                })
                .transpose()?,
        ))
    }
}

impl ParamOp for NormAffine {
    const NAME: &'static str = "sft-norm-affine";

    fn forward<T: Element>(
        &self,
        x: Input<'_>,
        params: &[Input<'_>],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run::<T>(x, params[0], params.get(1).copied())
    }

    fn backward<T: Element>(
        &self,
        x: &Tensor,
        params: &[&Tensor],
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<Option<Tensor>>)> {
        let (dx, dw, db) = self.gradients::<T>(x, params[0], grad, params.len() == 2)?;
        Ok((
            dx,
            [Some(dw)]
                .into_iter()
                .chain(params.get(1).map(|_| db))
                .collect(),
        ))
    }
}

/// The norm of `kind` over the last dim of `x`, times `w`, plus `b`, in one op; `None` where it
/// does not apply (another device or dtype, parameters of another length): the caller composes.
pub(crate) fn norm_affine(
    x: &Tensor,
    kind: NormKind,
    eps: f64,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let n = x.dim(D::Minus1)?;
    let fits = |p: &Tensor| {
        p.elem_count() == n && p.dtype() == x.dtype() && p.device().same_device(x.device())
    };
    if !fusable(x) || !fits(w) || !b.is_none_or(fits) || n == 0 {
        return Ok(None);
    }
    Ok(Some(WithParams::apply(NormAffine { kind, eps }, x, w, b)?))
}

/// The gradients of [`norm_affine`]'s input, gain and (given the shift) shift.
pub(crate) fn norm_affine_backward(
    x: &Tensor,
    kind: NormKind,
    eps: f64,
    w: &Tensor,
    b: Option<&Tensor>,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    WithParams(NormAffine { kind, eps }).gradients(x, (w, b), grad)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::norm_affine;
    use crate::kernels::NormKind;
    use crate::testing::{max_diff, on_threads, values};

    #[test]
    fn fused_norms_with_their_gains_match_the_two_ops_and_their_gradients() {
        let dev = Device::Cpu;
        // 150 rows: two full blocks of the column sums and a partial one.
        let (rows, n) = (150, 24);
        let x = Var::from_vec(values(rows * n, 0.37), (rows, n), &dev).unwrap();
        let w = Var::from_vec(values(n, 0.91), n, &dev).unwrap();
        let b = Var::from_vec(values(n, 1.3), n, &dev).unwrap();
        let g = Tensor::from_vec(values(rows * n, 1.7), (rows, n), &dev).unwrap();
        for (kind, shift) in [
            (NormKind::Layer, true),
            (NormKind::Layer, false),
            (NormKind::Rms, false),
        ] {
            let bt = shift.then_some(b.as_tensor());
            let fused = norm_affine(&x, kind, 1e-5, &w, bt).unwrap().unwrap();
            let core = match kind {
                NormKind::Layer => crate::kernels::layer_norm_core(&x, 1e-5).unwrap(),
                NormKind::Rms => crate::kernels::rms_norm_core(&x, 1e-5).unwrap(),
            };
            let scaled = core.broadcast_mul(&w).unwrap();
            let composed = match bt {
                Some(b) => scaled.broadcast_add(b).unwrap(),
                None => scaled,
            };
            assert!(max_diff(&fused, &composed) < 1e-12);
            let grads = |y: &Tensor| (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gc) = (grads(&fused), grads(&composed));
            for v in [&x, &w, &b] {
                match (gf.get(v.as_tensor()), gc.get(v.as_tensor())) {
                    (Some(f), Some(c)) => {
                        assert!(max_diff(f, c) < 1e-11, "{}", max_diff(f, c));
                        assert!(max_diff(f, &f.zeros_like().unwrap()) > 1e-3);
                    }
                    (None, None) => assert!(!shift),
                    _ => panic!("fused and composed differ in which inputs get a gradient"),
                }
            }
        }
        let half = x.to_dtype(DType::BF16).unwrap();
        let wh = w.to_dtype(DType::BF16).unwrap();
        assert!(norm_affine(&half, NormKind::Rms, 1e-5, &wh, None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn fused_norm_gradients_do_not_depend_on_the_thread_count() {
        let dev = Device::Cpu;
        let f32v = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        let x = Var::from_vec(f32v(values(700 * 32, 0.37)), (700, 32), &dev).unwrap();
        let w = Var::from_vec(f32v(values(32, 0.91)), 32, &dev).unwrap();
        let b = Var::from_vec(f32v(values(32, 1.3)), 32, &dev).unwrap();
        let run = |threads: usize| {
            on_threads(threads, || {
                let y = norm_affine(&x, NormKind::Layer, 1e-5, &w, Some(&b))
                    .unwrap()
                    .unwrap();
                let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                [&x, &w, &b].map(|v| {
                    let t = g.get(v.as_tensor()).unwrap();
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                })
            })
        };
        assert!(run(1) == run(3));
    }
}
