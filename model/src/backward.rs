//! The models' own backward pass, for training on the CPU in f32 (and f64, for the checks).
//!
//! candle's backward walks the graph and gives every input of every node a zero-filled buffer
//! plus an addition (`GradStore::or_insert`, then `add`), even where the input has one consumer:
//! on the small models that bookkeeping was 8-9% of a step, all of it on one thread. Here each
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

use crate::Result;

/// Parameter gradients as a backward pass produces them, one slot per parameter of the model
/// (`Model::params` order), found by the detached weight tensor the forward pass read.
pub(crate) struct Grads<'a> {
    slots: &'a HashMap<TensorId, usize>,
    out: Vec<Option<Tensor>>,
}

impl<'a> Grads<'a> {
    pub(crate) fn new(slots: &'a HashMap<TensorId, usize>, n_params: usize) -> Grads<'a> {
        Grads {
            slots,
            out: vec![None; n_params],
        }
    }

    /// Adds `g` to the gradient of `param`.
    pub(crate) fn put(&mut self, param: &Tensor, g: Tensor) -> Result<()> {
        let Some(&i) = self.slots.get(&param.id()) else {
            return Err(crate::Error::Input {
                reason: "backward: a gradient for a tensor that is not a parameter".into(),
            });
        };
        self.out[i] = Some(match self.out[i].take() {
            None => g,
            Some(prev) => (prev + g)?,
        });
        Ok(())
    }

    pub(crate) fn into_vec(self) -> Vec<Option<Tensor>> {
        self.out
    }
}
