//! Batches: the shift, padding, packing layout, bin packing, the epoch plan and the split.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sft_data::{
    collate, pack_bins, plan_epoch, shift_labels, split_train_val, BatchPlanOptions, Error,
    Rendered, IGNORE_INDEX,
};

fn r(ids: &[u32], mask: &[u8]) -> Rendered {
    Rendered::new(ids.to_vec(), mask.iter().map(|&m| m == 1).collect()).unwrap()
}

#[test]
fn shift_predicts_the_next_target_only() {
    let s = r(&[10, 11, 12, 13, 14], &[0, 0, 1, 1, 0]);
    assert_eq!(
        shift_labels(&s),
        [IGNORE_INDEX, 12, 13, IGNORE_INDEX, IGNORE_INDEX]
    );
    let all = r(&[1, 2, 3], &[1, 1, 1]);
    // The first token is never predicted (nothing precedes it); the last predicts nothing.
    assert_eq!(shift_labels(&all), [2, 3, IGNORE_INDEX]);
    assert!(shift_labels(&r(&[], &[])).is_empty());
}

#[test]
fn padding_rows() {
    let a = r(&[1, 2, 3], &[0, 1, 1]);
    let b = r(&[4, 5], &[0, 1]);
    let batch = collate(&[vec![&a], vec![&b]], 0, None);
    assert_eq!((batch.batch_size, batch.seq_len), (2, 3));
    assert_eq!(batch.input_ids, [1, 2, 3, 4, 5, 0]);
    assert_eq!(
        batch.labels,
        [2, 3, IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX]
    );
    assert_eq!(batch.positions, [0, 1, 2, 0, 1, 0]);
    assert_eq!(batch.segment_ids, [1, 1, 1, 1, 1, 0]);
    assert_eq!((batch.n_targets, batch.n_tokens), (3, 5));
    let padded = collate(&[vec![&a]], 99, Some(6));
    assert_eq!(padded.seq_len, 6);
    assert_eq!(padded.input_ids, [1, 2, 3, 99, 99, 99]);
    assert_eq!(padded.labels[3..], [IGNORE_INDEX; 3]);
    // A pad id equal to a real target id does not hide the target (labels are built from masks).
    let eos_pad = collate(&[vec![&b], vec![&a]], 5, None);
    assert_eq!(eos_pad.labels[..2], [5, IGNORE_INDEX]);
}

#[test]
fn packed_rows_restart_positions_and_never_predict_across_samples() {
    let a = r(&[1, 2, 3], &[0, 1, 1]);
    let b = r(&[4, 5], &[1, 1]);
    let c = r(&[6], &[1]);
    let batch = collate(&[vec![&a, &b], vec![&c]], 0, None);
    assert_eq!(batch.seq_len, 5);
    assert_eq!(batch.input_ids, [1, 2, 3, 4, 5, 6, 0, 0, 0, 0]);
    // Token 3 (end of sample a) must not learn to predict 4 (start of sample b).
    assert_eq!(
        batch.labels,
        [
            2,
            3,
            IGNORE_INDEX,
            5,
            IGNORE_INDEX,
            IGNORE_INDEX,
            IGNORE_INDEX,
            IGNORE_INDEX,
            IGNORE_INDEX,
            IGNORE_INDEX
        ]
    );
    assert_eq!(batch.positions, [0, 1, 2, 0, 1, 0, 0, 0, 0, 0]);
    assert_eq!(batch.segment_ids, [1, 1, 1, 2, 2, 1, 0, 0, 0, 0]);
    assert_eq!((batch.n_targets, batch.n_tokens), (3, 6));
    // Packed labels are exactly the per-sample labels laid end to end.
    let mut joined = shift_labels(&a);
    joined.extend(shift_labels(&b));
    assert_eq!(batch.labels[..5], joined[..]);
}

/// The fewest bins, by trying every assignment (small cases only).
fn optimal_bins(lengths: &[usize], capacity: usize) -> usize {
    fn go(i: usize, lengths: &[usize], cap: usize, bins: &mut Vec<usize>, best: &mut usize) {
        if bins.len() >= *best {
            return;
        }
        if i == lengths.len() {
            *best = bins.len();
            return;
        }
        for b in 0..bins.len() {
            if bins[b] + lengths[i] <= cap {
                bins[b] += lengths[i];
                go(i + 1, lengths, cap, bins, best);
                bins[b] -= lengths[i];
            }
        }
        bins.push(lengths[i]);
        go(i + 1, lengths, cap, bins, best);
        bins.pop();
    }
    let mut best = usize::MAX;
    go(0, lengths, capacity, &mut Vec::new(), &mut best);
    best
}

fn check_bins(lengths: &[usize], capacity: usize, bins: &[Vec<usize>]) {
    let mut seen: Vec<usize> = bins.concat();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..lengths.len()).collect::<Vec<_>>(),
        "every item exactly once"
    );
    for bin in bins {
        assert!(bin.iter().map(|&i| lengths[i]).sum::<usize>() <= capacity);
    }
}

