//! What `--quant` writes: each tensor's ggml type under llama.cpp's rules for the file type
//! (`llama-quantize`'s `llama_tensor_get_type`).

use candle_core::quantized::GgmlDType;

use crate::quant::fitting_type;

/// The file types `sft export` writes, by llama.cpp's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufQuant {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the output layer and for half of the layers'
    /// `attn_v` and `ffn_down` (see [`GgufQuant::tensor_type`]).
    Q4KM,
    Q6K,
}

impl GgufQuant {
    pub const NAMES: [&'static str; 7] = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q6_k"];

    pub fn parse(s: &str) -> Option<GgufQuant> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" => GgufQuant::F32,
            "f16" => GgufQuant::F16,
            "bf16" => GgufQuant::Bf16,
            "q8_0" => GgufQuant::Q8_0,
            "q4_0" => GgufQuant::Q4_0,
            "q4_k_m" => GgufQuant::Q4KM,
            "q6_k" => GgufQuant::Q6K,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgufQuant::F32 => "f32",
            GgufQuant::F16 => "f16",
            GgufQuant::Bf16 => "bf16",
            GgufQuant::Q8_0 => "q8_0",
            GgufQuant::Q4_0 => "q4_0",
            GgufQuant::Q4KM => "q4_k_m",
            GgufQuant::Q6K => "q6_k",
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub(crate) fn file_type(self) -> u32 {
        match self {
            GgufQuant::F32 => 0,
            GgufQuant::F16 => 1,
            GgufQuant::Q4_0 => 2,
            GgufQuant::Q8_0 => 7,
            GgufQuant::Q4KM => 15,
            GgufQuant::Q6K => 18,
            GgufQuant::Bf16 => 32,
        }
    }

    /// The type of one tensor, as `llama-quantize` chooses it for this file type:
    /// - one-dimensional tensors (norms, biases, `rope_freqs`) stay F32;
    /// - f32, f16, bf16: every matrix in that type;
    /// - q8_0: every matrix Q8_0;
    /// - q4_0: Q4_0, the output layer (the token embedding when tied) Q6_K;
    /// - q6_k: every matrix Q6_K;
    /// - q4_k_m: Q4_K; Q6_K for the output layer (the token embedding when tied), and for
    ///   `attn_v` and `ffn_down` of the layers where `use_more_bits` holds (the first and last
    ///   eighth of the layers and every third one between);
    ///
    /// then, where a row is not a whole number of the type's blocks (256 values for the K
    /// types, 32 for the others), llama.cpp's fallback ([`fitting_type`]): Q4_K -> Q5_0,
    /// Q6_K -> Q8_0, and F16 where even 32 does not divide the row.
    pub fn tensor_type(self, t: &TensorRole) -> GgmlDType {
        if t.shape.len() < 2 {
            return GgmlDType::F32;
        }
        let head = t.name == "output.weight" || (t.name == "token_embd.weight" && t.tied);
        let more_bits = |i: usize, n: usize| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
        let chosen = match self {
            GgufQuant::F32 => GgmlDType::F32,
            GgufQuant::F16 => GgmlDType::F16,
            GgufQuant::Bf16 => GgmlDType::BF16,
            GgufQuant::Q8_0 => GgmlDType::Q8_0,
            GgufQuant::Q6K => GgmlDType::Q6K,
            GgufQuant::Q4_0 if head => GgmlDType::Q6K,
            GgufQuant::Q4_0 => GgmlDType::Q4_0,
            GgufQuant::Q4KM if head => GgmlDType::Q6K,
            GgufQuant::Q4KM => match t.layer {
                Some(i)
                    if (t.name.ends_with("attn_v.weight")
                        || t.name.ends_with("ffn_down.weight"))
                        && more_bits(i, t.n_layers) =>
                {
                    GgmlDType::Q6K
                }
                _ => GgmlDType::Q4K,
            },
        };
        fitting_type(chosen, *t.shape.last().unwrap_or(&0))
    }
}

/// What [`GgufQuant::tensor_type`] needs to know of a tensor: its GGUF name, row-major shape,
/// layer, and whether the head is tied to the embedding.
#[derive(Debug, Clone)]
pub struct TensorRole<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub layer: Option<usize>,
    pub n_layers: usize,
    pub tied: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role<'a>(name: &'a str, shape: &'a [usize], layer: Option<usize>) -> TensorRole<'a> {
        TensorRole {
            name,
            shape,
            layer,
            n_layers: 24,
            tied: true,
        }
    }

    #[test]
    fn q4_k_m_follows_llama_cpp() {
        let q = GgufQuant::Q4KM;
        let m = [512, 512];
        // 24 layers: n/8 = 3, 7n/8 = 21; more bits for 0-2, 21-23 and 5, 8, ..., 20.
        let more: Vec<usize> = (0..24)
            .filter(|&i| {
                let name = format!("blk.{i}.attn_v.weight");
                q.tensor_type(&role(&name, &m, Some(i))) == GgmlDType::Q6K
            })
            .collect();
        assert_eq!(more, [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]);
        let down = role("blk.5.ffn_down.weight", &m, Some(5));
        assert_eq!(q.tensor_type(&down), GgmlDType::Q6K);
        let gate = role("blk.5.ffn_gate.weight", &m, Some(5));
        assert_eq!(q.tensor_type(&gate), GgmlDType::Q4K);
        // The tied embedding is the output layer: Q6_K, or Q8_0 for rows of 896 (Qwen2.5-0.5B).
        assert_eq!(
            q.tensor_type(&role("token_embd.weight", &m, None)),
            GgmlDType::Q6K
        );
        let qwen = [151936, 896];
        assert_eq!(
            q.tensor_type(&role("token_embd.weight", &qwen, None)),
            GgmlDType::Q8_0
        );
        let untied = TensorRole {
            tied: false,
            ..role("token_embd.weight", &qwen, None)
        };
        assert_eq!(q.tensor_type(&untied), GgmlDType::Q5_0);
        // Norms and biases stay F32; rows of 40 values fall back to F16.
        assert_eq!(
            q.tensor_type(&role("blk.0.attn_norm.weight", &[896], Some(0))),
            GgmlDType::F32
        );
        assert_eq!(
            GgufQuant::Q8_0.tensor_type(&role("blk.0.attn_q.weight", &[40, 40], Some(0))),
            GgmlDType::F16
        );
    }
}
