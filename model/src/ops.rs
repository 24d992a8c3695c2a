//! The differentiable building blocks of both architectures, each written with candle ops that
//! have a backward pass.
//!
//! candle's fused kernels (`softmax_last_dim`, `rms_norm`, `LayerNorm::forward`, `rope`) record no
//! gradient and cut the graph without an error, so none is used here. Every op of the forward
//! pass goes through this module, which makes it the one place to swap in faster fused kernels
//! (with a hand-written backward) later.
//!
//! Layout rule: candle 0.11's CPU matmul silently returns wrong values for an lhs whose last two
//! dims are transposed when the rhs batch is broadcast. [`linear`] therefore flattens its input
//! to 2-D (a copy when the input is not contiguous) and [`attention`] makes q/k/v contiguous.

use candle_core::{CustomOp1, CustomOp3, DType, Device, Tensor, D};

use std::sync::Arc;

pub(crate) use crate::attention::Kept;
use crate::attention::{self, KeyRanges};
use crate::backward::Grads;
pub(crate) use crate::dropout::Dropout;
use crate::error::{input_error, Error, Result};
use crate::kernels;
use crate::kernels::NormKind;
use crate::norm::norm_affine;
use crate::weights::{Weight, Weights};

/// Additive attention-mask value for a forbidden key. Finite, so that a fully masked row (a
/// padding query) gives a uniform softmax instead of NaN; large enough that `exp` underflows to
/// exactly zero next to any real score.
pub(crate) fn mask_value(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -3.0e4,
        _ => -1.0e9,
    }
}

/// The dtype norms and softmax compute in: at least f32, as `transformers` does for half types.
fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// `x * w + b` over the last dim with candle's broadcast ops: the path for half precision and
/// other devices (f32 and f64 on the CPU take the fused dense and norm ops).
fn scale_shift(x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>) -> Result<Tensor> {
    let y = match w {
        Some(w) => x.broadcast_mul(w)?,
        None => x.clone(),
    };
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// `x @ w^T + b` over the last dim of `x`; `w` is (out, in) as stored by `nn.Linear`.
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if let Some(y) = crate::linear::dense(x, w, b)? {
        return Ok(y);
    }
    let dims = x.dims();
    let (&n_in, lead) = dims
        .split_last()
        .expect("linear input has at least one dim");
    let rows = lead.iter().product::<usize>();
    // 2-D on both sides: no batch folding, so no layout trap; reshape copies a permuted input.
    let y = x.reshape((rows, n_in))?.matmul(&w.t()?)?;
    let y = scale_shift(&y, None, b)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(w.dim(0)?);
    Ok(y.reshape(out_dims)?)
}

/// `x @ W^T + b` for a weight that may be ggml blocks (a frozen base).
pub(crate) fn linear_weight(x: &Tensor, w: &Weight, b: Option<&Tensor>) -> Result<Tensor> {
    match w {
        Weight::Dense(w) => linear(x, w, b),
        Weight::Quant(q) => crate::linear::quant_dense(x, q, b),
    }
}

/// The rows of an embedding table at `ids` (any shape, flattened), in `dtype`.
pub(crate) fn embedding(table: &Weight, ids: &Tensor, dtype: DType) -> Result<Tensor> {
    let ids = ids.flatten_all()?;
    match table {
        Weight::Dense(t) => Ok(t.index_select(&ids, 0)?),
        Weight::Quant(q) => {
            let rows = q.rows_at::<f32>(&ids.to_vec1::<u32>()?)?;
            let t = Tensor::from_vec(rows, (ids.dim(0)?, q.dims().1), ids.device())?;
            Ok(t.to_dtype(dtype)?)
        }
    }
}

/// A projection `x @ w^T + b` with the Hugging Face names `{name}.weight` and, when the
/// checkpoint has one, `{name}.bias`.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    w: Weight,
    b: Option<Tensor>,
    lora: Option<Adapter>,
}

