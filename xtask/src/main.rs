//! `cargo xtask`: project automation in Rust (see https://github.com/matklad/cargo-xtask).
//!
//! The only code in the workspace allowed to touch the network; nothing depends on it.

mod ci;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Xtask {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// What CI runs: fmt check, clippy with warnings denied, the test suite.
    Ci,
}

fn main() -> anyhow::Result<()> {
    let xtask = Xtask::parse();
    std::env::set_current_dir(project_root())?;
    match xtask.command {
        Cmd::Ci => ci::run(),
    }
}

pub(crate) fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the root")
        .to_owned()
}
