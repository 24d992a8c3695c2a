//! Data-parallel training: what the ranks of a run launched by `mpirun` or `srun` exchange,
//! behind one trait, [`Collective`].
//!
//! A step of `N` ranks is the step one process would take with `N x train.grad_accum`
//! micro-batches (`feed::Share` says which are whose): each rank computes the gradients of its
//! share, scaled by the whole step's target count (summed over the ranks first, so the scale
//! is fixed before any backward pass), then the ranks sum their gradients once per optimizer
//! step ([`sum_step`]) and every rank applies the same AdamW update to the same weights. The
//! gradient norm, and so clipping, is that of the summed gradients: the global norm.
//! Everything a rank decides alone (the time budget's estimate, early stopping, a stop signal)
//! is rank 0's decision, broadcast ([`agree`]); every `run.log_every` steps the ranks compare a
//! checksum of their weights and optimizer state ([`check_replicas`]).
//!
//! [`Single`] is one process: every collective is the identity and costs nothing, so the
//! training loop has no branch for it. `mpi::Mpi` (the `mpi` feature) runs over the system's
//! MPI library; `nccl::Nccl` (the `nccl` feature, with `cuda`) sums gradients on the GPUs with
//! NCCL and the rest over MPI.

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::kernels::with_cpu_f32;

/// The collectives of a data-parallel run. Every rank calls each method in the same order with
/// buffers of the same length; a method returns when every rank has called it.
pub trait Collective {
    /// This process's rank, `0..ranks()`.
    fn rank(&self) -> usize;
    /// Processes in the run.
    fn ranks(&self) -> usize;
    /// What carries the collectives, for the run's first lines (`Open MPI v4.1.4, ...`).
    fn describe(&self) -> String;
    /// Element-wise sum over the ranks, in place (counts and loss sums: exact for integers
    /// below 2^53).
    fn sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Element-wise sum over the ranks, in place: one bucket of gradients.
    fn sum_f32(&self, values: &mut [f32]) -> Result<()>;
    /// Rank 0's `values` on every rank.
    fn broadcast_u64(&self, values: &mut [u64]) -> Result<()>;
    /// Every rank's `value`, in rank order.
    fn gather_u64(&self, value: u64) -> Result<Vec<u64>>;
    /// Sums gradients over the ranks, in place; each comes back as f32. By default through host
    /// buckets of [`BUCKET_ELEMS`] values ([`sum_on_host`]); a collective over device memory
    /// (NCCL) sums device tensors where they are.
    fn sum_tensors(&self, tensors: &mut [Tensor]) -> Result<()> {
        sum_on_host(self, tensors)
    }
    /// The device this rank trains on, when the collective chose it (NCCL: the rank's GPU);
    /// `None` leaves the choice to `setup::device`.
    fn device(&self) -> Option<Device> {
        None
    }
}

/// One process: nothing to exchange.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn ranks(&self) -> usize {
        1
    }
    fn describe(&self) -> String {
        "one process".into()
    }
    fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast_u64(&self, _: &mut [u64]) -> Result<()> {
        Ok(())
    }
    fn gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        Ok(vec![value])
    }
    fn sum_tensors(&self, _: &mut [Tensor]) -> Result<()> {
        Ok(())
    }
}

/// Values per gradient bucket: 16M f32 (64 MiB). One all-reduce per bucket instead of one per
/// tensor keeps a model of hundreds of small tensors (norms, biases) from paying a collective's
/// latency for each, and the bucket bounds the extra host memory the sum needs.
pub const BUCKET_ELEMS: usize = 16 << 20;

/// Sums `tensors` over the ranks through host f32 buckets: consecutive tensors are packed into
/// a bucket of at most [`BUCKET_ELEMS`] values, summed with [`Collective::sum_f32`] and
/// unpacked; a tensor larger than a bucket is summed alone, a bucket-sized slice at a time.
pub fn sum_on_host<C: Collective + ?Sized>(coll: &C, tensors: &mut [Tensor]) -> Result<()> {
    let mut bucket: Vec<f32> = Vec::new();
    let mut members: Vec<usize> = Vec::new();
    for i in 0..tensors.len() {
        let n = tensors[i].elem_count();
        if n > BUCKET_ELEMS {
            let mut values = host_f32(&tensors[i])?;
            for slice in values.chunks_mut(BUCKET_ELEMS) {
                coll.sum_f32(slice)?;
            }
            let t = &tensors[i];
            tensors[i] = Tensor::from_vec(values, t.shape(), t.device())?;
            continue;
        }
        if bucket.len() + n > BUCKET_ELEMS {
            flush(coll, tensors, &mut bucket, &mut members)?;
        }
        match with_cpu_f32(&tensors[i], |v| bucket.extend_from_slice(v)) {
            Some(()) => {}
            None => bucket.extend(host_f32(&tensors[i])?),
        }
        members.push(i);
    }
    flush(coll, tensors, &mut bucket, &mut members)
}

