//! A dense layer, `x W^T + b` over the last dim of `x`, as one op with a hand-written backward.
//!
//! As candle ops a dense layer is five graph nodes (flatten to 2-D, transpose the weight,
//! matmul, add the bias, restore the shape), and candle's backward gives each node's input a
//! zero-filled gradient buffer plus an addition: on the small models, zero-filling and those
//! additions take 15% of a step. Here it is one node: forward one product (the bias is the
//! product's starting value), backward the two products of the gradients and the bias's column
//! sums, all through `gemm` with the same threading candle's matmul uses.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor, D};
use gemm::Parallelism;

use crate::dropout::Dropout;
use crate::error::Result;
use crate::kernels::{
    column_sums, cpu, fusable, matmul, slice_of, written_by, Element, Input, ParamOp, WithParams,
};
use crate::quant::QWeight;
use crate::weights::Weight;
use rayon::prelude::*;

/// Split every product over the current pool, as candle's matmul does.
fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `weight_grad: false` for a weight candle's backward does not track (a frozen LoRA base):
/// its product is not computed.
struct Dense {
    weight_grad: bool,
}

/// (rows, n_in, n_out) of `x` (.., n_in) against `w` (n_out, n_in).
fn dims(x: &Layout, w: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let n_in = *x.dims().last().unwrap_or(&0);
    let &[n_out, w_in] = w.dims() else {
        candle_core::bail!("dense: the weight must be 2-D, got {:?}", w.dims());
    };
    if w_in != n_in {
        candle_core::bail!("dense: input {:?} against weight {:?}", x.dims(), w.dims());
    }
    Ok((x.shape().elem_count() / n_in.max(1), n_in, n_out))
}

fn forward<T: Element>(
    x: Input<'_>,
    w: Input<'_>,
    b: Option<Input<'_>>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let dims = dims(x.1, w.1)?;
    let xv = slice_of::<T>(x.0, x.1, "dense: the input")?;
    let wv = slice_of::<T>(w.0, w.1, "dense: the weight")?;
    let bv = b
        .map(|(s, l)| slice_of::<T>(s, l, "dense: the bias"))
        .transpose()?;
    let y = dense_rows(xv, wv, bv, dims);
    Ok((T::storage(y), output_shape(x.1, dims.2)))
}

/// `x W^T + b` for x (rows, n_in) and W (n_out, n_in), contiguous: the bias is the product's
/// starting value.
fn dense_rows<T: Element>(
    xv: &[T],
    wv: &[T],
    bias: Option<&[T]>,
    (rows, n_in, n_out): (usize, usize, usize),
) -> Vec<T> {
    let product = |y: *mut T, accumulate: bool| {
        // SAFETY: y has room for rows x n_out, x is rows x n_in, w n_out x n_in, all contiguous.
        unsafe {
            matmul(
                (rows, n_out, n_in),
                (y, n_out, 1),
                accumulate,
                (xv.as_ptr(), n_in, 1),
                (wv.as_ptr(), 1, n_in),
                T::of(1.0),
                parallelism(),
            );
        }
    };
    match bias {
        Some(b) => {
            let mut y = b.repeat(rows);
            product(y.as_mut_ptr(), true);
            y
        }
        // SAFETY: a product that does not accumulate writes every element.
        None => unsafe { written_by(rows * n_out, |y| product(y, false)) },
    }
}

/// The shape of a dense layer's output: the input's, with `n_out` last.
fn output_shape(x: &Layout, n_out: usize) -> Shape {
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("a dense input has a last dim") = n_out;
    Shape::from(shape)
}

