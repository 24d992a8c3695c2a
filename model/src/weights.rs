//! Weights by name, for assembling a network from its parameter list.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::quant::QWeight;

/// A weight matrix as a network holds it: a tensor, or frozen ggml blocks.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Quant(QWeight),
}

impl Weight {
    /// (rows, cols).
    pub fn dims2(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Weight::Dense(t) => t.dims2(),
            Weight::Quant(q) => Ok(q.dims()),
        }
    }

    /// The tensor, when the weight is one (a trainable weight always is).
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            Weight::Quant(_) => None,
        }
    }

    /// The dtype products with it compute in: the tensor's, or f32 for blocks.
    pub fn dtype(&self) -> DType {
        match self {
            Weight::Dense(t) => t.dtype(),
            Weight::Quant(_) => DType::F32,
        }
    }
}

/// The tensors a network is built on, by their Hugging Face names, and LoRA's settings when
/// they include adapters.
pub(crate) struct Weights {
    pub(crate) map: HashMap<String, Tensor>,
    /// Frozen matrices kept as ggml blocks.
    pub(crate) quant: HashMap<String, QWeight>,
    /// LoRA's (scale, dropout) when the map holds adapters (`<module>.lora_A.weight`, ...).
    pub(crate) lora: Option<(f64, f64)>,
}

/// A LoRA adapter's tensors as a network reads them: `scale * dropout(x) A^T B^T`.
pub(crate) struct AdapterWeights {
    pub(crate) a: Tensor,
    pub(crate) b: Tensor,
    pub(crate) scale: f64,
    pub(crate) dropout: f64,
}

impl Weights {
    /// Every name comes from the parameter specs, so a miss is a bug in this crate.
    pub(crate) fn get(&self, name: &str) -> Tensor {
        match self.map.get(name) {
            Some(t) => t.clone(),
            None => panic!("parameter {name} is not in the parameter list"),
        }
    }

    pub(crate) fn maybe(&self, name: &str) -> Option<Tensor> {
        self.map.get(name).cloned()
    }

    /// A matrix that may be kept as ggml blocks (a linear layer's weight, an embedding, the
    /// head).
    pub(crate) fn weight(&self, name: &str) -> Weight {
        match self.quant.get(name) {
            Some(q) => Weight::Quant(q.clone()),
            None => Weight::Dense(self.get(name)),
        }
    }

    /// The adapter of the linear module `name`, when it has one.
    pub(crate) fn adapter(&self, name: &str) -> Option<AdapterWeights> {
        let (scale, dropout) = self.lora?;
        let a = self.maybe(&lora_a_name(name))?;
        let b = self.get(&lora_b_name(name));
        Some(AdapterWeights {
            a,
            b,
            scale,
            dropout,
        })
    }
}

/// The name of module `module`'s LoRA A matrix (r, in), as PEFT names it under the module.
pub(crate) fn lora_a_name(module: &str) -> String {
    format!("{module}.lora_A.weight")
}

/// The name of module `module`'s LoRA B matrix (out, r).
pub(crate) fn lora_b_name(module: &str) -> String {
    format!("{module}.lora_B.weight")
}