#[test]
fn best_fit_decreasing_packs_tightly() {
    // Cases where best fit decreasing is optimal, with the bins it must produce.
    assert_eq!(
        pack_bins(&[5, 5, 5, 5], 10).unwrap(),
        [vec![0, 1], vec![2, 3]]
    );
    assert_eq!(
        pack_bins(&[7, 3, 6, 4, 2, 8], 10).unwrap(),
        [vec![5, 4], vec![0, 1], vec![2, 3]]
    );
    // Best fit, not first fit: the 2 goes into the bin with 3 left, not the one with 4.
    assert_eq!(pack_bins(&[6, 7, 2], 10).unwrap(), [vec![1, 2], vec![0]]);
    assert!(pack_bins(&[], 10).unwrap().is_empty());
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for _ in 0..300 {
        let n = rng.random_range(1..9);
        let cap = rng.random_range(5..20);
        let lengths: Vec<usize> = (0..n).map(|_| rng.random_range(1..=cap)).collect();
        let bins = pack_bins(&lengths, cap).unwrap();
        check_bins(&lengths, cap, &bins);
        let opt = optimal_bins(&lengths, cap);
        // BFD's proven bound: at most 11/9 OPT + 6/9 bins.
        assert!(
            9 * bins.len() <= 11 * opt + 6,
            "{lengths:?} cap {cap}: {} vs {opt}",
            bins.len()
        );
        assert_eq!(pack_bins(&lengths, cap).unwrap(), bins, "deterministic");
    }
    let err = pack_bins(&[3, 11], 10).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLongToPack {
                index: 1,
                len: 11,
                capacity: 10
            }
        ),
        "{err:?}"
    );
    assert!(pack_bins(&[1], 0).is_err());
}

fn plan(batch_size: usize, packing: bool, shuffle: bool) -> BatchPlanOptions {
    BatchPlanOptions {
        batch_size,
        packing,
        pack_len: 64,
        group_by_length: false,
        shuffle,
        seed: 5,
        drop_last: false,
    }
}

#[test]
fn epoch_plans_are_deterministic_and_cover_every_sample() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let lengths: Vec<usize> = (0..103).map(|_| rng.random_range(1..=64)).collect();
    for packing in [false, true] {
        let o = plan(4, packing, true);
        let e0 = plan_epoch(&lengths, &o, 0).unwrap();
        assert_eq!(
            e0,
            plan_epoch(&lengths, &o, 0).unwrap(),
            "same seed and epoch, same plan"
        );
        assert_ne!(
            e0,
            plan_epoch(&lengths, &o, 1).unwrap(),
            "another epoch, another order"
        );
        let mut seen: Vec<usize> = e0.iter().flatten().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..103).collect::<Vec<_>>());
        assert!(e0.iter().all(|mb| mb.len() <= 4));
        if packing {
            for row in e0.iter().flatten() {
                assert!(row.iter().map(|&i| lengths[i]).sum::<usize>() <= 64);
            }
        } else {
            assert!(e0.iter().flatten().all(|row| row.len() == 1));
        }
    }
    let unshuffled = plan_epoch(&lengths, &plan(10, false, false), 3).unwrap();
    assert_eq!(unshuffled[0], (0..10).map(|i| vec![i]).collect::<Vec<_>>());
    let dropped = plan_epoch(
        &lengths,
        &BatchPlanOptions {
            drop_last: true,
            ..plan(10, false, true)
        },
        0,
    )
    .unwrap();
    assert_eq!(dropped.len(), 10);
    assert!(dropped.iter().all(|mb| mb.len() == 10));
    let err = plan_epoch(&[65], &plan(1, true, false), 0).unwrap_err();
    assert!(
        matches!(err, Error::TooLongToPack { index: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn batch_size_times_accumulation_sees_the_same_samples_per_step() {
    let lengths: Vec<usize> = (0..50).map(|i| 1 + i % 7).collect();
    let big = plan_epoch(&lengths, &plan(8, false, true), 2).unwrap();
    let small = plan_epoch(&lengths, &plan(1, false, true), 2).unwrap();
    // One optimizer step = 1 micro-batch of 8 = 8 micro-batches of 1.
    for (step, mb) in big.iter().enumerate() {
        let from_small: Vec<Vec<usize>> = small[step * 8..(step * 8 + mb.len()).min(small.len())]
            .iter()
            .flatten()
            .cloned()
            .collect();
        assert_eq!(&from_small, mb, "step {step}");
    }
}

#[test]
fn group_by_length_sorts_within_megabatches_longest_first() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let lengths: Vec<usize> = (0..250).map(|_| rng.random_range(1..1000)).collect();
    let o = BatchPlanOptions {
        group_by_length: true,
        ..plan(2, false, true)
    };
    let p = plan_epoch(&lengths, &o, 0).unwrap();
    let order: Vec<usize> = p.iter().flatten().flatten().copied().collect();
    assert_eq!(
        lengths[order[0]],
        *lengths.iter().max().unwrap(),
        "the longest sample leads"
    );
    // Megabatches of 100 are sorted (apart from the swapped-in longest sample at the front).
    for mega in order.chunks(100) {
        let l: Vec<usize> = mega[1..].iter().map(|&i| lengths[i]).collect();
        assert!(l.windows(2).all(|w| w[0] >= w[1]), "{l:?}");
    }
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..250).collect::<Vec<_>>());
}

#[test]
fn split_is_deterministic_disjoint_and_sized() {
    let (train, val) = split_train_val(100, 0.1, 42);
    assert_eq!((train.len(), val.len()), (90, 10));
    assert_eq!(split_train_val(100, 0.1, 42), (train.clone(), val.clone()));
    assert_ne!(split_train_val(100, 0.1, 43).1, val);
    let mut all = [train, val].concat();
    all.sort_unstable();
    assert_eq!(all, (0..100).collect::<Vec<_>>());
    assert_eq!(
        split_train_val(2, 0.01, 0).1.len(),
        1,
        "at least one validation sample"
    );
    assert_eq!(
        split_train_val(1, 0.5, 0),
        (vec![0], vec![]),
        "never the only sample"
    );
    assert_eq!(split_train_val(10, 0.0, 0), ((0..10).collect(), vec![]));
    assert_eq!(
        split_train_val(10, 1.0, 0).0.len(),
        1,
        "always one training sample"
    );
}
