//! Mixtures of data sources: which samples of each source an epoch trains on.
//!
//! A source contributes all its samples (plain concatenation), an exact number per epoch
//! (`samples = N`: a seeded subset when N is below its size, whole seeded passes plus a subset
//! when above), or a share by weight (`weight = w`: the weighted sources together keep their total
//! size, split in proportion to the weights), or a multiple of its size (`repeat = r`: whole
//! seeded passes and a seeded part, as `samples` of `r` times its size). The selection is a pure function of
//! `(seed, epoch, source)`, so a resumed run sees the same epochs.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::render::mix;
use crate::{Error, Result};

/// How much of a source an epoch takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Share {
    All,
    Samples(usize),
    Weight(f64),
    /// `round(r * size)` samples: whole passes and a part, as [`Share::Samples`].
    Repeat(f64),
}

const TAG_MIXTURE: u64 = 3;

/// The samples of one epoch: `sources[i].0` are the indices of source `i`'s samples (in any
/// index space the caller keeps); the result lists the chosen ones, source by source, each as
/// often as it is drawn.
pub fn mixture_epoch(sources: &[(Vec<usize>, Share)], seed: u64, epoch: u64) -> Result<Vec<usize>> {
    let weighted: Vec<(usize, f64)> = sources
        .iter()
        .filter_map(|(s, share)| match share {
            Share::Weight(w) => Some((s.len(), *w)),
            _ => None,
        })
        .collect();
    let weight_sum: f64 = weighted.iter().map(|(_, w)| w).sum();
    let weighted_size: usize = weighted.iter().map(|(n, _)| n).sum();
    if weighted.iter().any(|(_, w)| !(w.is_finite() && *w > 0.0)) {
        return Err(Error::InvalidOption {
            reason: "mixture weights must be positive".into(),
        });
    }
    if sources
        .iter()
        .any(|(_, s)| matches!(s, Share::Repeat(r) if !(r.is_finite() && *r > 0.0)))
    {
        return Err(Error::InvalidOption {
            reason: "mixture repeats must be positive".into(),
        });
    }
    let mut out = Vec::new();
    for (k, (samples, share)) in sources.iter().enumerate() {
        let count = match *share {
            Share::All => samples.len(),
            Share::Samples(n) => n,
            Share::Weight(w) => (weighted_size as f64 * w / weight_sum).round() as usize,
            Share::Repeat(r) => (samples.len() as f64 * r).round() as usize,
        };
        if count > 0 && samples.is_empty() {
            return Err(Error::InvalidOption {
                reason: format!(
                    "mixture source {} has no samples to draw {count} from",
                    k + 1
                ),
            });
        }
        if matches!(share, Share::All) {
            out.extend_from_slice(samples);
            continue;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(mix(&[seed, epoch, TAG_MIXTURE, k as u64]));
        let mut left = count;
        while left > 0 {
            let mut pass = samples.clone();
            pass.shuffle(&mut rng);
            let take = left.min(pass.len());
            out.extend_from_slice(&pass[..take]);
            left -= take;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_exact_and_a_pure_function_of_seed_and_epoch() {
        let a: Vec<usize> = (0..100).collect();
        let b: Vec<usize> = (100..130).collect();
        let c: Vec<usize> = (130..140).collect();
        let sources = vec![
            (a.clone(), Share::Weight(0.7)),
            (b.clone(), Share::Weight(0.3)),
            (c.clone(), Share::Samples(25)),
        ];
        let e0 = mixture_epoch(&sources, 7, 0).unwrap();
        assert_eq!(e0, mixture_epoch(&sources, 7, 0).unwrap());
        assert_ne!(e0, mixture_epoch(&sources, 7, 1).unwrap());
        let from = |r: std::ops::Range<usize>| e0.iter().filter(|i| r.contains(i)).count();
        // 130 weighted samples split 0.7 / 0.3; 25 from a source of 10: two passes and 5 more.
        assert_eq!((from(0..100), from(100..130), from(130..140)), (91, 39, 25));
        let mut a_taken: Vec<usize> = e0.iter().copied().filter(|&i| i < 100).collect();
        a_taken.sort();
        a_taken.dedup();
        assert_eq!(
            a_taken.len(),
            91,
            "below its size, a source is sampled without repeats"
        );
        for i in 130..140 {
            let n = e0.iter().filter(|&&x| x == i).count();
            assert!(n == 2 || n == 3, "{i} drawn {n} times");
        }
        // All: the source as it is.
        let plain = mixture_epoch(&[(a.clone(), Share::All), (b, Share::All)], 7, 3).unwrap();
        assert_eq!(plain, (0..130).collect::<Vec<_>>());
        assert!(mixture_epoch(&[(vec![], Share::Samples(3))], 0, 0).is_err());
        // Repeat: whole passes (each sample exactly twice), then a seeded part.
        let twice = mixture_epoch(&[(c.clone(), Share::Repeat(2.0))], 7, 0).unwrap();
        assert!((130..140).all(|i| twice.iter().filter(|&&x| x == i).count() == 2));
        let more = mixture_epoch(&[(c.clone(), Share::Repeat(2.5))], 7, 0).unwrap();
        assert_eq!(more.len(), 25);
        assert!(mixture_epoch(&[(c, Share::Repeat(0.0))], 0, 0).is_err());
        assert!(mixture_epoch(&[(a, Share::Weight(0.0))], 0, 0).is_err());
    }
}
