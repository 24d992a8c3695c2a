//! [`Collective`] over MPI (the `mpi` feature): rsmpi's bindings to the system's MPI library
//! (Open MPI or MPICH), on host buffers.
//!
//! MPI is initialised with `MPI_THREAD_SERIALIZED`: the run calls MPI from one of rayon's
//! workers (the thread the CLI trains on), never from two threads at once. MPI's default error
//! handler, `MPI_ERRORS_ARE_FATAL`, stays: a failed collective ends the whole job with MPI's
//! message instead of returning, and a rank that dies ends the job through the launcher
//! (`mpirun`; `srun --kill-on-bad-exit`), so no rank waits forever for a dead peer.

use ::mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use ::mpi::environment::Universe;
use ::mpi::topology::{Communicator, SimpleCommunicator};
use ::mpi::Threading;

use super::Collective;
use crate::error::{Error, Result};

/// `MPI_COMM_WORLD` of a job launched by `mpirun` or `srun` (or a job of one process when the
/// binary is started alone). MPI is finalised when this is dropped.
pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    ranks: usize,
    library: String,
    // Dropped last: `MPI_Finalize`.
    _universe: Universe,
}

impl Mpi {
    /// Initialises MPI. An error when it was initialised before in this process, or when the
    /// library cannot call MPI from a thread other than the main one.
    pub fn init() -> Result<Mpi> {
        let (universe, threading) = ::mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| Error::Distributed("MPI is initialised already".into()))?;
        if matches!(threading, Threading::Single | Threading::Funneled) {
            return Err(Error::Distributed(format!(
                "the MPI library offers threading level {threading:?}; training calls MPI from a worker thread and needs Serialized"
            )));
        }
        let world = universe.world();
        // "Open MPI v4.1.4, package: ..., May 26, 2022\0\0...": the name and version.
        let library = ::mpi::environment::library_version()
            .ok()
            .and_then(|v| {
                let first = v.lines().next()?.split(',').next()?;
                Some(
                    first
                        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                        .to_string(),
                )
            })
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "MPI".into());
        Ok(Mpi {
            rank: world.rank() as usize,
            ranks: world.size() as usize,
            world,
            library,
            _universe: universe,
        })
    }

    /// This rank's index among the job's ranks on its machine (`MPI_Comm_split_type` with
    /// `MPI_COMM_TYPE_SHARED`): which of the machine's GPUs it takes.
    pub fn local_rank(&self) -> usize {
        self.world.split_shared(self.rank as i32).rank() as usize
    }

    /// Ends every process of the job with `code` (`MPI_Abort`): what a rank does after an error,
    /// since the others would wait for it in their next collective.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn ranks(&self) -> usize {
        self.ranks
    }

    fn describe(&self) -> String {
        format!("{} ranks over {}", self.ranks, self.library)
    }

    fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        // rsmpi has no in-place all-reduce: the values are sent from a copy.
        let send = values.to_vec();
        self.world
            .all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        let send = values.to_vec();
        self.world
            .all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    fn broadcast_u64(&self, values: &mut [u64]) -> Result<()> {
        self.world.process_at_rank(0).broadcast_into(values);
        Ok(())
    }

    fn gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        let mut all = vec![0u64; self.ranks];
        self.world.all_gather_into(&value, &mut all[..]);
        Ok(all)
    }
}
