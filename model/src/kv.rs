//! The KV cache of incremental decoding.

use candle_core::Tensor;

use crate::error::Result;

/// The keys and values one layer has seen so far, (batch, kv_heads, len, head_dim) each.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerKv {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerKv {
    /// Positions cached so far.
    pub(crate) fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// Appends this step's keys and values; returns the whole sequence's.
    pub(crate) fn append(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let kv = match self.kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        self.kv = Some(kv.clone());
        Ok(kv)
    }
}

/// Keys and values of every layer for incremental decoding (`Model::forward_cached`). All rows
/// of a batch share one length.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    pub(crate) len: usize,
}

impl KvCache {
    pub(crate) fn new(layers: usize) -> KvCache {
        KvCache {
            layers: vec![LayerKv::default(); layers],
            len: 0,
        }
    }

    /// Tokens cached so far: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| l.kv = None);
        self.len = 0;
    }
}