/// dw = g^T x (or dw += g^T x when `accumulate`), for g (rows, n_out) and x (rows, n_in).
///
/// # Safety
/// `dw` must address n_out x n_in elements, and hold values when accumulating.
unsafe fn weight_grad<T: Element>(
    dw: *mut T,
    accumulate: bool,
    g: &[T],
    x: &[T],
    (rows, n_out, n_in): (usize, usize, usize),
) {
    debug_assert!(g.len() == rows * n_out && x.len() == rows * n_in);
    // In blocks of output rows: `gemm` packs g^T whole into a buffer of its own (rows x n_out:
    // 127 MiB for a chunk of a 151,936-token output layer), and those buffers fragmented the
    // heap; a block's is a few MiB. Each output element's sum over the rows is the same.
    for start in (0..n_out).step_by(WEIGHT_GRAD_ROWS) {
        let len = WEIGHT_GRAD_ROWS.min(n_out - start);
        // SAFETY: g and x are contiguous with the dims given, and the block's rows of dw and
        // columns of g lie inside them; dw is the caller's.
        unsafe {
            matmul(
                (len, n_in, rows),
                (dw.add(start * n_in), n_in, 1),
                accumulate,
                (g.as_ptr().add(start), 1, n_out),
                (x.as_ptr(), n_in, 1),
                T::of(1.0),
                parallelism(),
            )
        }
    }
}

/// Output rows per product in [`weight_grad`].
const WEIGHT_GRAD_ROWS: usize = 8192;

/// dx = g w, for g (rows, n_out) and w (n_out, n_in).
fn input_grad<T: Element>(g: &[T], w: &[T], (rows, n_in, n_out): (usize, usize, usize)) -> Vec<T> {
    // SAFETY: g and w are contiguous with the dims given, and the product writes every element
    // of its output (it does not accumulate).
    unsafe {
        written_by(rows * n_in, |dx| {
            matmul(
                (rows, n_in, n_out),
                (dx, n_in, 1),
                false,
                (g.as_ptr(), n_out, 1),
                (w.as_ptr(), n_in, 1),
                T::of(1.0),
                parallelism(),
            )
        })
    }
}

/// [`input_grad`] on tensors: the gradient of a bias-free dense layer's input.
pub(crate) fn dense_input_grad(w: &Tensor, grad: &Tensor) -> Result<Tensor> {
    fn run<T: Element>(w: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (&[n_out, n_in], &[rows, g_out]) = (wl.dims(), gl.dims()) else {
            candle_core::bail!("dense: 2-D weight and gradient expected");
        };
        if g_out != n_out {
            candle_core::bail!(
                "dense: gradient {:?} against weight {:?}",
                gl.dims(),
                wl.dims()
            );
        }
        let wv = slice_of::<T>(cpu(&ws)?, wl, "dense: the weight")?;
        let g = slice_of::<T>(cpu(&gs)?, gl, "dense: the gradient")?;
        let dx = input_grad(g, wv, (rows, n_in, n_out));
        Tensor::from_vec(dx, (rows, n_in), w.device())
    }
    let grad = grad.contiguous()?;
    Ok(match w.dtype() {
        DType::F32 => run::<f32>(w, &grad)?,
        DType::F64 => run::<f64>(w, &grad)?,
        dtype => {
            let reason = format!("dense: {dtype:?} has no fused backward");
            return Err(candle_core::Error::Msg(reason).into());
        }
    })
}

/// Gradients of the input, the weight (with `weight_grad`) and (with `bias`) the bias.
fn backward<T: Element>(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    bias: bool,
    weight_grad: bool,
) -> candle_core::Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (gs, gl) = grad.storage_and_layout();
    let (rows, n_in, n_out) = dims(xl, wl)?;
    let xv = slice_of::<T>(cpu(&xs)?, xl, "dense: the input")?;
    let wv = slice_of::<T>(cpu(&ws)?, wl, "dense: the weight")?;
    let g = slice_of::<T>(cpu(&gs)?, gl, "dense: the gradient")?;
    let dx = input_grad(g, wv, (rows, n_in, n_out));
    // SAFETY: a product that does not accumulate writes every element.
    let dw = weight_grad.then(|| unsafe {
        written_by(n_out * n_in, |dw| {
            self::weight_grad(dw, false, g, xv, (rows, n_out, n_in))
        })
    });
    let db = bias.then(|| column_sums(g, n_out));
    let dev = x.device();
    Ok((
        Tensor::from_vec(dx, x.shape(), dev)?,
        dw.map(|dw| Tensor::from_vec(dw, w.shape(), dev))
            .transpose()?,
        db.map(|db| Tensor::from_vec(db, n_out, dev)).transpose()?,
    ))
}

