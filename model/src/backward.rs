//! The models' own backward pass, for training on the CPU in f32 (and f64, for the checks).
//!
//! candle's backward walks the graph and gives every input of every node a zero-filled buffer
//! plus an addition (`GradStore::or_insert`, then `add`), even where the input has one consumer:
//! on the small models that bookkeeping is 8-9% of a step, all of it on one thread. Here each
//! model keeps the activations its backward needs while it runs forward (without a graph: the
//! weights are detached copies sharing the `Var`s' storage) and walks its layers back calling
//! the fused ops' backward functions, the same functions candle's backward calls through the
//! ops' `bwd`. A gradient with one consumer is used as it comes; the residual stream adds its
//! two contributions, in the order candle adds them, so the gradients are those of candle's
//! backward bit for bit wherever a tensor has at most two consumers (Qwen2's q/k/v projections
//! read the same normalised input: its gradient is their three terms in candle's order).
//!
//! Everything else (half precision, other devices) keeps candle's backward through the graph.

use std::collections::HashMap;

use candle_core::{Tensor, TensorId};

use crate::error::{Error, Result};
use crate::kernels;

/// Parameter gradients as a backward pass produces them, one slot per trainable parameter of
/// the model (`Model::params` order), found by the detached weight tensor the forward pass read;
/// a frozen tensor (LoRA's base) has none. A slot may start with a seed, which the model's
/// gradient is added to (seed first).
pub(crate) struct Grads<'a> {
    slots: &'a HashMap<TensorId, Option<usize>>,
    out: Vec<Option<Tensor>>,
}

impl<'a> Grads<'a> {
    pub(crate) fn new(
        slots: &'a HashMap<TensorId, Option<usize>>,
        seeds: Vec<Option<Tensor>>,
    ) -> Grads<'a> {
        Grads { slots, out: seeds }
    }

    /// The slot of `param`: `None` when it is frozen.
    fn slot(&self, param: &Tensor) -> Result<Option<usize>> {
        match self.slots.get(&param.id()) {
            Some(&i) => Ok(i),
            None => Err(Error::Input {
                reason: "backward: a gradient for a tensor that is not a parameter".into(),
            }),
        }
    }

    /// Whether `param` takes a gradient: a frozen weight's product is not computed at all.
    pub(crate) fn wants(&self, param: &Tensor) -> bool {
        matches!(self.slots.get(&param.id()), Some(Some(_)))
    }

    /// Adds `g` to the gradient of `param` (nothing for a frozen one).
    pub(crate) fn put(&mut self, param: &Tensor, g: Tensor) -> Result<()> {
        let Some(i) = self.slot(param)? else {
            return Ok(());
        };
        self.out[i] = Some(match self.out[i].take() {
            None => g,
            Some(prev) => {
                let g = g.to_dtype(prev.dtype())?;
                (prev + g)?
            }
        });
        Ok(())
    }

    /// Adds the gradient of an embedding lookup of `ids` (flat) whose output's gradient is
    /// `rows` (one per id) to the gradient of the table `param`: only the rows looked up change,
    /// so they are summed per id and added in place (into the seed, or into zeros), where
    /// `zeros.index_add(ids, rows)` and an addition would fill and pass over the whole table twice
    /// (545 MB for Qwen2.5-0.5B). The same sums, so the same bits.
    pub(crate) fn put_rows(&mut self, param: &Tensor, ids: &Tensor, rows: &Tensor) -> Result<()> {
        let Some(i) = self.slot(param)? else {
            return Ok(());
        };
        let dst = match self.out[i].take() {
            Some(seed) => seed,
            None => param.zeros_like()?.to_dtype(rows.dtype())?,
        };
        let (distinct, sums) = kernels::sum_rows_by_id(ids, rows)?;
        kernels::add_rows_in_place(&dst, &distinct, &sums)?;
        self.out[i] = Some(dst);
        Ok(())
    }

    pub(crate) fn into_vec(self) -> Vec<Option<Tensor>> {
        self.out
    }
}
