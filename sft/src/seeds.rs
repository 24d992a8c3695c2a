//! The seeds a run derives from `run.seed` and its position, so that no random state is carried
//! between steps or saved in a checkpoint: resuming at any step draws what the uninterrupted run
//! drew there.

/// The tag that keeps the streamed shuffle's seeds apart from the dropout seeds.
const TAG_STREAM: u64 = 0x5354_5245_414d;

/// The dropout seed of micro-batch `micro_batch` of optimizer step `step` (counted from 0).
pub fn dropout_seed(seed: u64, step: u64, micro_batch: u64) -> u64 {
    splitmix(seed, step, micro_batch)
}

/// The seed of a streamed epoch's shuffle buffer (`data.streaming`).
pub fn stream_seed(seed: u64, epoch: u64) -> u64 {
    splitmix(seed, TAG_STREAM, epoch)
}

/// splitmix64's finaliser over `seed` and two positions, each spread by its own odd constant:
/// nearby positions give unrelated seeds.
fn splitmix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resumed run draws the dropout masks and the stream order of the run that saved its
    /// checkpoint only while these values stay the same, so they are pinned (computed
    /// independently, from splitmix64's definition).
    #[test]
    fn seeds_are_pinned() {
        assert_eq!(dropout_seed(42, 0, 0), 0xa759_ea27_d472_7622);
        assert_eq!(dropout_seed(42, 7, 3), 0xb1f0_0280_3b88_cf1a);
        assert_eq!(stream_seed(1234, 0), 0xe42c_e9d0_0afc_a156);
        assert_eq!(stream_seed(1234, 5), 0x708c_db83_5768_9bde);
    }

    #[test]
    fn positions_give_distinct_seeds() {
        let mut seen = std::collections::HashSet::new();
        for step in 0..64 {
            for micro_batch in 0..8 {
                assert!(seen.insert(dropout_seed(7, step, micro_batch)));
            }
        }
        for epoch in 0..64 {
            assert!(seen.insert(stream_seed(7, epoch)));
        }
    }
}
