//! All integration tests of this crate in one binary (one link instead of one per file).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod anvil_harness;
mod artifacts;
mod cli;
mod common;
mod concurrency;
mod contracts;
mod fees;
mod gas;
mod invariant;
