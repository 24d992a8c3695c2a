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
//!
//! One file per op family (`activation`, `norm`, `rope`, `softmax`, `dropout`, `embedding`),
//! each building on `base`; this module only re-exports what the rest of the crate calls.

mod activation;
mod base;
mod dropout;
mod embedding;
mod norm;
mod rope;
mod softmax;
#[cfg(test)]
mod tests;

pub(crate) use self::activation::{gelu, gelu_backward, silu_mul, silu_mul_backward};
pub(crate) use self::base::{
    column_sums, cpu, fusable, matmul, slice_of, sum_in_order, written_by, Element, Input, ParamOp,
    Real, WithParams, SUM_ROWS,
};
pub(crate) use self::dropout::{dropout_backward, dropout_mask_mul, residual_dropout};
pub(crate) use self::embedding::{add_rows_in_place, sum_rows_by_id};
pub(crate) use self::norm::{layer_norm_core, rms_norm_core, NormKind};
pub(crate) use self::rope::{rope_backward, rope_heads_first};
pub(crate) use self::softmax::masked_softmax;