impl ParamOp for Dense {
    const NAME: &'static str = "sft-dense";

    fn forward<T: Element>(
        &self,
        x: Input<'_>,
        params: &[Input<'_>],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        forward::<T>(x, params[0], params.get(1).copied())
    }

    fn backward<T: Element>(
        &self,
        x: &Tensor,
        params: &[&Tensor],
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<Option<Tensor>>)> {
        let (dx, dw, db) = backward::<T>(x, params[0], grad, params.len() == 2, self.weight_grad)?;
        let db = match (db, params.get(1)) {
            (Some(db), Some(b)) => Some(db.reshape(b.shape())?),
            _ => None,
        };
        Ok((
            dx,
            [dw].into_iter().chain(params.get(1).map(|_| db)).collect(),
        ))
    }
}

/// `x @ w^T + b` over the last dim of `x` in one op, or `None` where the fused op does not
/// apply (another device or dtype, mismatched shapes): the caller composes it then.
pub(crate) fn dense(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    let n_in = x.dim(D::Minus1)?;
    let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().same_device(x.device());
    let w_fits = same(w) && matches!(w.dims(), &[_, i] if i == n_in);
    let b_fits = b.is_none_or(|b| same(b) && b.elem_count() == w.dim(0).unwrap_or(0));
    if !fusable(x) || !w_fits || !b_fits || x.elem_count() == 0 {
        return Ok(None);
    }
    let op = Dense {
        weight_grad: w.track_op(),
    };
    Ok(Some(WithParams::apply(op, x, w, b)?))
}

/// `acc += grad^T x` in place (`acc` (n_out, n_in), `grad` (rows, n_out), `x` (rows, n_in)):
/// a weight's gradient over several chunks of rows, with the product accumulated by `gemm`
/// itself instead of written into a buffer of its own and added.
pub(crate) fn add_weight_grad(acc: &Tensor, grad: &Tensor, x: &Tensor) -> Result<()> {
    struct AddProduct;
    impl candle_core::InplaceOp3 for AddProduct {
        fn name(&self) -> &'static str {
            "sft-add-weight-grad"
        }
        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> candle_core::Result<()> {
            fn run<T: Element>(acc: &mut [T], g: &[T], x: &[T], dims: (usize, usize, usize)) {
                // SAFETY: the caller checked the dims of the three contiguous matrices.
                unsafe { weight_grad(acc.as_mut_ptr(), true, g, x, dims) }
            }
            let (&[n_out, n_in], &[rows, g_out], &[x_rows, x_in]) =
                (l1.dims(), l2.dims(), l3.dims())
            else {
                candle_core::bail!("weight gradient: 2-D tensors expected");
            };
            if g_out != n_out || x_in != n_in || x_rows != rows {
                candle_core::bail!(
                    "weight gradient: {:?} += {:?}^T {:?}",
                    l1.dims(),
                    l2.dims(),
                    l3.dims()
                );
            }
            let Some((a0, a1)) = l1.contiguous_offsets() else {
                candle_core::bail!("weight gradient: the accumulator must be contiguous");
            };
            let dims = (rows, n_out, n_in);
            match s1 {
                CpuStorage::F32(a) => run(
                    &mut a[a0..a1],
                    slice_of::<f32>(s2, l2, "weight gradient: the gradient")?,
                    slice_of::<f32>(s3, l3, "weight gradient: the input")?,
                    dims,
                ),
                CpuStorage::F64(a) => run(
                    &mut a[a0..a1],
                    slice_of::<f64>(s2, l2, "weight gradient: the gradient")?,
                    slice_of::<f64>(s3, l3, "weight gradient: the input")?,
                    dims,
                ),
                _ => candle_core::bail!("weight gradient: only f32 and f64"),
            }
            Ok(())
        }
    }
    let (grad, x) = (grad.contiguous()?, x.contiguous()?);
    Ok(acc.inplace_op3(&grad, &x, &AddProduct)?)
}

