//! Workspace-level fixtures and end-to-end tests. Shared fixture files live in `tests/data/`.
//!
//! [`tasks`] generates the synthetic instruction task used by the quality runs
//! (`docs/results.md`) and their reduced versions in the test suite; [`parquet`] writes parquet
//! test files with their JSONL twins.

pub mod parquet;
pub mod tasks;