/// Sums the packed bucket and writes each member tensor back from it.
fn flush<C: Collective + ?Sized>(
    coll: &C,
    tensors: &mut [Tensor],
    bucket: &mut Vec<f32>,
    members: &mut Vec<usize>,
) -> Result<()> {
    if members.is_empty() {
        return Ok(());
    }
    coll.sum_f32(bucket)?;
    let mut at = 0;
    for &i in members.iter() {
        let t = &tensors[i];
        let n = t.elem_count();
        tensors[i] = Tensor::from_slice(&bucket[at..at + n], t.shape(), t.device())?;
        at += n;
    }
    bucket.clear();
    members.clear();
    Ok(())
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// What [`sum_step`] summed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summed {
    /// The step's loss summed over its target tokens on every rank.
    pub loss_sum: f64,
    /// Seconds spent in the collectives (0 in one process).
    pub seconds: f64,
}

/// Sums an optimizer step's gradients and loss over the ranks, so every rank holds the
/// gradients of the whole step. `grads[i]` belongs to `params[i]`; a parameter without a
/// gradient on this rank (a rank whose share of an epoch's last step is empty) takes zeros, and
/// one without a gradient on any rank stays `None`, which AdamW leaves untouched, as in one
/// process.
pub fn sum_step(
    coll: &dyn Collective,
    grads: &mut [Option<Tensor>],
    params: &[(String, Var)],
    loss_sum: f64,
) -> Result<Summed> {
    if coll.ranks() == 1 {
        return Ok(Summed {
            loss_sum,
            seconds: 0.0,
        });
    }
    let t0 = Instant::now();
    let mut head = Vec::with_capacity(1 + grads.len());
    head.push(loss_sum);
    head.extend(grads.iter().map(|g| if g.is_some() { 1.0 } else { 0.0 }));
    coll.sum_f64(&mut head)?;
    let mut slots = Vec::new();
    let mut present = Vec::new();
    for (i, g) in grads.iter_mut().enumerate() {
        if head[1 + i] == 0.0 {
            continue;
        }
        let t = match g.take() {
            Some(t) => t,
            None => {
                let p = params[i].1.as_tensor();
                Tensor::zeros(p.shape(), DType::F32, p.device())?
            }
        };
        slots.push(i);
        present.push(t);
    }
    coll.sum_tensors(&mut present)?;
    for (i, t) in slots.into_iter().zip(present) {
        grads[i] = Some(t);
    }
    Ok(Summed {
        loss_sum: head[0],
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Counts of a step summed over the ranks (target tokens, tokens, padded positions).
pub fn sum_counts<const N: usize>(coll: &dyn Collective, counts: [usize; N]) -> Result<[usize; N]> {
    let mut values = counts.map(|c| c as f64);
    coll.sum_f64(&mut values)?;
    Ok(values.map(|v| v as usize))
}

/// Rank 0's schedule total and stop decision, on every rank: the time budget's estimate, early
/// stopping and a stop signal are decided there alone.
pub fn agree(coll: &dyn Collective, total_steps: u64, stop: bool) -> Result<(u64, bool)> {
    let mut values = [total_steps, u64::from(stop)];
    coll.broadcast_u64(&mut values)?;
    Ok((values[0], values[1] != 0))
}

/// Compares every rank's checksum of its weights and optimizer state after `step`; ranks that
/// differ from rank 0 are an error on every rank, which stops the run.
pub fn check_replicas(coll: &dyn Collective, checksum: u64, step: u64) -> Result<()> {
    let all = coll.gather_u64(checksum)?;
    let differ: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, &c)| c != all[0])
        .map(|(r, c)| format!("rank {r} {c:016x}"))
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(Error::Distributed(format!(
        "after step {step} the ranks hold different weights or optimizer state (checksum of rank 0 {:016x}, {}); the run stops here",
        all[0],
        differ.join(", ")
    )))
}

/// A 64-bit checksum of f32 values (their bits): FNV-1a over 32-bit words, chunks hashed in
/// parallel and combined in order, so the value does not depend on the thread count. It tells
/// replicas apart; it is no cryptographic hash.
pub fn checksum_f32(values: &[f32]) -> u64 {
    use rayon::prelude::*;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    const BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    let partials: Vec<u64> = values
        .par_chunks(1 << 16)
        .map(|c| {
            c.iter().fold(BASIS, |h, x| {
                (h ^ u64::from(x.to_bits())).wrapping_mul(PRIME)
            })
        })
        .collect();
    partials
        .iter()
        .fold(values.len() as u64, |h, p| (h ^ p).wrapping_mul(PRIME))
}

/// [`checksum_f32`] of a tensor's values (as f32), without a copy for contiguous f32 CPU
/// tensors.
pub fn checksum_tensor(t: &Tensor) -> Result<u64> {
    match with_cpu_f32(t, checksum_f32) {
        Some(c) => Ok(c),
        None => Ok(checksum_f32(&host_f32(t)?)),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use candle_core::Device;

    use super::*;

    /// Two ranks in one process: each "rank" is one call sequence; the collective sums what
    /// the other rank contributed, given up front.
    struct Pair {
        rank: usize,
        other_f32: RefCell<Vec<Vec<f32>>>,
        other_f64: RefCell<Vec<Vec<f64>>>,
        other_checksum: u64,
    }

    impl Collective for Pair {
        fn rank(&self) -> usize {
            self.rank
        }
        fn ranks(&self) -> usize {
            2
        }
        fn describe(&self) -> String {
            "test pair".into()
        }
        fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
            let other = self.other_f64.borrow_mut().remove(0);
            assert_eq!(other.len(), values.len());
            values.iter_mut().zip(other).for_each(|(v, o)| *v += o);
            Ok(())
        }
        fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
            let other = self.other_f32.borrow_mut().remove(0);
            assert_eq!(other.len(), values.len());
            values.iter_mut().zip(other).for_each(|(v, o)| *v += o);
            Ok(())
        }
        fn broadcast_u64(&self, _: &mut [u64]) -> Result<()> {
            Ok(())
        }
        fn gather_u64(&self, value: u64) -> Result<Vec<u64>> {
            Ok(vec![value, self.other_checksum])
        }
    }

    #[test]
    fn a_step_sums_gradients_and_loss_and_fills_absent_ones_with_zeros() {
        let dev = Device::Cpu;
        let params: Vec<(String, Var)> = ["a", "b", "c"]
            .iter()
            .map(|n| (n.to_string(), Var::zeros((2, 2), DType::F32, &dev).unwrap()))
            .collect();
        // This rank has a gradient for `a` only; the other rank for `a` and `b`; nobody for `c`.
        let mut grads = vec![
            Some(Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap()),
            None,
            None,
        ];
        let pair = Pair {
            rank: 0,
            other_f64: RefCell::new(vec![vec![0.5, 1.0, 1.0, 0.0]]),
            // One bucket: `a` then `b`.
            other_f32: RefCell::new(vec![vec![10., 20., 30., 40., 1., 1., 1., 1.]]),
            other_checksum: 0,
        };
        let summed = sum_step(&pair, &mut grads, &params, 2.0).unwrap();
        assert_eq!(summed.loss_sum, 2.5);
        let values = |g: &Option<Tensor>| g.as_ref().unwrap().flatten_all().unwrap();
        assert_eq!(
            values(&grads[0]).to_vec1::<f32>().unwrap(),
            vec![11., 22., 33., 44.]
        );
        assert_eq!(values(&grads[1]).to_vec1::<f32>().unwrap(), vec![1.; 4]);
        assert!(grads[2].is_none());
    }

    #[test]
    fn a_tensor_larger_than_a_bucket_is_summed_in_slices() {
        let n = BUCKET_ELEMS + 3;
        let t = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
        let pair = Pair {
            rank: 1,
            other_f64: RefCell::new(vec![]),
            // The large tensor's two slices, then the bucket of the small one.
            other_f32: RefCell::new(vec![vec![2.0; BUCKET_ELEMS], vec![5.0; 3], vec![1.0; 4]]),
            other_checksum: 0,
        };
        let mut tensors = vec![t, Tensor::ones(4, DType::F32, &Device::Cpu).unwrap()];
        sum_on_host(&pair, &mut tensors).unwrap();
        let big = tensors[0].to_vec1::<f32>().unwrap();
        assert_eq!(big.len(), n);
        assert!(big[..BUCKET_ELEMS].iter().all(|&x| x == 3.0));
        assert!(big[BUCKET_ELEMS..].iter().all(|&x| x == 6.0));
        assert_eq!(tensors[1].to_vec1::<f32>().unwrap(), vec![2.0; 4]);
    }

    #[test]
    fn replicas_that_differ_stop_the_run_naming_the_ranks() {
        let pair = |other| Pair {
            rank: 0,
            other_f64: RefCell::new(vec![]),
            other_f32: RefCell::new(vec![]),
            other_checksum: other,
        };
        assert!(check_replicas(&pair(7), 7, 10).is_ok());
        let err = check_replicas(&pair(8), 7, 10).unwrap_err().to_string();
        assert!(
            err.contains("after step 10") && err.contains("rank 1"),
            "{err}"
        );
    }

    #[test]
    fn checksums_see_every_bit_and_the_length() {
        let a = checksum_f32(&[1.0, 2.0, 3.0]);
        assert_eq!(a, checksum_f32(&[1.0, 2.0, 3.0]));
        assert_ne!(
            a,
            checksum_f32(&[1.0, 2.0, f32::from_bits(3f32.to_bits() ^ 1)])
        );
        assert_ne!(a, checksum_f32(&[1.0, 2.0, 3.0, 0.0]));
        assert_ne!(checksum_f32(&[0.0]), checksum_f32(&[-0.0]));
    }
}