/// The gradients of [`dense`]'s input, weight and (given the bias) bias, from its output's.
pub(crate) fn dense_backward(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    WithParams(Dense { weight_grad: true }).gradients(x, (w, b), grad)
}

/// The gradient of [`dense`]'s input `x` (.., n_in) alone, from its output's: a frozen weight's
/// backward.
pub(crate) fn dense_backward_input(x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let n_out = w.dim(0)?;
    let g = grad.reshape(((), n_out))?;
    Ok(dense_input_grad(w, &g)?.reshape(x.shape())?)
}

/// A frozen dense layer and its LoRA adapter as one op over (x, A, B):
/// `x W^T + b + scale * dropout(x) A^T B^T`, the base weight and bias held by the op (they take
/// no gradient). Composed, it would be a product, a scaling, an addition and their buffers for every
/// adapted layer (each a pass over the layer's whole output), and in backward the same again:
/// here the update is accumulated into the layer's output by `gemm` itself (its `beta` is the
/// scale), and backward accumulates the adapter's share of the input gradient likewise. The
/// dropped input and `u = dropout(x) A^T` are recomputed in backward, not kept.
pub(crate) struct LoraDense {
    pub(crate) w: Weight,
    pub(crate) b: Option<Tensor>,
    pub(crate) scale: f64,
    pub(crate) dropout: Option<Dropout>,
}

/// (rows, n_in, n_out, r) of `x` (.., n_in), `w` (n_out, n_in), `a` (r, n_in), `b` (n_out, r).
fn lora_dims(
    x: &Layout,
    (n_out, w_in): (usize, usize),
    a: &Layout,
    b: &Layout,
) -> candle_core::Result<(usize, usize, usize, usize)> {
    let n_in = *x.dims().last().unwrap_or(&0);
    if w_in != n_in {
        candle_core::bail!(
            "dense: input {:?} against weight ({n_out}, {w_in})",
            x.dims()
        );
    }
    let rows = x.shape().elem_count() / n_in.max(1);
    match (a.dims(), b.dims()) {
        (&[r, a_in], &[b_out, r2]) if a_in == n_in && b_out == n_out && r2 == r => {
            Ok((rows, n_in, n_out, r))
        }
        _ => candle_core::bail!(
            "lora: A {:?} and B {:?} do not fit the weight ({n_out}, {n_in})",
            a.dims(),
            b.dims(),
        ),
    }
}

impl LoraDense {
    /// Whether the fused op runs on these operands (CPU f32/f64, matching dtypes and shapes);
    /// the caller composes the layer otherwise.
    pub(crate) fn fits(&self, x: &Tensor, a: &Tensor, b: &Tensor) -> bool {
        let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().same_device(x.device());
        let n_in = x.dims().last().copied().unwrap_or(0);
        fusable(x)
            && x.elem_count() > 0
            && [a, b].into_iter().all(same)
            && self.w.dense().is_none_or(same)
            && self.b.as_ref().is_none_or(same)
            && matches!(self.w.dims2(), Ok((_, i)) if i == n_in)
    }

    /// The base product `x W^T + b` (rows of `x`), through the blocks of a quantized base.
    fn base_product<T: Element>(
        &self,
        xv: &[T],
        bias: Option<&[T]>,
        (rows, n_in, n_out): (usize, usize, usize),
    ) -> candle_core::Result<Vec<T>> {
        match &self.w {
            Weight::Dense(w) => {
                let (ws, wl) = w.storage_and_layout();
                let wv = slice_of::<T>(cpu(&ws)?, wl, "lora: the weight")?;
                Ok(dense_rows(xv, wv, bias, (rows, n_in, n_out)))
            }
            Weight::Quant(q) => q.product(xv, rows, bias).map_err(candle_error),
        }
    }

