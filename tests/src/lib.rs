//! Workspace-level fixtures and end-to-end tests. Shared fixture files live in `tests/data/`.
//!
//! [`tasks`] generates the synthetic instruction task used by the quality runs
//! (`docs/results.md`) and their reduced versions in the test suite; [`parquet`] writes parquet
//! test files with their JSONL twins; [`imports`] finds import loops between a crate's modules
//! (ARCHITECTURE.md's invariant, tested in each library crate); [`gguf`] takes GGUF files apart
//! and puts them back together for the fault-injection tests.

pub mod gguf;
pub mod imports;
pub mod parquet;
pub mod tasks;
