//! Workspace-level fixtures and end-to-end tests. Shared fixture files live in `tests/data/`.
//!
//! [`tasks`] generates the synthetic instruction task used by the quality runs
//! (`docs/results.md`) and their reduced versions in the test suite.

pub mod tasks;