    /// The base's input gradient `g W`.
    fn base_input_grad<T: Element>(
        &self,
        g: &[T],
        (rows, n_in, n_out): (usize, usize, usize),
    ) -> candle_core::Result<Vec<T>> {
        match &self.w {
            Weight::Dense(w) => {
                let (ws, wl) = w.storage_and_layout();
                let wv = slice_of::<T>(cpu(&ws)?, wl, "lora: the weight")?;
                Ok(input_grad(g, wv, (rows, n_in, n_out)))
            }
            Weight::Quant(q) => q.input_grad(g, rows, None).map_err(candle_error),
        }
    }

    fn dropped<'a, T: Element>(&self, x: &'a [T]) -> std::borrow::Cow<'a, [T]> {
        match &self.dropout {
            Some(d) => std::borrow::Cow::Owned(crate::kernels::dropout_mask_mul(d, x)),
            None => std::borrow::Cow::Borrowed(x),
        }
    }

    /// `u = dropout(x) A^T`, (rows, r), and the dropped input.
    fn down<'a, T: Element>(
        &self,
        xv: &'a [T],
        av: &[T],
        (rows, n_in, r): (usize, usize, usize),
    ) -> (std::borrow::Cow<'a, [T]>, Vec<T>) {
        let xd = self.dropped(xv);
        // SAFETY: a product that does not accumulate writes every element; xd is rows x n_in,
        // A r x n_in, both contiguous.
        let u = unsafe {
            written_by(rows * r, |u| {
                matmul(
                    (rows, r, n_in),
                    (u, r, 1),
                    false,
                    (xd.as_ptr(), n_in, 1),
                    (av.as_ptr(), 1, n_in),
                    T::of(1.0),
                    parallelism(),
                )
            })
        };
        (xd, u)
    }
}

impl ParamOp for LoraDense {
    const NAME: &'static str = "sft-lora-dense";

