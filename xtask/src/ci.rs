//! `cargo xtask ci`: the same steps as `.ci/run`, runnable locally in one command.

use std::process::Command;

use anyhow::bail;

/// The steps, in order; `.ci/run` lists the same commands.
pub(crate) const STEPS: &[&[&str]] = &[
    &["fmt", "--all", "--", "--check"],
    &[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ],
    &["test", "--workspace"],
    // The `mpi` feature (Open MPI and libclang installed; `.ci/run` installs them):
    // data-parallel training under `mpirun` (cli/tests/distributed.rs). Its lints run in
    // `cuda-check`, with the `nccl` feature.
    &[
        "test",
        "-p",
        "sft-cli",
        "--features",
        "mpi",
        "--test",
        "distributed",
    ],
    // The `cuda` feature compiles, with `nccl` where MPI is installed (no GPU needed; the
    // compiler comes from PyPI when missing).
    &["xtask", "cuda-check"],
];

pub(crate) fn run() -> anyhow::Result<()> {
    for step in STEPS {
        eprintln!("$ cargo {}", step.join(" "));
        let status = Command::new(env!("CARGO")).args(*step).status()?;
        if !status.success() {
            bail!("`cargo {}` failed ({status})", step.join(" "));
        }
        if step.contains(&"distributed") {
            print_fault_suite()?;
        }
    }
    Ok(())
}

/// What the fault-injection suite survived, as the tests wrote it (`.ci/run` prints it too).
fn print_fault_suite() -> anyhow::Result<()> {
    let dir = crate::project_root().join("target/fault-suite");
    eprintln!("== fault-injection suite ==");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
    files.sort_by_key(|e| e.path());
    for entry in files {
        eprint!("{}", std::fs::read_to_string(entry.path())?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// `.ci/run` and `cargo xtask ci` must not drift apart.
    #[test]
    fn ci_script_runs_the_same_steps() {
        let script = std::fs::read_to_string(crate::project_root().join(".ci/run")).unwrap();
        for step in super::STEPS {
            let line = format!("cargo {}", step.join(" "));
            assert!(script.contains(&line), ".ci/run lacks `{line}`");
        }
    }
}