impl Linear {
    pub(crate) fn new(w: &Weights, name: &str) -> Linear {
        Linear {
            w: w.weight(&format!("{name}.weight")),
            b: w.maybe(&format!("{name}.bias")),
            lora: w
                .adapter(name)
                .map(|a| Adapter::new(name, a.a, a.b, a.scale, a.dropout)),
        }
    }

    /// `x W^T + b`, plus the adapter's update when there is one (its dropout drawn from
    /// `dropout_seed` in training).
    pub(crate) fn forward(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        if let Some((op, a)) = self.fused(x, dropout_seed) {
            return crate::linear::lora_dense(op, x, &a.a, &a.b);
        }
        let y = linear_weight(x, &self.w, self.b.as_ref())?;
        match &self.lora {
            None => Ok(y),
            Some(a) => Ok((y + a.forward(x, dropout_seed)?)?),
        }
    }

    /// The gradient of the input `x` of a fused [`Linear::forward`]; the weight's and bias's go
    /// to `grads` (a frozen weight's product is skipped), and so do the adapter's.
    pub(crate) fn backward(
        &self,
        x: &Tensor,
        grad: &Tensor,
        grads: &mut Grads,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        if self.lora.is_some() {
            // The own backward runs on the CPU in f32/f64, where the fused op always applies;
            // elsewhere candle's backward goes through the composition.
            let Some((op, a)) = self.fused(x, dropout_seed) else {
                return input_error("backward: an adapter the fused op does not take");
            };
            // The base weight of an adapted layer is frozen (`lora::plan`).
            debug_assert!(self.w.dense().is_none_or(|w| !grads.wants(w)));
            let (dx, da, db) = crate::linear::lora_dense_backward(op, x, &a.a, &a.b, grad)?;
            grads.put(&a.a, da)?;
            grads.put(&a.b, db)?;
            return Ok(dx);
        }
        let w = match &self.w {
            Weight::Quant(q) => return crate::linear::quant_input_grad(q, grad),
            Weight::Dense(w) => w,
        };
        if !grads.wants(w) {
            return crate::linear::dense_backward_input(x, w, grad);
        }
        let (dx, dw, db) = crate::linear::dense_backward(x, w, self.b.as_ref(), grad)?;
        grads.put(w, dw)?;
        if let (Some(b), Some(db)) = (&self.b, db) {
            grads.put(b, db)?;
        }
        Ok(dx)
    }
}

impl Linear {
    /// The fused layer-and-adapter op where it runs (an adapter, CPU f32/f64).
    fn fused(&self, x: &Tensor, seed: Option<u64>) -> Option<(crate::linear::LoraDense, &Adapter)> {
        let a = self.lora.as_ref()?;
        let op = crate::linear::LoraDense {
            w: self.w.clone(),
            b: self.b.clone(),
            scale: a.scale,
            dropout: a.dropout(seed),
        };
        op.fits(x, &a.a, &a.b).then_some((op, a))
    }
}

/// A LoRA adapter on a linear layer: `scale * dropout(x) A^T B^T`.
#[derive(Debug, Clone)]
pub(crate) struct Adapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
    /// The dropout site: a stream of its own per adapted module.
    site: u64,
}

impl Adapter {
    pub(crate) fn new(module: &str, a: Tensor, b: Tensor, scale: f64, dropout: f64) -> Adapter {
        // The high bit keeps these streams apart from the GPT's numbered sites.
        let site = crate::params::fnv1a(module.as_bytes()) | 1 << 63;
        Adapter {
            a,
            b,
            scale,
            dropout,
            site,
        }
    }

    fn dropout(&self, seed: Option<u64>) -> Option<Dropout> {
        seed.filter(|_| self.dropout > 0.0).map(|seed| Dropout {
            p: self.dropout,
            seed,
            site: self.site,
        })
    }

    /// `scale * (dropout(x) A^T) B^T`, multiplied after the product as PEFT does: the
    /// composition candle's backward differentiates where the fused op does not run (half
    /// precision, other devices).
    fn forward(&self, x: &Tensor, seed: Option<u64>) -> Result<Tensor> {
        let xd = match self.dropout(seed) {
            Some(d) => d.apply(x)?,
            None => x.clone(),
        };
        let u = linear(&xd, &self.a, None)?;
        Ok(linear(&u, &self.b, None)?.affine(self.scale, 0.0)?)
    }
}