    fn forward<T: Element>(
        &self,
        x: Input<'_>,
        params: &[Input<'_>],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (params[0], params[1]);
        let (rows, n_in, n_out, r) = lora_dims(x.1, self.w.dims2()?, a.1, b.1)?;
        let xv = slice_of::<T>(x.0, x.1, "lora: the input")?;
        let (av, bv) = (
            slice_of::<T>(a.0, a.1, "lora: A")?,
            slice_of::<T>(b.0, b.1, "lora: B")?,
        );
        let bias = self.b.as_ref().map(|b| b.storage_and_layout());
        let bias_v = match &bias {
            Some((bs, bl)) => Some(slice_of::<T>(cpu(bs)?, bl, "lora: the bias")?),
            None => None,
        };
        let mut y = self.base_product(xv, bias_v, (rows, n_in, n_out))?;
        let (_, u) = self.down(xv, av, (rows, n_in, r));
        // SAFETY: y is rows x n_out, u rows x r, B n_out x r, all contiguous.
        unsafe {
            matmul(
                (rows, n_out, r),
                (y.as_mut_ptr(), n_out, 1),
                true,
                (u.as_ptr(), r, 1),
                (bv.as_ptr(), 1, r),
                T::of(self.scale),
                parallelism(),
            )
        };
        Ok((T::storage(y), output_shape(x.1, n_out)))
    }

    fn backward<T: Element>(
        &self,
        x: &Tensor,
        params: &[&Tensor],
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<Option<Tensor>>)> {
        let (a, b) = (params[0], params[1]);
        let (xs, xl) = x.storage_and_layout();
        let (a_s, al) = a.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (rows, n_in, n_out, r) = lora_dims(xl, self.w.dims2()?, al, bl)?;
        let xv = slice_of::<T>(cpu(&xs)?, xl, "lora: the input")?;
        let av = slice_of::<T>(cpu(&a_s)?, al, "lora: A")?;
        let bv = slice_of::<T>(cpu(&bs)?, bl, "lora: B")?;
        let g = slice_of::<T>(cpu(&gs)?, gl, "lora: the gradient")?;
        let scale = T::of(self.scale);
        let mut dx = self.base_input_grad(g, (rows, n_in, n_out))?;
        let (xd, u) = self.down(xv, av, (rows, n_in, r));
        // SAFETY (each product): the operands are contiguous with the dims given, and a product
        // that does not accumulate writes every element of its output.
        // du = scale * g B, (rows, r).
        let du = unsafe {
            written_by(rows * r, |du| {
                matmul(
                    (rows, r, n_out),
                    (du, r, 1),
                    false,
                    (g.as_ptr(), n_out, 1),
                    (bv.as_ptr(), r, 1),
                    scale,
                    parallelism(),
                )
            })
        };
        // dB = scale * g^T u, (n_out, r).
        let db = unsafe {
            written_by(n_out * r, |db| {
                matmul(
                    (n_out, r, rows),
                    (db, r, 1),
                    false,
                    (g.as_ptr(), 1, n_out),
                    (u.as_ptr(), r, 1),
                    scale,
                    parallelism(),
                )
            })
        };
        // dA = du^T dropout(x), (r, n_in).
        let da = unsafe {
            written_by(r * n_in, |da| {
                matmul(
                    (r, n_in, rows),
                    (da, n_in, 1),
                    false,
                    (du.as_ptr(), 1, r),
                    (xd.as_ptr(), n_in, 1),
                    T::of(1.0),
                    parallelism(),
                )
            })
        };
        // dx += mask * (du A): straight into dx without dropout.
        let lora_input_grad = |dst: *mut T, accumulate: bool| unsafe {
            matmul(
                (rows, n_in, r),
                (dst, n_in, 1),
                accumulate,
                (du.as_ptr(), r, 1),
                (av.as_ptr(), n_in, 1),
                T::of(1.0),
                parallelism(),
            )
        };
        match &self.dropout {
            None => lora_input_grad(dx.as_mut_ptr(), true),
            Some(d) => {
                let t = unsafe { written_by(rows * n_in, |t| lora_input_grad(t, false)) };
                let t = crate::kernels::dropout_mask_mul(d, &t);
                dx.par_iter_mut()
                    .zip(t.par_iter())
                    .for_each(|(dx, &t)| *dx = std::ops::Add::add(*dx, t));
            }
        }
        let dev = x.device();
        Ok((
            Tensor::from_vec(dx, x.shape(), dev)?,
            vec![
                Some(Tensor::from_vec(da, a.shape(), dev)?),
                Some(Tensor::from_vec(db, b.shape(), dev)?),
            ],
        ))
    }
}

/// [`LoraDense`] on `x`: candle's op, whose backward gives A and B their gradients.
pub(crate) fn lora_dense(op: LoraDense, x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    WithParams::apply(op, x, a, Some(b))
}

/// The gradients of [`lora_dense`]'s input, A and B, from its output's.
pub(crate) fn lora_dense_backward(
    op: LoraDense,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (dx, da, db) = WithParams(op).gradients(x, (a, Some(b)), grad)?;
    Ok((dx, da, db.expect("B has a gradient")))
}

/// A frozen dense layer over ggml blocks, `x W^T + b`, as one op whose backward gives only
/// the input its gradient (a quantized weight and its bias are frozen).
struct QuantDense {
    w: QWeight,
    b: Option<Tensor>,
}

impl QuantDense {
    fn run<T: Element>(
        &self,
        s: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols) = self.w.dims();
        let n_in = *l.dims().last().unwrap_or(&0);
        if n_in != cols {
            candle_core::bail!(
                "dense: input {:?} against weight ({rows}, {cols})",
                l.dims()
            );
        }
        let xv = slice_of::<T>(s, l, "dense: the input")?;
        let bias = self.b.as_ref().map(|b| b.storage_and_layout());
        let bias_v = match &bias {
            Some((bs, bl)) => Some(slice_of::<T>(cpu(bs)?, bl, "dense: the bias")?),
            None => None,
        };
        let n = xv.len() / cols.max(1);
        let y = self.w.product(xv, n, bias_v).map_err(candle_error)?;
        Ok((T::storage(y), output_shape(l, rows)))
    }
}

