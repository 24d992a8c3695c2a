//! Workspace-level fixtures and end-to-end tests.
