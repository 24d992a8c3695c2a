//! RoPE: the tables of cos and sin per position, in the "rotate half" layout of
//! `transformers`, and how a config scales their frequencies.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// RoPE tables for positions `0..max_positions`, in the "rotate half" layout of `transformers`,
/// kept in f32 whatever the model dtype (a bf16 angle loses integer positions above 256).
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    /// (max_positions, head_dim / 2): `cos(p f_i)`.
    cos: Tensor,
    /// (max_positions, head_dim / 2): `sin(p f_i)`.
    sin: Tensor,
}

/// How the RoPE frequencies are scaled (`transformers`' `rope_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum RopeScaling {
    #[default]
    None,
    /// Every frequency divided by `factor` (positions interpolated).
    Linear { factor: f64 },
    /// Llama 3.1+: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    /// `transformers`' inverse frequencies after the scaling, in f32 as it computes them.
    pub(crate) fn apply(&self, inv_freq: &mut [f32]) {
        match *self {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                inv_freq.iter_mut().for_each(|f| *f /= factor as f32);
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let (factor, low, high, old) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    old as f32,
                );
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_wavelen {
                        *f / factor
                    } else {
                        *f
                    };
                    *f = if wavelen < high_wavelen || wavelen > low_wavelen {
                        scaled
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    };
                }
            }
        }
    }
}

impl Rope {
    pub(crate) fn new(
        theta: f64,
        head_dim: usize,
        max_positions: usize,
        scaling: &RopeScaling,
        device: &Device,
    ) -> Result<Rope> {
        let half = head_dim / 2;
        // As transformers: inv_freq and the angle are f32 values; only cos/sin are taken more
        // precisely (torch's f32 cos is accurate to an ulp, so this matches it closely).
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        scaling.apply(&mut inv_freq);
        let angles = || {
            (0..max_positions).flat_map(|p| inv_freq.iter().map(move |&f| ((p as f32) * f) as f64))
        };
        let cos: Vec<f32> = angles().map(|a| a.cos() as f32).collect();
        let sin: Vec<f32> = angles().map(|a| a.sin() as f32).collect();
        Ok(Rope {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?,
        })
    }

    /// The tables at `positions` (b, t) for [`apply_rope`], each (b, t, 1, head_dim) to
    /// broadcast over heads: `[cos | cos]` and `[-sin | sin]` (the sign of `rotate_half`).
    pub(crate) fn gather(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let cos = self.cos.index_select(&flat, 0)?;
        let sin = self.sin.index_select(&flat, 0)?;
        let cos = Tensor::cat(&[&cos, &cos], 1)?;
        let sin = Tensor::cat(&[&sin.neg()?, &sin], 1)?;
        let shape = (b, t, 1, cos.dim(1)?);
        Ok((
            cos.reshape(shape)?.to_dtype(dtype)?,
            sin.reshape(shape)?.to_dtype(dtype)?,
        ))
    }
}