/// RMSNorm over the last dim: `w * x / sqrt(mean(x^2) + eps)`, normalised in at least f32.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(y) = norm_affine(x, NormKind::Rms, eps, w, None)? {
        return Ok(y);
    }
    let dtype = x.dtype();
    let xc = x.to_dtype(compute_dtype(dtype))?;
    let y = kernels::rms_norm_core(&xc, eps)?.to_dtype(dtype)?;
    scale_shift(&y, Some(w), None)
}

/// LayerNorm over the last dim, with an optional bias.
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if let Some(y) = norm_affine(x, NormKind::Layer, eps, w, b)? {
        return Ok(y);
    }
    let dtype = x.dtype();
    let xc = x.to_dtype(compute_dtype(dtype))?;
    let y = kernels::layer_norm_core(&xc, eps)?.to_dtype(dtype)?;
    scale_shift(&y, Some(w), b)
}

/// The gradient of the input `x` of a fused [`rms_norm`] (`b` None) or [`layer_norm`]; the
/// gain's and shift's go to `grads`.
pub(crate) fn norm_backward(
    kind: NormKind,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    eps: f64,
    grad: &Tensor,
    grads: &mut Grads,
) -> Result<Tensor> {
    let (dx, dw, db) = crate::norm::norm_affine_backward(x, kind, eps, w, b, grad)?;
    grads.put(w, dw)?;
    if let (Some(b), Some(db)) = (b, db) {
        grads.put(b, db)?;
    }
    Ok(dx)
}

/// Softmax over the last dim, in at least f32, returned in the input dtype.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let y = candle_nn::ops::softmax(&x.to_dtype(compute_dtype(dtype))?, D::Minus1)?;
    Ok(y.to_dtype(dtype)?)
}

/// SwiGLU's gate: `silu(gate) * up` (fused on the CPU).
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    kernels::silu_mul(gate, up)
}

/// GPT-2's tanh-approximated GELU (`gelu_new`).
pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    kernels::gelu(x)
}

/// `x + dropout(h)`, residual dropout.
pub(crate) fn residual_dropout(x: &Tensor, h: &Tensor, d: &Dropout) -> Result<Tensor> {
    kernels::residual_dropout(x, h, d)
}

/// [`apply_rope`] then heads first: (b, t, heads, head_dim) -> (b, heads, t, head_dim),
/// contiguous, as attention takes it. One fused pass on the CPU.
pub(crate) fn rope_heads_first(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    match kernels::rope_heads_first(x, cos, sin)? {
        Some(y) => Ok(y),
        None => Ok(apply_rope(x, cos, sin)?.transpose(1, 2)?.contiguous()?),
    }
}

/// Rotates `x` (b, t, heads, head_dim) by the gathered tables: `x cos + rotate_half(x) sin`.
pub(crate) fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let swapped = Tensor::cat(
        &[
            x.narrow(D::Minus1, half, half)?,
            x.narrow(D::Minus1, 0, half)?,
        ],
        3,
    )?;
    Ok((x.broadcast_mul(cos)? + swapped.broadcast_mul(sin)?)?)
}

/// An attention mask: the additive form the composition adds to the scores, and, when it is one
/// contiguous range of keys per query (every mask the models build), that form for the fused op.
#[derive(Debug, Clone)]
pub(crate) struct Mask {
    /// (b or 1, 1, t, t_k): 0 where a query may attend, [`mask_value`] where it may not.
    additive: Tensor,
    keys: Option<Arc<KeyRanges>>,
}

impl Mask {
    pub(crate) fn new(additive: Tensor) -> Result<Mask> {
        let keys = match kernels::fusable(&additive) {
            true => KeyRanges::from_additive(&additive)?.map(Arc::new),
            false => None,
        };
        Ok(Mask { additive, keys })
    }

    pub(crate) fn additive(&self) -> &Tensor {
        &self.additive
    }

