//! The words of a `ChaCha8Rng` stream at any position, four ChaCha blocks at a time in AVX-512
//! registers where the CPU has them: dropout draws one word per element, and rand_chacha's AVX2
//! block function was the largest cost of a dropout step after the products.
//!
//! Same stream as rand_chacha's `ChaCha8Rng` (the 256-bit key from its seed, the 64-bit block
//! counter in state words 12-13, the 64-bit stream in 14-15, eight rounds): word `i` of the
//! stream is word `i % 16` of block `i / 16`. The tests hold it to rand_chacha's output.

use rand_chacha::ChaCha8Rng;

/// "expand 32-byte k".
#[cfg(target_arch = "x86_64")]
const SIGMA: [u32; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];

/// Words of one ChaCha8 stream by position.
pub(crate) struct Words {
    key: [u32; 8],
    stream: u64,
    /// Where the CPU lacks AVX-512: rand_chacha itself, seeked as needed.
    fallback: Option<ChaCha8Rng>,
}

impl Words {
    /// The stream `rng` draws from (its seed and stream; not its position).
    pub(crate) fn of(rng: &ChaCha8Rng) -> Words {
        let seed = rng.get_seed();
        let key = std::array::from_fn(|i| {
            u32::from_le_bytes([
                seed[4 * i],
                seed[4 * i + 1],
                seed[4 * i + 2],
                seed[4 * i + 3],
            ])
        });
        let fallback = (!crate::math::has_avx512()).then(|| rng.clone());
        Words {
            key,
            stream: rng.get_stream(),
            fallback,
        }
    }

    /// Words `pos..pos + out.len()` of the stream.
    pub(crate) fn fill(&mut self, pos: u64, out: &mut [u32]) {
        if let Some(rng) = &mut self.fallback {
            use rand::Rng;
            if rng.get_word_pos() != u128::from(pos) {
                rng.set_word_pos(u128::from(pos));
            }
            rng.fill(out);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let mut block = pos / 16;
            let mut skip = (pos % 16) as usize;
            let mut buf = [0u32; 64];
            let mut done = 0;
            while done < out.len() {
                // SAFETY: `fallback` is None only where the CPU has AVX-512F.
                unsafe { four_blocks(&self.key, self.stream, block, &mut buf) };
                let n = (64 - skip).min(out.len() - done);
                out[done..done + n].copy_from_slice(&buf[skip..skip + n]);
                done += n;
                skip = 0;
                block = block.wrapping_add(4);
            }
        }
    }
}

/// ChaCha8 blocks `block..block + 4` (counter wrapping at 2^64) into `out`, block after block.
/// Each register holds one row of the 4 x 4 state for all four blocks, a block per 128-bit lane,
/// so a round is four lane-wise quarter rounds, and the diagonal rounds rotate rows within lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn four_blocks(key: &[u32; 8], stream: u64, block: u64, out: &mut [u32; 64]) {
    use std::arch::x86_64::*;

    let row = |w: [u32; 4]| {
        _mm512_broadcast_i32x4(_mm_setr_epi32(
            w[0] as i32,
            w[1] as i32,
            w[2] as i32,
            w[3] as i32,
        ))
    };
    let mut d = [0u32; 16];
    for (i, lane) in d.chunks_exact_mut(4).enumerate() {
        let counter = block.wrapping_add(i as u64);
        lane.copy_from_slice(&[
            counter as u32,
            (counter >> 32) as u32,
            stream as u32,
            (stream >> 32) as u32,
        ]);
    }
    let s0 = row(SIGMA);
    let s1 = row([key[0], key[1], key[2], key[3]]);
    let s2 = row([key[4], key[5], key[6], key[7]]);
    // SAFETY: `d` holds 16 u32, the 64 bytes an unaligned 512-bit load reads.
    let s3 = unsafe { _mm512_loadu_si512(d.as_ptr().cast()) };
    let (mut a, mut b, mut c, mut dd) = (s0, s1, s2, s3);
    macro_rules! quarter_rounds {
        () => {
            a = _mm512_add_epi32(a, b);
            dd = _mm512_rol_epi32::<16>(_mm512_xor_si512(dd, a));
            c = _mm512_add_epi32(c, dd);
            b = _mm512_rol_epi32::<12>(_mm512_xor_si512(b, c));
            a = _mm512_add_epi32(a, b);
            dd = _mm512_rol_epi32::<8>(_mm512_xor_si512(dd, a));
            c = _mm512_add_epi32(c, dd);
            b = _mm512_rol_epi32::<7>(_mm512_xor_si512(b, c));
        };
    }
    for _ in 0..4 {
        quarter_rounds!();
        // Diagonals into columns: row 1 left by one word, row 2 by two, row 3 by three.
        b = _mm512_shuffle_epi32::<0b00_11_10_01>(b);
        c = _mm512_shuffle_epi32::<0b01_00_11_10>(c);
        dd = _mm512_shuffle_epi32::<0b10_01_00_11>(dd);
        quarter_rounds!();
        b = _mm512_shuffle_epi32::<0b10_01_00_11>(b);
        c = _mm512_shuffle_epi32::<0b01_00_11_10>(c);
        dd = _mm512_shuffle_epi32::<0b00_11_10_01>(dd);
    }
    let (a, b, c, dd) = (
        _mm512_add_epi32(a, s0),
        _mm512_add_epi32(b, s1),
        _mm512_add_epi32(c, s2),
        _mm512_add_epi32(dd, s3),
    );
    // Rows by block into blocks by row: block k is lane k of a, b, c, d.
    let t0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(a, b);
    let t1 = _mm512_shuffle_i32x4::<0b01_00_01_00>(c, dd);
    let t2 = _mm512_shuffle_i32x4::<0b11_10_11_10>(a, b);
    let t3 = _mm512_shuffle_i32x4::<0b11_10_11_10>(c, dd);
    let blocks = [
        _mm512_shuffle_i32x4::<0b10_00_10_00>(t0, t1),
        _mm512_shuffle_i32x4::<0b11_01_11_01>(t0, t1),
        _mm512_shuffle_i32x4::<0b10_00_10_00>(t2, t3),
        _mm512_shuffle_i32x4::<0b11_01_11_01>(t2, t3),
    ];
    for (k, v) in blocks.into_iter().enumerate() {
        // SAFETY: block k's 16 words lie inside `out`.
        unsafe { _mm512_storeu_si512(out[16 * k..].as_mut_ptr().cast(), v) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    #[test]
    fn words_are_rand_chachas_at_any_position() {
        for (seed, stream) in [(0u64, 0u64), (7, 3), (u64::MAX, 1 << 40)] {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(stream);
            // The AVX-512 blocks (on this CPU), and rand_chacha itself as a CPU without runs it.
            let slow = Words {
                fallback: Some(rng.clone()),
                ..Words::of(&rng)
            };
            for mut words in [Words::of(&rng), slow] {
                for pos in [0u64, 1, 15, 16, 63, 64, 65, 1000, 123_457] {
                    for n in [0, 1, 7, 64, 65, 200, 513] {
                        let mut want = vec![0u32; n];
                        rng.set_word_pos(u128::from(pos));
                        for w in want.iter_mut() {
                            *w = rng.next_u32();
                        }
                        let mut got = vec![0u32; n];
                        words.fill(pos, &mut got);
                        assert_eq!(got, want, "seed {seed}, stream {stream}, word {pos}, {n}");
                    }
                }
            }
        }
    }
}
