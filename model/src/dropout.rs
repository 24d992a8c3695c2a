//! Inverted dropout whose masks are drawn from seeded ChaCha8 streams, one per dropout site:
//! the same mask on every device and thread count, drawn again in backward rather than kept.
//!
//! Its own module (beside `chacha`) because the fused kernels, the attention and the dense
//! layers all draw masks, and the ops module builds on them.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::chacha::Words;
use crate::error::Result;
use crate::math::Real;

/// Inverted dropout with a mask drawn on the host from a seeded ChaCha8 stream, so a training
/// step is reproducible bit for bit whatever the device or thread count.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dropout {
    pub(crate) p: f64,
    pub(crate) seed: u64,
    /// Which dropout site of the forward pass this is; each site has its own stream.
    pub(crate) site: u64,
}

impl Dropout {
    /// The site's random stream; element `i` of the tensor `apply` masks takes word `i`.
    pub(crate) fn stream(&self) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(self.site);
        rng
    }

    /// The next multiplier from the stream: 0 with probability `p`, else `1 / (1 - p)`.
    #[inline]
    pub(crate) fn draw(&self, rng: &mut ChaCha8Rng) -> f32 {
        if rng.random::<f32>() < self.p as f32 {
            0.0
        } else {
            (1.0 / (1.0 - self.p)) as f32
        }
    }

    /// The site's stream by position, for [`Dropout::fill`].
    pub(crate) fn words(&self) -> Words {
        Words::of(&self.stream())
    }

    /// The multipliers of elements `at..at + out.len()` (element i draws word i of the site's
    /// stream), the values `draw` gives one at a time: the words come in bulk (four ChaCha
    /// blocks at a time in AVX-512 registers) and the comparison vectorises, where a `draw`
    /// per element cost as much as the block function itself.
    pub(crate) fn fill<T: Real>(&self, words: &mut Words, at: u64, out: &mut [T]) {
        // rand's f32 from a word (`draw`'s `random::<f32>()`): its top 24 bits times 2^-24.
        const SCALE: f32 = 1.0 / (1u32 << 24) as f32;
        let p = self.p as f32;
        let keep = T::of((1.0 / (1.0 - self.p)) as f32 as f64);
        let mut buf = [0u32; DRAW_BLOCK];
        for (i, out) in out.chunks_mut(DRAW_BLOCK).enumerate() {
            let buf = &mut buf[..out.len()];
            words.fill(at + (i * DRAW_BLOCK) as u64, buf);
            crate::with_avx512!(for (o, &w) in out.iter_mut().zip(buf.iter()) {
                *o = if SCALE * ((w >> 8) as f32) < p {
                    T::ZERO
                } else {
                    keep
                };
            });
        }
    }

    pub(crate) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        let mut rng = self.stream();
        let mask: Vec<f32> = (0..x.elem_count()).map(|_| self.draw(&mut rng)).collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }
}

/// Words [`Dropout::fill`] takes from the stream at a time (a few of ChaCha's 64-word refills;
/// small enough to stay in L1 beside the caller's operands).
pub(crate) const DRAW_BLOCK: usize = 256;