    /// Whether the fused attention can take this mask.
    pub(crate) fn fits_fused(&self) -> bool {
        self.keys.is_some()
    }
}

/// The key ranges for the fused op, `Some(None)` for "every key", `None` when it cannot run.
fn fused_keys(q: &Tensor, mask: Option<&Mask>) -> Option<Option<Arc<KeyRanges>>> {
    if !kernels::fusable(q) {
        return None;
    }
    match mask {
        None => Some(None),
        Some(m) => m.keys.clone().map(Some),
    }
}

/// Scaled dot-product attention with grouped-query heads.
///
/// `q` (b, heads, t, d); `k`, `v` (b, kv_heads, t_k, d); `mask` broadcastable to
/// (b, heads, t, t_k). Returns (b, t, heads * d), the layout the output projection reads.
/// `kept`: for the models' own backward pass, where the fused op runs it keeps its
/// probabilities there (where they fit) for [`attention_backward`].
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Mask>,
    dropout: Option<&Dropout>,
    kept: Option<&Kept>,
) -> Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    if let Some(keys) = fused_keys(q, mask) {
        if k.dtype() == q.dtype() && v.dtype() == q.dtype() {
            let dropout = dropout.filter(|d| d.p > 0.0).copied();
            let kept = kept.cloned();
            let y = q.apply_op3(
                k,
                v,
                attention::SeparateQkv {
                    keys,
                    dropout,
                    kept,
                },
            )?;
            return Ok(y.reshape((b, t, heads * d))?);
        }
    }
    let y = composed_attention(q, k, v, mask.map(Mask::additive), dropout, None)?;
    Ok(y.transpose(1, 2)?.reshape((b, t, heads * d))?)
}

/// [`attention`] over GPT-2's fused projection `qkv` (b, t, 3 heads d), laid out `[q | k | v]`;
/// with `kept`, as [`attention`].
pub(crate) fn attention_qkv(
    qkv: &Tensor,
    heads: usize,
    mask: Option<&Mask>,
    dropout: Option<&Dropout>,
    kept: Option<&Kept>,
) -> Result<Tensor> {
    if let Some(keys) = fused_keys(qkv, mask) {
        let dropout = dropout.filter(|d| d.p > 0.0).copied();
        let op = attention::FusedQkv {
            heads,
            keys,
            dropout,
            kept: kept.cloned(),
        };
        return Ok(qkv.contiguous()?.apply_op1(op)?);
    }
    let (q, k, v) = split_qkv(qkv, heads)?;
    attention(&q, &k, &v, mask, dropout, None)
}

/// The gradient of `qkv` in a fused [`attention_qkv`] that returned `out`, reading the
/// probabilities it kept in `kept` (recomputing them where it kept none).
pub(crate) fn attention_qkv_backward(
    qkv: &Tensor,
    out: &Tensor,
    grad: &Tensor,
    heads: usize,
    mask: Option<&Mask>,
    dropout: Option<&Dropout>,
    kept: Option<&Kept>,
) -> Result<Tensor> {
    let Some(keys) = fused_keys(qkv, mask) else {
        return Err(not_fused("attention"));
    };
    let op = attention::FusedQkv {
        heads,
        keys,
        dropout: dropout.filter(|d| d.p > 0.0).copied(),
        kept: kept.cloned(),
    };
    Ok(CustomOp1::bwd(&op, qkv, out, grad)?.expect("attention gives qkv a gradient"))
}

/// The gradients of q, k and v in a fused [`attention`] that returned `out`
/// (b, t, heads d), reading the probabilities it kept in `kept`.
pub(crate) fn attention_backward(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    out: &Tensor,
    grad: &Tensor,
    mask: Option<&Mask>,
    dropout: Option<&Dropout>,
    kept: Option<&Kept>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let Some(keys) = fused_keys(q, mask) else {
        return Err(not_fused("attention"));
    };
    let (b, heads, t, d) = q.dims4()?;
    let op = attention::SeparateQkv {
        keys,
        dropout: dropout.filter(|d| d.p > 0.0).copied(),
        kept: kept.cloned(),
    };
    let shape = (b, t, heads, d);
    let (dq, dk, dv) = CustomOp3::bwd(&op, q, k, v, &out.reshape(shape)?, &grad.reshape(shape)?)?;
    let missing = || not_fused("attention");
    Ok((
        dq.ok_or_else(missing)?,
        dk.ok_or_else(missing)?,
        dv.ok_or_else(missing)?,
    ))
}