impl candle_core::CustomOp1 for QuantDense {
    fn name(&self) -> &'static str {
        "sft-quant-dense"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match s.dtype() {
            DType::F32 => self.run::<f32>(s, l),
            DType::F64 => self.run::<f64>(s, l),
            other => {
                candle_core::bail!("a quantized weight's product takes f32 or f64, not {other:?}")
            }
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = quant_input_grad(&self.w, grad).map_err(candle_error)?;
        Ok(Some(dx))
    }
}

/// `x W^T + b` for a quantized `W` (frozen): on the CPU, in f32 or f64 (half precision computes
/// in f32 and rounds the output back); the gradient reaches `x` through candle's backward too.
pub(crate) fn quant_dense(x: &Tensor, w: &QWeight, b: Option<&Tensor>) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return Err(candle_core::Error::Msg("a quantized base runs on the CPU only".into()).into());
    }
    let dtype = x.dtype();
    let compute = match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let xc = x.to_dtype(compute)?.contiguous()?;
    let b = b.map(|b| b.detach().to_dtype(compute)).transpose()?;
    let y = xc.apply_op1(QuantDense { w: w.clone(), b })?;
    Ok(y.to_dtype(dtype)?)
}

/// `grad W` for a quantized `W`: the input gradient of [`quant_dense`], in `grad`'s dtype and
/// with the input's shape (`grad` is (.., rows)).
pub(crate) fn quant_input_grad(w: &QWeight, grad: &Tensor) -> Result<Tensor> {
    let (rows, cols) = w.dims();
    let dtype = grad.dtype();
    let mut shape = grad.dims().to_vec();
    match shape.last_mut() {
        Some(last) if *last == rows => *last = cols,
        _ => {
            return Err(candle_core::Error::Msg(format!(
                "dense: gradient {:?} against weight ({rows}, {cols})",
                grad.dims()
            ))
            .into())
        }
    }
    let n = grad.elem_count() / rows.max(1);
    fn run<T: Element>(w: &QWeight, g: &Tensor, n: usize, shape: Vec<usize>) -> Result<Tensor> {
        let (s, l) = g.storage_and_layout();
        let gv = slice_of::<T>(cpu(&s)?, l, "dense: the gradient")?;
        Ok(Tensor::from_vec(
            w.input_grad(gv, n, None)?,
            shape,
            g.device(),
        )?)
    }
    let dx = match dtype {
        DType::F64 => run::<f64>(w, &grad.contiguous()?, n, shape)?,
        _ => run::<f32>(w, &grad.to_dtype(DType::F32)?.contiguous()?, n, shape)?.to_dtype(dtype)?,
    };
    Ok(dx)
}

impl Weight {
    /// `x W^T` for rows `x` (n, cols): the output layer's logits, say. No graph is recorded
    /// for blocks.
    pub fn product(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => Ok(x.matmul(&w.t()?)?),
            Weight::Quant(q) => quant_dense(x, q, None),
        }
    }

    /// `g W` for `g` (n, rows): the input gradient of [`Weight::product`], through `gemm`
    /// where it runs.
    pub fn input_grad(&self, g: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => match linear_input_grad(w, g)? {
                Some(dx) => Ok(dx),
                None => Ok(g.matmul(w)?),
            },
            Weight::Quant(q) => quant_input_grad(q, g),
        }
    }
}

