//! [`Collective`] for ranks on GPUs (the `nccl` feature: `cuda` and `mpi`): gradients are
//! summed where they are, on the devices, by NCCL through cudarc's bindings (libnccl is loaded
//! when the first communicator is made); counts, decisions and checksums go over MPI, which
//! also carries NCCL's unique id from rank 0 to the others.
//!
//! Each rank takes the GPU of its index among the ranks on its machine
//! ([`Mpi::local_rank`]), so `mpirun -np 8` on a machine with 8 GPUs uses each once. NCCL runs
//! on the device's own stream, so its sums are ordered with candle's kernels without a
//! synchronisation.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::{group_end, group_start, Comm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::mpi::Mpi;
use super::{sum_on_host, Collective};
use crate::error::{Error, Result};

/// MPI's world, with an NCCL communicator over the same ranks on each rank's GPU.
pub struct Nccl {
    comm: Comm,
    device: Device,
    ordinal: usize,
    // Dropped last: MPI outlives NCCL's use of it.
    mpi: Mpi,
}

impl Nccl {
    /// The NCCL communicator of `mpi`'s ranks, each on `device` (its GPU). Every rank calls it;
    /// on an error `mpi` comes back (boxed: it is large) so the caller can end the job.
    pub fn init(mpi: Mpi, device: CudaDevice, ordinal: usize) -> Result<Nccl, Box<(Mpi, Error)>> {
        match communicator(&mpi, &device) {
            Ok(comm) => Ok(Nccl {
                comm,
                device: Device::Cuda(device),
                ordinal,
                mpi,
            }),
            Err(e) => Err(Box::new((mpi, e))),
        }
    }

    /// The MPI world under the communicator (to end the job on an error).
    pub fn mpi(&self) -> &Mpi {
        &self.mpi
    }
}

/// Rank 0 makes NCCL's unique id and broadcasts its 128 bytes over MPI; every rank then joins
/// the communicator.
fn communicator(mpi: &Mpi, device: &CudaDevice) -> Result<Comm> {
    let failed = |what: &str, e: &dyn std::fmt::Debug| {
        Error::Distributed(format!("rank {}: NCCL {what}: {e:?}", mpi.rank()))
    };
    let mut words = [0u64; 16];
    if mpi.rank() == 0 {
        let id = Id::new().map_err(|e| failed("unique id", &e))?;
        for (w, bytes) in words.iter_mut().zip(id.internal().chunks_exact(8)) {
            let bytes: [u8; 8] = std::array::from_fn(|i| bytes[i] as u8);
            *w = u64::from_le_bytes(bytes);
        }
    }
    mpi.broadcast_u64(&mut words)?;
    let mut internal = [0; 128];
    for (chunk, w) in internal.chunks_exact_mut(8).zip(words) {
        for (c, b) in chunk.iter_mut().zip(w.to_le_bytes()) {
            *c = b as _;
        }
    }
    Comm::from_rank(
        device.cuda_stream(),
        mpi.rank(),
        mpi.ranks(),
        Id::uninit(internal),
    )
    .map_err(|e| failed("communicator", &e))
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }

    fn ranks(&self) -> usize {
        self.mpi.ranks()
    }

    fn describe(&self) -> String {
        format!(
            "{}; gradients by NCCL on cuda:{}",
            self.mpi.describe(),
            self.ordinal
        )
    }

    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        self.mpi.sum_f64(values)
    }

    fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        self.mpi.sum_f32(values)
    }

    fn broadcast_u64(&self, values: &mut [u64]) -> Result<()> {
        self.mpi.broadcast_u64(values)
    }

    fn gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        self.mpi.gather_u64(value)
    }

    /// Device tensors are summed by NCCL as f32, in one group (NCCL fuses the group's
    /// operations); host tensors through MPI's buckets.
    fn sum_tensors(&self, tensors: &mut [Tensor]) -> Result<()> {
        if tensors.iter().any(|t| !t.device().is_cuda()) {
            return sum_on_host(self, tensors);
        }
        let op = AllReduce { comm: &self.comm };
        group_start().map_err(|e| nccl_error("group start", &e))?;
        let summed: Result<Vec<Tensor>> = tensors
            .iter()
            .map(|t| Ok(t.to_dtype(DType::F32)?.apply_op1_no_bwd(&op)?))
            .collect();
        // The group is closed whatever happened inside it.
        group_end().map_err(|e| nccl_error("group end", &e))?;
        for (t, s) in tensors.iter_mut().zip(summed?) {
            *t = s;
        }
        Ok(())
    }

    fn device(&self) -> Option<Device> {
        Some(self.device.clone())
    }
}

fn nccl_error(what: &str, e: &dyn std::fmt::Debug) -> Error {
    Error::Distributed(format!("NCCL {what}: {e:?}"))
}

/// The sum of a device tensor over the ranks, into a new buffer (the gradient tensor may be
/// shared with the graph it came from, so it is not summed in place).
struct AllReduce<'a> {
    comm: &'a Comm,
}

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "sft-nccl-all-reduce"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("NCCL sums device tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("NCCL all-reduce: the gradient is not contiguous")
        };
        let device = s.device().clone();
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let mut dst = device.alloc_zeros::<f32>(end - start)?;
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, device), l.shape().clone()))
    }
}