fn not_fused(what: &str) -> Error {
    Error::Input {
        reason: format!("{what}: the model's own backward pass needs the fused CPU kernels"),
    }
}

/// q, k and v, each (b, heads, t, d) and contiguous, from GPT-2's fused projection (b, t, 3 e).
pub(crate) fn split_qkv(qkv: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, three_e) = qkv.dims3()?;
    let qkv = qkv.reshape((b, t, 3, heads, three_e / 3 / heads))?;
    let part = |j: usize| -> Result<Tensor> {
        Ok(qkv
            .narrow(2, j, 1)?
            .squeeze(2)?
            .transpose(1, 2)?
            .contiguous()?)
    };
    Ok((part(0)?, part(1)?, part(2)?))
}

/// The composition of candle ops (and the fused softmax) behind [`attention`]: any device,
/// dtype and mask, and dropout on the probabilities. Returns (b, heads, t, d). `softcap`: the
/// scores pass through `c tanh(s / c)` before the mask (Gemma 2; the fused op has no such step).
pub(crate) fn composed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    dropout: Option<&Dropout>,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let (_, kv_heads, t_k, _) = k.dims4()?;
    let group = heads / kv_heads;
    // Query heads sharing a K/V head are folded into the row dim, so K/V are never repeated.
    let q = (q.contiguous()? * (1.0 / (d as f64).sqrt()))?.reshape((b, kv_heads, group * t, d))?;
    let k = k.contiguous()?;
    let v = v.contiguous()?;
    let mut scores = q.matmul(&k.t()?)?.reshape((b, heads, t, t_k))?;
    if let Some(c) = softcap {
        scores = (scores / c)?.tanh()?.affine(c, 0.0)?;
    }
    let mut probs = match mask {
        Some(m) => kernels::masked_softmax(&scores, m)?,
        None => softmax_last_dim(&scores)?,
    };
    if let Some(dropout) = dropout {
        probs = dropout.apply(&probs)?;
    }
    let y = probs.reshape((b, kv_heads, group * t, t_k))?.matmul(&v)?;
    Ok(y.reshape((b, heads, t, d))?)
}

/// Additive causal mask for `t` queries at absolute positions `offset..offset + t` over keys
/// `0..offset + t`, shaped (1, 1, t, offset + t).
pub(crate) fn causal_mask(
    t: usize,
    offset: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let t_k = offset + t;
    let neg = mask_value(dtype) as f32;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t_k).map(move |j| if j <= offset + i { 0.0 } else { neg }))
        .collect();
    Ok(Tensor::from_vec(mask, (1, 1, t, t_k), device)?.to_dtype(dtype)?)
}

/// `mask` (.., t, t_k) for queries at positions `offset..offset + t` with keys at `0..t_k`, also
/// forbidding keys `window` or more positions behind their query (Mistral's sliding window, as
/// `transformers` masks it: key k is seen from query q iff `q - window < k <= q`).
pub(crate) fn slide(mask: &Tensor, window: usize, offset: usize) -> Result<Tensor> {
    let dims = mask.dims();
    let (t, t_k) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let neg = mask_value(mask.dtype()) as f32;
    let w: Vec<f32> = (0..t)
        .flat_map(|i| (0..t_k).map(move |j| if offset + i >= j + window { neg } else { 0.0 }))
        .collect();
    let w = Tensor::from_vec(w, (1, 1, t, t_k), mask.device())?.to_dtype(mask.dtype())?;
    Ok(mask.broadcast_minimum(&w)?)
}

