//! Weights by name, for assembling a network from its parameter list.

use std::collections::HashMap;

use candle_core::Tensor;

/// The tensors a network is built on, by their Hugging Face names, and LoRA's settings when
/// they include adapters.
pub(crate) struct Weights {
    pub(crate) map: HashMap<String, Tensor>,
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
