//! `cargo xtask cuda-check [--toolkit DIR]`: lints `sft` built with its `cuda` feature, on a
//! machine without a GPU.
//!
//! candle's CUDA backend compiles its kernels to PTX with `nvcc` at build time, so the feature
//! cannot even be type-checked without a CUDA toolkit. Where none is installed (`--toolkit`,
//! `$CUDA_ROOT`, `$CUDA_PATH` or `nvcc` on `PATH`), NVIDIA's compiler wheels from PyPI
//! (`nvidia-cuda-nvcc` and the headers it needs, about 320 MB unpacked) go into
//! `target/cuda-toolkit`, once. The check runs clippy with warnings denied on every target of
//! `sft` and `sft-cli` with the feature, in its own target directory (`target/cuda-check`) so that the CPU
//! build's artefacts are not rebuilt. Where an MPI library is installed (`mpicc` on `PATH`, as
//! `.ci/run` installs it) the check includes the `nccl` feature, data-parallel ranks whose
//! gradients NCCL sums on the GPUs (NCCL itself is loaded at run time, so building needs only
//! MPI and libclang). Linking needs the driver's `libcuda.so` and running needs
//! a GPU: both are for a machine that has one (docs/performance.md).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// A CUDA toolkit root (with `bin/nvcc`); default: the environment's, else one from PyPI.
    #[arg(long)]
    toolkit: Option<PathBuf>,
    /// The GPU generation the kernels are compiled for (`CUDA_COMPUTE_CAP`; 90: H100/H200).
    #[arg(long, default_value_t = 90)]
    compute_cap: u32,
}

/// The wheels of one CUDA release that compiling candle's kernels needs: the compiler driver,
/// its front end (`cicc`, in nvvm) and device headers (crt), the runtime headers (`cuda_fp16.h`,
/// `cuda_bf16.h`) and the C++ core library they include (`nv/target`, in cccl, which is
/// versioned on its own). 13.4 is the newest release `cudarc` 0.19 knows by name.
const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.4.92",
    "nvidia-cuda-crt==13.4.92",
    "nvidia-nvvm==13.4.92",
    "nvidia-cuda-runtime==13.4.92",
    "nvidia-cuda-cccl==13.3.5.0.6",
];

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let root = match toolkit(args.toolkit)? {
        Some(root) => root,
        None => pypi_toolkit(&crate::project_root().join("target/cuda-toolkit"))?,
    };
    let nvcc = root.join("bin").join("nvcc");
    if !nvcc.is_file() {
        bail!("{} not found: not a CUDA toolkit root", nvcc.display());
    }
    let path = std::env::join_paths(
        std::iter::once(root.join("bin")).chain(
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default(),
        ),
    )?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = crate::project_root().join("target/cuda-check");
    let mpi = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join("mpicc").is_file());
    if !mpi {
        eprintln!("no MPI library (mpicc): the `nccl` feature is left out of the check");
    }
    let features = if mpi { "cuda,sft-cli/nccl" } else { "cuda" };
    let step = [
        "clippy",
        "--package",
        "sft",
        "--package",
        "sft-cli",
        "--features",
        features,
        "--all-targets",
        "--target-dir",
    ];
    eprintln!(
        "$ CUDA_ROOT={} cargo {} {} -- -D warnings",
        root.display(),
        step.join(" "),
        target.display()
    );
    let status = Command::new(&cargo)
        .args(step)
        .arg(&target)
        .args(["--", "-D", "warnings"])
        .env("CUDA_ROOT", &root)
        .env("PATH", path)
        // Without it, candle's kernel build asks `nvidia-smi` for the GPU's generation.
        .env("CUDA_COMPUTE_CAP", args.compute_cap.to_string())
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("the `cuda` feature does not build ({status})");
    }
    eprintln!(
        "the `{features}` features build (clippy clean) with {}",
        nvcc.display()
    );
    Ok(())
}

/// The toolkit named by `--toolkit`, `$CUDA_ROOT`, `$CUDA_PATH` or found through `nvcc` on
/// `PATH`; `None` when there is none.
fn toolkit(given: Option<PathBuf>) -> anyhow::Result<Option<PathBuf>> {
    if let Some(dir) = given {
        return Ok(Some(
            dir.canonicalize()
                .with_context(|| dir.display().to_string())?,
        ));
    }
    for var in ["CUDA_ROOT", "CUDA_PATH"] {
        if let Some(dir) = std::env::var_os(var).filter(|d| !d.is_empty()) {
            return Ok(Some(PathBuf::from(dir)));
        }
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| d.join("nvcc").is_file());
    Ok(on_path.and_then(|bin| bin.parent().map(Path::to_owned)))
}

/// NVIDIA's wheels unpacked into `dir` (once); returns the toolkit root inside.
fn pypi_toolkit(dir: &Path) -> anyhow::Result<PathBuf> {
    let root = dir.join("nvidia/cu13");
    if root.join("bin/nvcc").is_file() && root.join("nvvm/bin/cicc").is_file() {
        return Ok(root);
    }
    // One pip call: with `--target`, a second one would not merge into the existing `nvidia/`.
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    eprintln!(
        "no CUDA toolkit here: installing {} into {}",
        WHEELS.join(" "),
        dir.display()
    );
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
        .arg(dir)
        .args(WHEELS)
        .status()
        .with_context(|| format!("running {python} -m pip"))?;
    if !status.success() {
        bail!("installing the CUDA compiler from PyPI failed ({status})");
    }
    if !root.join("bin/nvcc").is_file() {
        bail!("{} has no bin/nvcc after installing", root.display());
    }
    Ok(root)
}
