//! The passes over a network, written once for every family: the forward pass (with a KV cache
//! in generation), the traced forward pass and the own backward that walks its trace back, and
//! activation checkpointing for both backward paths.
//!
//! A network is an embedding, a stack of layers and a final norm (`family::Network`). A traced
//! pass keeps each layer's activations for the own backward, or, checkpointed, only each
//! layer's input: backward then runs the layer's forward again, keeping its activations, just
//! before its backward. Every op is a pure function of its inputs and the step's seed (dropout
//! masks included), so the recomputed activations, and the gradients, are the same bits.
//!
//! Where the own backward does not run (half precision, other devices, Gemma 2's soft-capped
//! attention), a checkpointed pass goes back through candle's graph one layer at a time: the
//! layer's input becomes a variable, the layer runs again on the graph's weights, and
//! `sum(output * grad)` is differentiated. The gradient of each layer's output reaches it
//! exactly (`grad * 1`), and within a layer candle adds the same terms in the same order as
//! through the whole graph.

use std::any::Any;

use candle_core::{Tensor, TensorId, Var};

use crate::backward::Grads;
use crate::error::Result;
use crate::family::Network;
use crate::kv::LayerKv;
use crate::ops::Mask;

/// Hidden states after the final norm: embedding, every layer (extending `kv` when given), the
/// final norm. `seed: Some(_)` is training mode.
pub(crate) fn forward_hidden(
    net: &dyn Network,
    ids: &Tensor,
    positions: &Tensor,
    mask: Option<&Mask>,
    mut kv: Option<&mut [LayerKv]>,
    seed: Option<u64>,
) -> Result<Tensor> {
    let t = ids.dim(1)?;
    let cached = kv.as_deref().map_or(0, |kv| kv[0].len());
    let ctx = net.context(positions, mask, cached + t)?;
    let mut x = net.embed(ids, positions, seed)?;
    for i in 0..net.num_layers() {
        let cache = kv.as_deref_mut().map(|kv| &mut kv[i]);
        x = net.layer(i, &x, ctx.as_ref(), cache, seed, false)?.0;
    }
    net.finish(&x)
}

/// What a layer of a traced pass kept.
enum Kept {
    /// Its activations.
    Activations(Box<dyn Any>),
    /// Its input alone (checkpointed): the activations are recomputed in backward.
    Input(Tensor),
}

/// What the backward of a traced pass reads.
pub(crate) struct Trace {
    ids: Tensor,
    positions: Tensor,
    ctx: Box<dyn Any>,
    seed: Option<u64>,
    layers: Vec<Kept>,
    /// The final norm's input.
    last: Tensor,
    /// Backward goes through candle's graph (the own backward does not run here).
    graph: bool,
}

/// The forward pass keeping what backward reads: every layer's activations, or with
/// `checkpoint` every layer's input. On the plain network (detached weights). `None` where
/// neither backward can take the pass: the own backward does not run and nothing is
/// checkpointed (training then differentiates candle's graph of the whole pass).
pub(crate) fn forward_traced(
    net: &dyn Network,
    ids: &Tensor,
    positions: &Tensor,
    mask: &Mask,
    seed: Option<u64>,
    own: bool,
    checkpoint: bool,
) -> Result<Option<(Tensor, Trace)>> {
    let own = own && net.own_backward();
    if !own && !checkpoint {
        return Ok(None);
    }
    let ctx = net.context(positions, Some(mask), ids.dim(1)?)?;
    let mut x = net.embed(ids, positions, seed)?;
    let mut layers = Vec::with_capacity(net.num_layers());
    for i in 0..net.num_layers() {
        let (out, acts) = net.layer(i, &x, ctx.as_ref(), None, seed, !checkpoint)?;
        layers.push(match acts {
            Some(acts) => Kept::Activations(acts),
            None => Kept::Input(x),
        });
        x = out;
    }
    let hidden = net.finish(&x)?;
    let trace = Trace {
        ids: ids.clone(),
        positions: positions.clone(),
        ctx,
        seed,
        layers,
        last: x,
        graph: !own,
    };
    Ok(Some((hidden, trace)))
}

impl Trace {
    /// Whether backward goes through candle's graph.
    pub(crate) fn through_graph(&self) -> bool {
        self.graph
    }

    /// Whether `net`, of `hidden` wide states, made this trace (the same kind of network, the
    /// same number of layers and width): backward on another network's trace is an error, not
    /// a kernel reading out of bounds.
    pub(crate) fn fits(&self, net: &dyn Network, hidden: usize) -> bool {
        net.owns(self.ctx.as_ref())
            && self.layers.len() == net.num_layers()
            && self.last.dims().last() == Some(&hidden)
    }
}

/// The own backward: every parameter's gradient (into `grads`) from the hidden states', on the
/// plain network that made the trace.
pub(crate) fn backward(
    net: &dyn Network,
    tr: Trace,
    grad: &Tensor,
    grads: &mut Grads,
) -> Result<()> {
    let ctx = tr.ctx.as_ref();
    let mut dx = net.finish_backward(&tr.last, grad, grads)?;
    for (i, kept) in tr.layers.into_iter().enumerate().rev() {
        let acts = match kept {
            Kept::Activations(acts) => acts,
            Kept::Input(x) => {
                let (_, acts) = net.layer(i, &x, ctx, None, tr.seed, true)?;
                acts.expect("a layer keeps its activations when asked")
            }
        };
        dx = net.layer_backward(i, acts, &dx, ctx, grads, tr.seed)?;
    }
    net.embed_backward(&tr.ids, &tr.positions, &dx, grads, tr.seed)
}

/// Backward through candle's graph, a layer at a time, from a checkpointed trace: `graph` is the
/// network on the trainable `Var`s; each gradient candle gives a tensor of `params` is passed
/// to `put` with that parameter's index (a parameter may get several, in backward's order).
pub(crate) fn backward_through_graph(
    graph: &dyn Network,
    tr: Trace,
    grad: &Tensor,
    params: &[(String, Var)],
    put: &mut dyn FnMut(usize, Tensor) -> Result<()>,
) -> Result<()> {
    let ids: Vec<TensorId> = params.iter().map(|(_, v)| v.as_tensor().id()).collect();
    // The gradients of `sum(y * g)` for the parameters, and for `x` when it is given.
    let mut step = |y: &Tensor, g: &Tensor, x: Option<&Var>| -> Result<Option<Tensor>> {
        let store = (y * g)?.sum_all()?.backward()?;
        for (i, (_, v)) in params.iter().enumerate() {
            debug_assert_eq!(ids[i], v.as_tensor().id());
            if let Some(g) = store.get(v.as_tensor()) {
                put(i, g.clone())?;
            }
        }
        Ok(x.and_then(|x| store.get(x.as_tensor()).cloned()))
    };
    let ctx = tr.ctx.as_ref();
    let last = Var::from_tensor(&tr.last)?;
    let hidden = graph.finish(last.as_tensor())?;
    let mut dx = step(&hidden, grad, Some(&last))?.expect("the norm's input has a gradient");
    for (i, kept) in tr.layers.into_iter().enumerate().rev() {
        let Kept::Input(x) = kept else {
            unreachable!("a trace through the graph is checkpointed")
        };
        let x = Var::from_tensor(&x)?;
        let (out, _) = graph.layer(i, x.as_tensor(), ctx, None, tr.seed, false)?;
        dx = step(&out, &dx, Some(&x))?.expect("a layer's input has a gradient");
    }
    let x0 = graph.embed(&tr.ids, &tr.positions, tr.seed)?;
    step(&x0, &dx, None)?;
    Ok(())
}