fn candle_error(e: crate::error::Error) -> candle_core::Error {
    match e {
        crate::error::Error::Candle(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

/// The gradients of `y = x w^T` (an output layer over rows `x`) from `grad` = dL/dy: the input's
/// `grad w`, and the weight's `grad^T x`, which is added in place into `into` when given (the
/// weight's gradient from earlier chunks of rows: a tensor nothing else reads) and returned as
/// that tensor, else written into a buffer of its own. Through the dense layer's backward and
/// `gemm`; `None` where that does not run (not CPU f32/f64, mixed dtypes or shapes): the caller
/// takes candle's matmul then.
pub fn linear_grads(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    into: Option<&Tensor>,
) -> Result<Option<(Tensor, Tensor)>> {
    let same = |t: &Tensor| t.dtype() == x.dtype();
    let dims = match (x.dims(), w.dims(), grad.dims()) {
        (&[n, h], &[v, h2], &[n2, v2]) => {
            h == h2 && n == n2 && v == v2 && into.is_none_or(|a| a.dims() == [v, h])
        }
        _ => false,
    };
    if !fusable(x) || !same(w) || !same(grad) || !into.is_none_or(same) || !dims {
        return Ok(None);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match into {
        None => {
            let (dx, dw, _) = dense_backward(&x, &w, None, grad)?;
            Ok(Some((dx, dw)))
        }
        Some(acc) => {
            let dx = dense_input_grad(&w, grad)?;
            add_weight_grad(acc, grad, &x)?;
            Ok(Some((dx, acc.clone())))
        }
    }
}

/// The input gradient `grad w` of `y = x w^T` alone (a frozen output layer), through `gemm`;
/// `None` where that does not run (not CPU f32/f64, mixed dtypes or shapes).
pub fn linear_input_grad(w: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
    let fits = matches!((w.dims(), grad.dims()), (&[v, _], &[_, v2]) if v == v2);
    if !fusable(grad) || w.dtype() != grad.dtype() || !fits {
        return Ok(None);
    }
    Ok(Some(dense_input_grad(&w.contiguous()?, grad)?))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::dense;
    use crate::testing::{max_diff, on_threads, values};

    #[test]
    fn dense_matches_matmul_and_bias_and_their_gradients() {
        let dev = Device::Cpu;
        let (b, t, n_in, n_out) = (2, 70, 13, 9);
        let x = Var::from_vec(values(b * t * n_in, 0.37), (b, t, n_in), &dev).unwrap();
        let w = Var::from_vec(values(n_out * n_in, 0.91), (n_out, n_in), &dev).unwrap();
        let bias = Var::from_vec(values(n_out, 1.3), n_out, &dev).unwrap();
        let g = Tensor::from_vec(values(b * t * n_out, 1.7), (b, t, n_out), &dev).unwrap();
        for with_bias in [false, true] {
            let bt = with_bias.then_some(bias.as_tensor());
            let fused = dense(&x, &w, bt).unwrap().unwrap();
            let flat = x.reshape((b * t, n_in)).unwrap();
            let mut composed = flat.matmul(&w.t().unwrap()).unwrap();
            if let Some(bt) = bt {
                composed = composed.broadcast_add(bt).unwrap();
            }
            let composed = composed.reshape((b, t, n_out)).unwrap();
            assert_eq!(fused.dims(), composed.dims());
            assert!(max_diff(&fused, &composed) < 1e-13);
            let grads = |y: &Tensor| (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gc) = (grads(&fused), grads(&composed));
            for v in [&x, &w, &bias] {
                match (gf.get(v.as_tensor()), gc.get(v.as_tensor())) {
                    (Some(f), Some(c)) => {
                        assert_eq!(f.dims(), c.dims());
                        assert!(max_diff(f, c) < 1e-12, "{}", max_diff(f, c));
                        assert!(max_diff(f, &f.zeros_like().unwrap()) > 1e-3);
                    }
                    (None, None) => assert!(!with_bias && v.as_tensor().rank() == 1),
                    _ => panic!("fused and composed differ in which inputs get a gradient"),
                }
            }
        }
        // Half precision is the caller's to compose.
        let half = x.to_dtype(DType::BF16).unwrap();
        let wh = w.to_dtype(DType::BF16).unwrap();
        assert!(dense(&half, &wh, None).unwrap().is_none());
    }

    #[test]
    fn dense_gradients_do_not_depend_on_the_thread_count() {
        let dev = Device::Cpu;
        let f32v = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        let x = Var::from_vec(f32v(values(300 * 64, 0.37)), (300, 64), &dev).unwrap();
        let w = Var::from_vec(f32v(values(96 * 64, 0.91)), (96, 64), &dev).unwrap();
        let b = Var::from_vec(f32v(values(96, 1.3)), 96, &dev).unwrap();
        let run = |threads: usize| {
            on_threads(threads, || {
                let y = dense(&x, &w, Some(&b)).unwrap().unwrap();
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
