//! The processes of a training run: this one alone, or, with the `mpi` feature, the ranks of the
//! job `mpirun` or `srun` launched (a binary started alone is a job of one rank); with `nccl`
//! too, each rank on its own GPU with gradients summed by NCCL.

use sft::dist::Collective;

/// Signals that stop a run after its step, with a checkpoint, besides SIGINT and SIGTERM. Open
/// MPI's `mpirun` answers Ctrl-C and SIGTERM by ending every rank within a second or so,
/// too soon for a step and a save, and forwards SIGUSR1 to every rank: `kill -USR1 <mpirun's
/// pid>` is the stop that saves (rank 0's flag decides; the others follow it).
#[cfg(feature = "mpi")]
pub(crate) const STOP_SIGNALS: &[i32] = &[signal_hook::consts::SIGUSR1];

/// One process keeps SIGUSR1's default.
#[cfg(not(feature = "mpi"))]
pub(crate) const STOP_SIGNALS: &[i32] = &[];

/// Runs `train` with this process's collective. In a job of several ranks an error ends the
/// whole job (`MPI_Abort`) once this rank has printed it: the other ranks would otherwise wait
/// for it in their next collective.
#[cfg(feature = "mpi")]
pub(crate) fn run<R>(
    train: impl FnOnce(&dyn Collective) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    let mpi = sft::dist::mpi::Mpi::init()?;
    #[cfg(feature = "nccl")]
    let mpi = {
        // The rank's GPU among its machine's; no GPU: the ranks train on their CPUs.
        let ordinal = mpi.local_rank();
        match candle_core::Device::new_cuda(ordinal) {
            Ok(candle_core::Device::Cuda(gpu)) => {
                match sft::dist::nccl::Nccl::init(mpi, gpu, ordinal) {
                    Ok(nccl) => return finish(&nccl, nccl.mpi(), train),
                    Err(failed) => {
                        let (mpi, e) = *failed;
                        let e = anyhow::Error::from(e);
                        return finish(&mpi, &mpi, |_| Err::<R, _>(e));
                    }
                }
            }
            _ => mpi,
        }
    };
    finish(&mpi, &mpi, train)
}

/// `train` over `coll`, ending the job through `mpi` when it fails in a job of several ranks.
#[cfg(feature = "mpi")]
fn finish<R>(
    coll: &dyn Collective,
    mpi: &sft::dist::mpi::Mpi,
    train: impl FnOnce(&dyn Collective) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    let out = train(coll);
    if let Err(e) = &out {
        if coll.ranks() > 1 {
            let who = format!("rank {} of {}: ", coll.rank(), coll.ranks());
            crate::report(e, &who, false);
            mpi.abort(1);
        }
    }
    out
}

/// Without the `mpi` feature every run is one process.
#[cfg(not(feature = "mpi"))]
pub(crate) fn run<R>(
    train: impl FnOnce(&dyn Collective) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    train(&sft::dist::Single)
}