/// Additive mask (b, 1, t, t) from segment ids (b, t): query q sees key k iff `k <= q`,
/// `seg[k] == seg[q]` and `seg[q] != 0`.
pub(crate) fn segment_mask(segments: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, t) = segments.dims2()?;
    let device = segments.device();
    let segments = segments.to_dtype(DType::U32)?;
    let seg_q = segments.unsqueeze(2)?;
    let seg_k = segments.unsqueeze(1)?;
    let same = seg_q.broadcast_eq(&seg_k)?;
    let real = seg_q.ne(0u32)?.broadcast_as((b, t, t))?;
    let causal = Tensor::tril2(t, DType::U8, device)?.broadcast_as((b, t, t))?;
    let allowed = ((same * real)? * causal)?;
    let zero = Tensor::zeros((b, t, t), dtype, device)?;
    let neg = Tensor::full(mask_value(dtype), (b, t, t), device)?.to_dtype(dtype)?;
    Ok(allowed.where_cond(&zero, &neg)?.unsqueeze(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dropout::DRAW_BLOCK;
    use crate::rope::{Rope, RopeScaling};
    use crate::testing::max_diff;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Reference `x @ w^T` with explicit loops over host data.
    fn naive_linear(x: &[Vec<Vec<f32>>], w: &[Vec<f32>]) -> Vec<Vec<Vec<f32>>> {
        x.iter()
            .map(|m| {
                m.iter()
                    .map(|row| {
                        w.iter()
                            .map(|wr| row.iter().zip(wr).map(|(a, b)| a * b).sum())
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn fill_gives_the_multipliers_draw_gives_one_at_a_time() {
        for p in [0.1, 0.37] {
            let d = Dropout {
                p,
                seed: 7,
                site: 3,
            };
            for start in [0u64, 5, 1234] {
                for n in [0, 1, 255, DRAW_BLOCK, DRAW_BLOCK + 1, 1000] {
                    let mut a = d.stream();
                    a.set_word_pos(u128::from(start));
                    let one_by_one: Vec<f32> = (0..n).map(|_| d.draw(&mut a)).collect();
                    let mut filled = vec![f32::NAN; n];
                    d.fill(&mut d.words(), start, &mut filled);
                    assert_eq!(filled, one_by_one, "p {p}, word {start}, {n} draws");
                    let mut wide = vec![f64::NAN; n];
                    d.fill(&mut d.words(), start, &mut wide);
                    let narrowed: Vec<f32> = wide.iter().map(|&x| x as f32).collect();
                    assert_eq!(narrowed, one_by_one);
                }
            }
        }
        // Both values occur, in about the proportion asked for.
        let d = Dropout {
            p: 0.25,
            seed: 1,
            site: 0,
        };
        let mut m = vec![0f32; 10_000];
        d.fill(&mut d.words(), 0, &mut m);
        let dropped = m.iter().filter(|&&x| x == 0.0).count();
        assert!(
            (2_200..2_800).contains(&dropped),
            "{dropped} of 10,000 dropped"
        );
        assert!(m.iter().all(|&x| x == 0.0 || x == (1.0 / 0.75) as f32));
    }

    #[test]
    fn linear_on_a_transposed_batch_matches_naive_loops() {
        // candle_nn::Linear on this input returns wrong numbers (the 0.11 CPU matmul trap).
        let x = randn(&[2, 5, 3], 1).transpose(1, 2).unwrap(); // (2, 3, 5), not contiguous
        let w = randn(&[4, 5], 2);
        let got = linear(&x, &w, None).unwrap();
        let want = naive_linear(&x.to_vec3().unwrap(), &w.to_vec2().unwrap());
        let want = Tensor::new(want, &Device::Cpu).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
        let trap = candle_nn::Module::forward(&candle_nn::Linear::new(w, None), &x).unwrap();
        assert!(
            max_diff(&trap, &want) > 1e-2,
            "candle fixed the trap: simplify linear"
        );
    }

    #[test]
    fn attention_batch_equals_rows_alone() {
        let q = randn(&[2, 4, 6, 8], 3)
            .transpose(2, 1)
            .unwrap()
            .transpose(2, 1)
            .unwrap();
        let k = randn(&[2, 6, 2, 8], 4).transpose(1, 2).unwrap(); // (2, 2, 6, 8), strided
        let v = randn(&[2, 6, 2, 8], 5).transpose(1, 2).unwrap();
        let mask = Mask::new(causal_mask(6, 0, DType::F32, &Device::Cpu).unwrap()).unwrap();
        let both = attention(&q, &k, &v, Some(&mask), None, None).unwrap();
        for row in 0..2 {
            let one = |t: &Tensor| t.narrow(0, row, 1).unwrap();
            let alone = attention(&one(&q), &one(&k), &one(&v), Some(&mask), None, None).unwrap();
            assert!(max_diff(&one(&both), &alone) < 1e-6);
        }
    }

    #[test]
    fn grouped_query_attention_equals_repeated_kv() {
        let q = randn(&[1, 4, 5, 8], 6);
        let k = randn(&[1, 2, 5, 8], 7);
        let v = randn(&[1, 2, 5, 8], 8);
        let got = attention(&q, &k, &v, None, None, None).unwrap();
        // Head h uses K/V head h / 2, as transformers' repeat_kv.
        let rep = |t: &Tensor| {
            let heads: Vec<Tensor> = (0..4).map(|h| t.narrow(1, h / 2, 1).unwrap()).collect();
            Tensor::cat(&heads, 1).unwrap()
        };
        let scores = (q.matmul(&rep(&k).t().unwrap()).unwrap() / 8f64.sqrt()).unwrap();
        let want = softmax_last_dim(&scores).unwrap().matmul(&rep(&v)).unwrap();
        let want = want.transpose(1, 2).unwrap().reshape((1, 5, 32)).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);
    }

    #[test]
    fn segment_mask_rules() {
        let seg = Tensor::new(&[[1u32, 1, 2, 2, 0]], &Device::Cpu).unwrap();
        let m = segment_mask(&seg, DType::F32)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let allowed: Vec<Vec<u8>> = m
            .to_vec2::<f32>()
            .unwrap()
            .iter()
            .map(|r| r.iter().map(|&x| u8::from(x == 0.0)).collect())
            .collect();
        let want = vec![
            vec![1, 0, 0, 0, 0],
            vec![1, 1, 0, 0, 0],
            vec![0, 0, 1, 0, 0],
            vec![0, 0, 1, 1, 0],
            vec![0, 0, 0, 0, 0],
        ];
        assert_eq!(allowed, want);
        let causal = causal_mask(2, 3, DType::F32, &Device::Cpu).unwrap();
        let causal: Vec<Vec<f32>> = causal
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(causal[0].iter().filter(|&&x| x == 0.0).count(), 4);
        assert_eq!(causal[1].iter().filter(|&&x| x == 0.0).count(), 5);
    }

    #[test]
    fn rope_matches_rotate_half_definition() {
        let rope = Rope::new(10_000.0, 4, 8, &RopeScaling::None, &Device::Cpu).unwrap();
        let pos = Tensor::new(&[[3u32]], &Device::Cpu).unwrap();
        let (cos, sin) = rope.gather(&pos, DType::F32).unwrap();
        let x = Tensor::new(&[[[[1f32, 2., 3., 4.]]]], &Device::Cpu).unwrap();
        let got: Vec<f32> = apply_rope(&x, &cos, &sin)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let f = [3.0f64, 3.0 / 100.0];
        let (x1, x2) = ([1.0, 2.0], [3.0, 4.0]);
        let mut want = vec![];
        for i in 0..2 {
            want.push(x1[i] * f[i].cos() - x2[i] * f[i].sin());
        }
        for i in 0..2 {
            want.push(x2[i] * f[i].cos() + x1[i] * f[i].sin());
        }
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn dropout_is_seeded_and_scaled() {
        let x = Tensor::ones((64, 64), DType::F32, &Device::Cpu).unwrap();
        let d = Dropout {
            p: 0.25,
            seed: 9,
            site: 3,
        };
        let a: Vec<f32> = d
            .apply(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = d
            .apply(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
        let zeros = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((zeros - 0.25).abs() < 0.03, "{zeros}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        let other = Dropout { site: 4, ..d }
            .apply(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_ne!(a, other);
    }
}
